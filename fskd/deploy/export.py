"""``fskd export``: the store's image encoder + the state's all-way head + the class names in one
file that takes a preprocessed image batch ``images`` (n, 3, H, W) float32 and returns
``probabilities`` (n, C) float32 (softmax of the head's scores, classes in the store's order).

- ONNX: the metadata properties hold ``fskd_format``, ``class_names`` (JSON list),
  ``preprocess`` (JSON: resize, interpolation, crop, mean, std; see :func:`describe_preprocess`)
  and ``fskd`` (JSON: state, method, store, encoder, versions). Exported with torch's
  TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): with torch 2.14 it
  needs only the ``onnx`` package and takes about a second for EfficientNet-Lite0, while the
  dynamo exporter (torch's default since 2.9) also needs ``onnxscript`` and ``onnx_ir`` and took
  about 7 s for the same graph; both give the same model here (docs/cli/export.md).
- TorchScript: ``torch.jit.trace`` of the same module, the metadata in the archive's extra file
  ``fskd.json`` (``torch.jit.load(path, _extra_files={"fskd.json": ""})``).

Every export is checked before it is renamed into place: the file is loaded back (onnxruntime,
``torch.jit.load``) and run on random batches of two sizes against the eager PyTorch module; a
head the format cannot express (a data-dependent loop, a NumPy or FAISS call) fails that check
and is refused by name, with the format that works. The preprocessing written into the metadata
is checked the same way against the encoder's own ``preprocess`` on images of several shapes.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fskd import __version__
from fskd.config import ExportConfig
from fskd.deploy.classifier import Classifier
from fskd.deploy.output import building, guard_output_file
from fskd.errors import ConfigError, EncoderError, FskdError, Interrupted

log = logging.getLogger(__name__)

FORMAT = "fskd-export"
#: the TorchScript archive's extra file holding the metadata
TS_EXTRA = "fskd.json"
#: the largest difference in probability between the file and the eager module that is accepted
TOLERANCE = 1e-3
#: the largest difference between the described and the encoder's own preprocessing (0..1 pixels, normalised)
PREPROCESS_TOLERANCE = 1e-4
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
#: PIL's reducing_gap in fskd.encoders.student.decode_square (held to it by check_preprocess)
STUDENT_REDUCING_GAP = 3.0


@dataclass
class ExportResult:
    out: str
    format: str
    bytes: int
    parameters: int  # numbers the file stores: the encoder's weights and the head's tensors
    classes: int
    input_shape: list[int]  # (batch, 3, H, W); batch is dynamic
    preprocess: dict
    method: str
    encoder: str
    exporter: str
    max_difference: float  # probability, the file against eager PyTorch on random batches
    seconds: float
    class_names: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("class_names")
        return d


class Pipeline(torch.nn.Module):
    """images (n, 3, H, W) preprocessed -> probabilities (n, C): the encoder, then the head."""

    def __init__(self, clf: Classifier) -> None:
        super().__init__()
        self.towers = torch.nn.ModuleList(clf.encoder.modules())  # registered: counted, moved, eval mode
        self.clf = clf

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.clf.encoder.encode_images(images).float()
        return torch.softmax(self.clf.fitted.logits(self.clf.head.prepare(feats)[None])[0].float(), dim=-1)


# -- preprocessing ---------------------------------------------------------------------------------
def _base_description() -> dict:
    """torchvision's conventions; the keys a student changes say so (see :func:`describe_preprocess`)."""
    return {
        "resize": None,
        "resize_rounding": "truncate",
        "interpolation": "bilinear",
        "reducing_gap": None,
        "square": None,
        "crop": None,
        "crop_offset": "round",
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "scale": "1/255",
        "channels": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
    }


def describe_student(encoder) -> dict:
    """A distilled student's preprocessing (``fskd.encoders.student``: ``decode_square``, then
    ``center_view``, then ``normalize_images``) as data. It is not torchvision's: the shorter side
    goes to ``size`` with the longer one *rounded* (at least ``size``), PIL's bicubic resize with
    ``reducing_gap=3``, the centre ``size`` square with offsets *floored*, then the centre
    ``image_size`` crop of that square, offsets floored again. :func:`check_preprocess` holds this
    description to the encoder's own code, so a change there refuses the export instead of writing
    wrong metadata."""
    out = _base_description()
    out.update(
        {
            "resize": int(encoder.size),
            "resize_rounding": "round",
            "interpolation": "bicubic",
            "reducing_gap": STUDENT_REDUCING_GAP,
            "square": int(encoder.size),
            "crop": [int(encoder.image_size)] * 2,
            "crop_offset": "floor",
            # the timm model's (float32 in the encoder: 0.48500001430511475 is written 0.485)
            "mean": [round(float(v), 7) for v in encoder._mean.tolist()],
            "std": [round(float(v), 7) for v in encoder._std.tolist()],
        }
    )
    return out


