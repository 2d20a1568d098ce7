"""``omniglot``: handwritten characters, read straight from the official zip files or folders."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from PIL import Image

from fskd.datasets.base import DATASETS, DatasetListing, ImageDataset, SampleList, open_rgb
from fskd.errors import DatasetError

SETS = ("images_background", "images_background_small1", "images_background_small2", "images_evaluation")


@DATASETS.register("omniglot")
class OmniglotDataset(ImageDataset):
    """Omniglot characters (alphabet/character classes); Lake et al. background/evaluation split."""

    name = "omniglot"
    urls = (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
    )

    def __init__(self, root: str | None, download: bool = False) -> None:
        super().__init__(root, download)
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._pid = -1

    def _sources(self, root: Path) -> dict[str, Path]:
        """Which image sets exist under root, as extracted folders or zips (folders win)."""
        found: dict[str, Path] = {}
        for base in (root, root / "omniglot-py"):
            for s in SETS:
                if (base / s).is_dir() and s not in found:
                    found[s] = base / s
                elif (base / f"{s}.zip").is_file() and s not in found:
                    found[s] = base / f"{s}.zip"
        return found

    def listing(self) -> DatasetListing:
        root = self.require_root(
            "a folder holding images_background*.zip/ or images_evaluation*.zip/ (the Omniglot release)"
        )
        sources = self._sources(root)
        if not sources and self.download:
            self.check_download()
            from torchvision.datasets.utils import download_and_extract_archive

            for url in self.urls:
                download_and_extract_archive(url, str(root))
            sources = self._sources(root)
        if not sources:
            raise DatasetError(
                f"dataset 'omniglot': no {', '.join(SETS)} (folder or .zip) under {root}; pass --download with a network"
            )
        members: dict[str, list[tuple[str, str]]] = {}  # class key -> [(set name, ref)]
        class_set: dict[str, str] = {}
        for set_name, path in sorted(sources.items()):
            for ref in self._list(path):
                parts = ref.split("::")[-1].split("/")
                key = f"{parts[-3]}/{parts[-2]}"
                members.setdefault(key, []).append((set_name, ref))
                class_set[key] = set_name
        keys = sorted(members)
        refs, labels = [], []
        for i, k in enumerate(keys):
            for _, r in sorted(members[k]):
                refs.append(r)
                labels.append(i)
        names = [
            f"{k.split('/')[0].replace('_', ' ')} {k.split('/')[1].replace('character', 'character ')}" for k in keys
        ]
        listing = DatasetListing(
            name=self.name, root=str(root), class_keys=keys, class_names=names, splits={"all": SampleList(refs, labels)}
        )
        evaluation = [k for k in keys if class_set[k] == "images_evaluation"]
        if evaluation and len(evaluation) < len(keys):
            background = [k for k in keys if class_set[k] != "images_evaluation"]
            # Lake et al.: background alphabets for training, evaluation alphabets for testing;
            # every 5th background character is held out for validation.
            listing.standard_class_split = {
                "base": [k for i, k in enumerate(background) if i % 5 != 4],
                "val": [k for i, k in enumerate(background) if i % 5 == 4],
                "novel": evaluation,
            }
            listing.class_split_source = "Lake et al. background (base/val) vs evaluation (novel) alphabets"
        return listing

    def _list(self, path: Path) -> list[str]:
        rel = os.path.relpath(path, self.root)
        if path.suffix == ".zip":
            try:
                with zipfile.ZipFile(path) as z:
                    return [f"{rel}::{n}" for n in sorted(z.namelist()) if n.lower().endswith(".png")]
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DatasetError(
                    f"dataset 'omniglot': {path} is not a readable zip archive ({e}); it may be "
                    f"truncated: download it again, or unpack it into a folder of the same name"
                ) from None
        return sorted(str(p.relative_to(self.root)) for p in path.rglob("*.png"))

    def _zip(self, rel: str) -> zipfile.ZipFile:
        if self._pid != os.getpid():  # a ZipFile handle must not cross a fork
            self._zips, self._pid = {}, os.getpid()
        if rel not in self._zips:
            self._zips[rel] = zipfile.ZipFile(self.root / rel)
        return self._zips[rel]

    def open(self, ref: str) -> Image.Image:
        if "::" in ref:
            rel, member = ref.split("::", 1)
            return open_rgb(self._zip(rel).read(member))
        return open_rgb(self.root / ref)

    def path_of(self, ref: str) -> str:
        return str(self.root / ref.replace("::", "!/"))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zips"], state["_pid"] = {}, -1
        return state
