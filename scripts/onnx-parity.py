"""Features of `reid extract` against onnxruntime fed PIL/torchvision inputs.

Usage: python scripts/onnx-parity.py MODEL.onnx GALLERY.safetensors
         (pip install onnxruntime pillow numpy safetensors)

GALLERY is a file `reid extract` wrote (without --flip) from the checkpoint that
`reid export` turned into MODEL; its metadata names the images and their root.
Each image goes through the convention of torchreid and fast-reid (PIL decode,
Resize((H, W)) with the model's filter, ToTensor, Normalize) into onnxruntime;
prints the largest difference relative to each feature's largest value.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from safetensors import safe_open


def main(model_path, gallery_path):
    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    h, w = (int(v) for v in meta["reid.input_size"].split("x"))
    flag = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[meta.get("reid.input_interpolation", "bilinear")]
    mean = np.array(meta["reid.input_mean"].split(","), np.float32)
    std = np.array(meta["reid.input_std"].split(","), np.float32)
    with safe_open(gallery_path, "np") as f:
        info = f.metadata()
        ours = f.get_tensor("features")
    if info.get("flip") == "true":
        sys.exit("the gallery was extracted with --flip; extract without it")
    root, paths = info["data_root"], json.loads(info["paths"])
    sess = ort.InferenceSession(model_path)
    worst = 0.0
    for i, p in enumerate(paths):
        img = Image.open(os.path.join(root, p)).convert("RGB").resize((w, h), flag)
        x = (np.asarray(img).astype(np.float32) / np.float32(255) - mean) / std
        theirs = sess.run(["features"], {"images": x.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
        worst = max(worst, float(np.abs(theirs - ours[i]).max() / np.abs(theirs).max()))
    print(json.dumps({"images": len(paths), "max_relative_difference": worst}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