def describe_preprocess(encoder) -> dict:
    """The encoder's preprocessing as data: ``resize`` (an int: the shorter side, the longer one
    scaled and truncated as torchvision does, or rounded with ``resize_rounding: "round"``; or
    [h, w]; None: none) with ``interpolation`` and PIL's ``reducing_gap`` (None: torchvision's plain
    resize), ``square`` (an int: the centre square of that side cut first, offsets floored; None:
    none), ``crop`` ([h, w] centre crop, offsets rounded as torchvision does, or floored with
    ``crop_offset: "floor"``; None: none), then pixels / 255, ``(x - mean) / std`` per RGB channel,
    NCHW float32. A torchvision pipeline is read step by step: an affine step after ``ToTensor`` that
    is not a ``Normalize`` (lite0's ``(x*255-127)/128``) is measured and folded into mean and std. A
    distilled student (``student:DIR``) is described by :func:`describe_student`. Raises EncoderError
    when the pipeline holds a step that cannot be written this way."""
    import torchvision.transforms as T

    from fskd.encoders.student import StudentEncoder

    if isinstance(encoder, StudentEncoder):
        return describe_student(encoder)
    spec_name = getattr(encoder, "spec", type(encoder).__name__)
    tf = next((v for v in vars(encoder).values() if isinstance(v, T.Compose)), None)
    if tf is None:
        raise EncoderError(
            f"the preprocessing of encoder {spec_name!r} is not a torchvision pipeline that fskd can "
            f"write into a model's metadata; use fskd predict"
        )
    out = _base_description()
    tensor_steps, tensor_stage = [], False
    from PIL import Image

    for t in tf.transforms:
        if isinstance(t, T.Resize) and not tensor_stage:
            size = t.size if isinstance(t.size, int) else list(t.size)
            if isinstance(size, list) and len(size) == 1:
                size = size[0]
            if t.max_size is not None:
                raise EncoderError(f"encoder {spec_name!r}: Resize(max_size=...) cannot be described")
            out["resize"], out["interpolation"] = size, t.interpolation.value
        elif isinstance(t, T.CenterCrop) and not tensor_stage:
            out["crop"] = [int(v) for v in t.size]
        elif isinstance(t, T.ToTensor):
            tensor_stage = True
        elif tensor_stage:
            tensor_steps.append(t)
        else:  # a PIL step fskd cannot read (open_clip's RGB conversion): it must change nothing on an RGB image
            probe = Image.fromarray((np.arange(48 * 40 * 3) % 251).astype(np.uint8).reshape(40, 48, 3))
            res = t(probe)
            if (
                not isinstance(res, Image.Image)
                or res.size != probe.size
                or not np.array_equal(np.asarray(res), np.asarray(probe))
            ):
                raise EncoderError(f"encoder {spec_name!r}: the preprocessing step {t!r} cannot be described")
    if out["interpolation"] not in INTERPOLATIONS:
        raise EncoderError(f"encoder {spec_name!r}: interpolation {out['interpolation']!r} cannot be described")
    if tensor_steps:  # measure the per-channel affine map x -> a x + b of the tensor steps

        def f(v: float) -> torch.Tensor:
            x = torch.full((3, 4, 4), v)
            for t in tensor_steps:
                x = t(x)
            return x.reshape(3, -1)

        y0, y1, yh = f(0.0), f(1.0), f(0.37)
        a, b = (y1 - y0)[:, 0], y0[:, 0]
        if (
            not all(torch.allclose(y[:, :1].expand_as(y), y, atol=1e-6) for y in (y0, y1, yh))
            or (a == 0).any()
            or not torch.allclose(yh[:, 0], a * 0.37 + b, atol=1e-5)
        ):
            raise EncoderError(f"encoder {spec_name!r}: its tensor preprocessing is not a per-channel affine map")
        out["std"] = [float(v) for v in (1.0 / a)]
        out["mean"] = [float(v) for v in (-b / a)]
    return out


