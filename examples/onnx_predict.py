"""Classify images with a model written by `fskd export --format onnx`, using only onnxruntime,
Pillow and numpy (no torch, no fskd):

    python examples/onnx_predict.py model.onnx bird1.jpg bird2.png ...

prints one line per image: path<TAB>class<TAB>probability. The class names and the preprocessing
(resize, centre crop, mean, std, interpolation: torchvision's conventions, or those of a student
written by `fskd distill`) are read from the model file's metadata.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def load_rgb(path):
    """The image as a viewer shows it: EXIF orientation applied, transparency on white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return im.convert("RGB")


def resized_size(w, h, p):
    """The (width, height) the metadata's `resize` gives a w x h image."""
    if not isinstance(p["resize"], int):  # [height, width]
        return p["resize"][1], p["resize"][0]
    s = p["resize"]
    if p.get("resize_rounding") == "round":  # fskd's distilled students: the longer side rounded
        f = s / min(w, h)
        return max(s, int(round(w * f))), max(s, int(round(h * f)))
    return (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # torchvision: truncated


def center_crop(im, ch, cw, offset):
    w, h = im.size
    if offset == "floor":  # fskd's distilled students
        top, left = (h - ch) // 2, (w - cw) // 2
    else:  # torchvision's CenterCrop
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return im.crop((left, top, left + cw, top + ch))


def preprocess(im, p):
    """PIL RGB image -> (3, H, W) float32: resize, centre crop(s), pixels / 255, (x - mean) / std."""
    if p["resize"] is not None:
        size = resized_size(*im.size, p)
        if size != im.size:
            resample = getattr(Image.Resampling, p["interpolation"].upper())
            im = im.resize(size, resample, reducing_gap=p.get("reducing_gap"))
    if p.get("square"):  # the centre square first (a distilled student's stored view), then `crop` from it
        im = center_crop(im, p["square"], p["square"], "floor")
    if p["crop"] is not None:
        im = center_crop(im, *p["crop"], p.get("crop_offset", "round"))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)
    return x.transpose(2, 0, 1)


def main(model_path, image_paths, batch_size=32):
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    names, prep = json.loads(meta["class_names"]), json.loads(meta["preprocess"])
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start : start + batch_size]
        batch = np.stack([preprocess(load_rgb(p), prep) for p in paths])
        probs = session.run(["probabilities"], {"images": batch})[0]
        for path, row in zip(paths, probs, strict=True):
            best = int(row.argmax())
            print(f"{path}\t{names[best]}\t{row[best]:.6f}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python onnx_predict.py MODEL.onnx IMAGE [IMAGE ...]")
    main(sys.argv[1], sys.argv[2:])
