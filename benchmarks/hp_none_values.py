"""What each adapt method fits with under ``--hp-selection none`` (no validation data): the all-way
hyper-parameters of its state and where each came from, as a Markdown table for the docs.

    python benchmarks/hp_none_values.py [--store STORE] [--shots 4] [--methods a,b]

Fits every adapt method (the prompt learners excepted: they keep their last epoch) once on the
cub35 lite0-minilm store, all-way regime where a method has regimes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cub35_store  # noqa: E402

from fskd import api  # noqa: E402
from fskd.config import AdaptConfig  # noqa: E402
from fskd.methods import METHODS, load_state  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--methods")
    args = ap.parse_args()
    store = cub35_store(args.store)
    names = (
        args.methods.split(",")
        if args.methods
        else [m for m in METHODS.names() if METHODS.get(m).kind == "adapt" and not METHODS.get(m).needs_text_encoder]
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in names:
            opts = {"regime": "allway"} if "regime" in METHODS.get(m).options.__dataclass_fields__ else {}
            r = api.adapt(
                AdaptConfig(
                    store=store,
                    method=m,
                    shots=args.shots,
                    seed=1,
                    out=f"{tmp}/{m}",
                    device="cpu",
                    force=True,
                    hp_selection="none",
                    options=opts,
                ),
                progress=None,
            )
            st = load_state(r.out)
            vals = [
                f"{k.removeprefix('allway.')}={_fmt(v)} ({st.selected_on.get(k, '')})"
                for k, v in st.hparams.items()
                if (k.startswith("allway.") or "." not in k)
                and k not in ("hp_selection", "class_split")
                and k != "grid"
                and not k.endswith(".views")
            ]
            rows.append(f"| `{m}` | {'; '.join(vals) or 'nothing to choose'} |")
            print(rows[-1], flush=True)
    print(
        f"\n| method | all-way values under `--hp-selection none`, {args.shots} shots (where each came from) |\n"
        "|---|---|\n" + "\n".join(rows)
    )


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
