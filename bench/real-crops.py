"""A folder of Market-sized (64 x 128) JPEG crops of real photographs, for
`reid bench loader`: scikit-image's public-domain and CC0 sample photographs
(see tests/fixtures/real_photos/LICENSES.md), cut at random places and scales,
saved at JPEG quality 85-95 with 4:2:0 chroma, and listed in a dataset.csv that
`reid index --dataset csv` reads (identities of 8 crops each, all in train, plus
a small query and gallery).

Usage: python bench/real-crops.py OUT_DIR [COUNT]   (pip install scikit-image pillow)
then:  reid index --dataset csv --root OUT_DIR --out OUT_DIR/m.parquet
       reid bench loader --manifest OUT_DIR/m.parquet
"""
import os
import random
import sys

import skimage
from PIL import Image

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]


def main(out, count):
    rng = random.Random(0)
    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    photos = [Image.open(os.path.join(data, p)).convert("RGB") for p in PHOTOS]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rows = ["path,pid,camid,split"]
    for i in range(count):
        photo = photos[i % len(photos)]
        w = rng.randint(40, min(photo.width, photo.height // 2))
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - 2 * w)
        crop = photo.crop((x, y, x + w, y + 2 * w)).resize((64, 128), Image.BILINEAR)
        name = f"images/{i:05d}.jpg"
        crop.save(os.path.join(out, name), quality=rng.randint(85, 95))
        pid, split = i // 8 + 1, "train"
        if i >= count - 32:
            split = "query" if i % 2 == 0 else "gallery"
        rows.append(f"{name},{pid},{i % 2},{split}")
    with open(os.path.join(out, "dataset.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4096)