def _resized_size(size: tuple[int, int], spec: dict) -> tuple[int, int]:
    """(w, h) -> the (w, h) ``spec["resize"]`` gives (see :func:`describe_preprocess`)."""
    w, h = size
    if not isinstance(spec["resize"], int):  # [height, width]
        return spec["resize"][1], spec["resize"][0]
    s = spec["resize"]
    if spec.get("resize_rounding", "truncate") == "round":  # fskd's students (fskd.encoders.student.decode_square)
        f = s / min(w, h)
        return max(s, int(round(w * f))), max(s, int(round(h * f)))
    return (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # torchvision's Resize


def _center_crop(im, ch: int, cw: int, offset: str):
    w, h = im.size
    if offset == "floor":
        top, left = (h - ch) // 2, (w - cw) // 2
    else:  # torchvision's CenterCrop
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return im.crop((left, top, left + cw, top + ch))


def reference_preprocess(image, spec: dict) -> np.ndarray:
    """PIL RGB image -> (3, H, W) float32 as ``spec`` says (what examples/onnx_predict.py does)."""
    from PIL import Image

    im = image.convert("RGB")
    if spec["resize"] is not None:
        size = _resized_size(im.size, spec)
        if size != im.size:
            im = im.resize(
                size, getattr(Image.Resampling, spec["interpolation"].upper()), reducing_gap=spec.get("reducing_gap")
            )
    if spec.get("square"):
        im = _center_crop(im, spec["square"], spec["square"], "floor")
    if spec["crop"] is not None:
        im = _center_crop(im, *spec["crop"], spec.get("crop_offset", "round"))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def check_preprocess(encoder, spec: dict) -> float:
    """The largest difference between :func:`reference_preprocess` and the encoder's own
    preprocessing on images of several shapes; raises EncoderError above the tolerance."""
    from PIL import Image

    rng = np.random.default_rng(0)
    worst, where = 0.0, ""
    # odd and even sides, up- and down-scaling, and a shrink past PIL's reducing gap (x8)
    for h, w in ((37, 53), (300, 211), (257, 224), (224, 224), (90, 400), (23, 31), (601, 450)):
        im = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        ref = reference_preprocess(im, spec)
        own = encoder.preprocess(im).numpy()
        if ref.shape != own.shape:
            raise EncoderError(
                f"encoder {encoder.spec!r}: its preprocessing gives {own.shape} from a {w}x{h} image, the "
                f"described one ({_summary(spec)}) {ref.shape}; it cannot be written into the model's "
                f"metadata. Use fskd predict"
            )
        d = float(np.abs(ref - own).max())
        if d > worst:
            worst, where = d, f"{w}x{h}"
    if worst > PREPROCESS_TOLERANCE:
        raise EncoderError(
            f"encoder {encoder.spec!r}: its own preprocessing and the one fskd would write into the "
            f"model's metadata ({_summary(spec)}) differ by {worst:.2g} (normalised units, on a {where} "
            f"image; tolerance {PREPROCESS_TOLERANCE:g}), so a client following the metadata would "
            f"feed the model other pixels; nothing was written. Use fskd predict"
        )
    return worst


def _summary(spec: dict) -> str:
    keys = ("resize", "resize_rounding", "interpolation", "reducing_gap", "square", "crop", "crop_offset")
    return ", ".join(f"{k} {spec.get(k)}" for k in keys)


# -- recognising fskd's own files ----------------------------------------------------------------
def is_export_file(path: Path) -> bool:
    """True when ``path`` is a model file fskd export wrote (ONNX metadata or TorchScript extra file)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith(f"/extra/{TS_EXTRA}")), None)
                return name is not None and json.loads(z.read(name)).get("format") == FORMAT
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return any(p.key == "fskd_format" and p.value == FORMAT for p in model.metadata_props)
    except Exception:  # not a model file, unreadable, or onnx missing: not ours
        return False


# -- export ----------------------------------------------------------------------------------------
def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ConfigError(
            f"--format onnx needs the packages onnx and onnxruntime ({e.name} is missing): pip install 'fskd[export]'"
        ) from None
    return onnx, onnxruntime


def _write_onnx(model: Pipeline, example: torch.Tensor, path: Path, opset: int, meta: dict) -> None:
    onnx, _ = _onnx_modules()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices (see the module docstring)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["probabilities"],
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    m = onnx.load(str(path))
    m.producer_name, m.producer_version = "fskd", __version__
    m.doc_string = (
        f"fskd export: {meta['fskd']['method']} head on {meta['fskd']['encoder']}; images (n, 3, H, W) "
        f"preprocessed as metadata 'preprocess' says -> probabilities (n, C) over metadata 'class_names'"
    )
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v if isinstance(v, str) else json.dumps(v)
    onnx.save(m, str(path))


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    _, ort = _onnx_modules()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"images": x})[0]


def _onnx_parameters(path: Path) -> int:
    """The numbers the file stores: its initializers (the encoder's weights, batch norms folded
    in) and its floating-point constants (the head's tensors: a cache's keys and values, class
    weights, a bridge), which the exporter writes as Constant nodes."""
    import onnx
    from onnx import TensorProto

    m = onnx.load(str(path))
    n = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    for node in m.graph.node:
        if node.op_type == "Constant":
            n += sum(int(np.prod(a.t.dims)) for a in node.attribute if a.name == "value" and a.t.data_type in floats)
    return int(n)


def _torchscript_parameters(path: Path) -> int:
    """As :func:`_onnx_parameters`: the module's parameters and its floating-point tensor constants."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.jit.load(str(path), map_location="cpu")
    n = sum(p.numel() for p in m.parameters())
    for node in m.inlined_graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
            t = node.t("value")
            n += t.numel() if t.is_floating_point() else 0
    return int(n)


def _write_torchscript(model: Pipeline, example: torch.Tensor, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={TS_EXTRA: json.dumps(meta)})


def _run_torchscript(path: Path, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export (docs/cli/export.md)
        m = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def _verify(run, path: Path, model: Pipeline, shape: tuple[int, int, int]) -> float:
    """The largest probability difference between the file and the eager module on random batches of
    two sizes (a graph that baked the batch size in, or dropped a data-dependent step, fails)."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in (1, 3):
        x = torch.randn(n, *shape, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = run(path, x.numpy())
        if got.shape != ref.shape:
            return float("inf")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


FORMATS = {
    "onnx": (lambda m, x, p, cfg, meta: _write_onnx(m, x, p, cfg.opset, meta), _run_onnx),
    "torchscript": (lambda m, x, p, cfg, meta: _write_torchscript(m, x, p, meta), _run_torchscript),
}


def _attempt(
    fmt: str, model: Pipeline, example: torch.Tensor, path: Path, cfg: ExportConfig, meta: dict
) -> tuple[float, str]:
    """Write ``path`` in ``fmt`` and check it; returns (max difference, '') or (inf, why it failed)."""
    write, run = FORMATS[fmt]
    try:
        write(model, example, path, cfg, meta)
        diff = _verify(run, path, model, tuple(example.shape[1:]))
    except FskdError:
        raise
    except Exception as e:  # the exporter or the runtime could not express a step of the head
        return float("inf"), f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if not diff <= TOLERANCE:
        return diff, f"the file's probabilities differ from PyTorch's by {diff:.3g} (tolerance {TOLERANCE})"
    return diff, ""


def export(cfg: ExportConfig) -> ExportResult:
    """Run ``fskd export`` (see the module docstring)."""
    t0 = time.perf_counter()
    out = guard_output_file(
        cfg.out,
        "--out",
        is_export_file,
        cfg.force,
        "a model file written by fskd export",
        protect=(("--state", cfg.state), ("--store", cfg.store)),
    )
    if cfg.format == "onnx":
        _onnx_modules()  # before any work: say which package is missing
    clf = Classifier(cfg.state, cfg.store, device="cpu")
    enc = clf.encoder
    pre = describe_preprocess(enc)
    check_preprocess(enc, pre)
    from PIL import Image

    shape = tuple(enc.preprocess(Image.new("RGB", (64, 48))).shape)
    model = Pipeline(clf).eval()
    info = {
        **clf.describe(),
        "format": cfg.format,
        "input": {"name": "images", "shape": ["batch", *shape], "dtype": "float32"},
        "output": {"name": "probabilities", "shape": ["batch", len(clf.class_names)]},
        "fskd_version": __version__,
        "torch": torch.__version__,
    }
    meta = {"fskd_format": FORMAT, "class_names": clf.class_names, "preprocess": pre, "fskd": info}
    example = torch.zeros(2, *shape)
    try:
        with building(out) as tmp:
            diff, why = _attempt(cfg.format, model, example, tmp, cfg, meta)
            if why:
                other = next(f for f in FORMATS if f != cfg.format)
                check = tmp.with_name(tmp.name + f".{other}")
                try:
                    _, why_other = _attempt(other, model, example, check, cfg, meta)
                finally:
                    check.unlink(missing_ok=True)
                hint = (
                    f"--format {other} expresses it (checked)"
                    if not why_other
                    else f"--format {other} cannot either ({why_other}); fskd predict runs any head"
                )
                raise ConfigError(
                    f"the {clf.state.method} head of state {cfg.state} cannot be expressed in "
                    f"{cfg.format} ({why}); {hint}"
                )
            params = _onnx_parameters(tmp) if cfg.format == "onnx" else _torchscript_parameters(tmp)
    except KeyboardInterrupt:
        raise Interrupted(f"fskd export was interrupted; nothing was written to {out}") from None
    return ExportResult(
        out=str(out),
        format=cfg.format,
        bytes=out.stat().st_size,
        parameters=int(params),
        classes=len(clf.class_names),
        input_shape=["batch", *shape],
        preprocess=pre,
        method=clf.state.method,
        encoder=clf.encoder_spec,
        exporter="torch.onnx.export(dynamo=False)" if cfg.format == "onnx" else "torch.jit.trace",
        max_difference=float(diff),
        seconds=round(time.perf_counter() - t0, 3),
        class_names=clf.class_names,
    )
