"""A Pick-a-Pic-format dataset with one row of every kind a real user-made dataset throws at a trainer.

    python tools/make_hostile_data.py --output_dir hostile-pairs

Usable odd rows (must be repaired and trained on): grayscale, RGBA, palette, CMYK, 16-bit, EXIF-rotated and
tiny images, and a caption longer than CLIP's 77 tokens. Unusable rows (must be skipped and counted by
reason): undecodable bytes, truncated JPEG, a missing image, a missing caption, labels outside {0, 0.5, 1},
labels not summing to 1, and a tie. `PLANTED` says how many of each the file holds.
"""

import argparse
import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tools.make_preference_data import caption_of, corrupt_scene, draw_scene, random_scene

# What the trainer must report for this dataset: rows dropped up front, and rows found bad while decoding.
PLANTED = {
    "ties": 1, "invalid_labels": 2, "bad_caption": 1,            # read from the caption and label columns
    "missing_image": 1, "undecodable_image": 2,                   # found when the images are decoded
    "truncated_caption": 1,                                       # used, with the caption cut to 77 tokens
}
ODD_KINDS = ("grayscale", "rgba", "palette", "cmyk", "sixteen_bit", "exif_rotated", "tiny", "long_caption")


def encode(image, image_format="PNG", **save_options):
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


def odd_image(kind, jpeg_bytes):
    """Re-encode a normal scene as one of the odd-but-usable kinds."""
    image = Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")
    if kind == "grayscale":
        return encode(image.convert("L"), "JPEG")
    if kind == "rgba":
        rgba = image.convert("RGBA")
        rgba.putalpha(200)
        return encode(rgba)
    if kind == "palette":
        return encode(image.convert("P", palette=Image.ADAPTIVE, colors=16))
    if kind == "cmyk":
        return encode(image.convert("CMYK"), "JPEG")
    if kind == "sixteen_bit":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        return encode(Image.fromarray(gray))  # uint16 array -> mode "I;16"
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        return encode(image.transpose(Image.ROTATE_90), "JPEG", exif=exif.tobytes())
    if kind == "tiny":
        return encode(image.resize((16, 12)), "JPEG")
    return jpeg_bytes  # long_caption: the image is normal


def make_hostile_dataset(output_dir, image_size=64, seed=0, num_clean_pairs=8):
    """Write the hostile dataset as one parquet file; returns (folder, PLANTED counts, number of usable pairs)."""
    rng = random.Random(seed)
    rows = []

    def scene_pair():
        scene = random_scene(rng)
        good = draw_scene(scene, (image_size, image_size), rng)
        bad = draw_scene(corrupt_scene(scene, rng), (image_size, image_size), rng)
        return caption_of(scene), good, bad

    def add(caption, image_0, image_1, label_0, label_1):
        rows.append({"caption": caption, "jpg_0": image_0, "jpg_1": image_1, "label_0": label_0, "label_1": label_1})

    for _ in range(num_clean_pairs):
        caption, good, bad = scene_pair()
        add(caption, good, bad, 1.0, 0.0)
    for kind in ODD_KINDS:
        caption, good, bad = scene_pair()
        if kind == "long_caption":
            caption = ", ".join([caption] * 12)  # ~130 tokens
        add(caption, odd_image(kind, good), bad, 1.0, 0.0) if rng.random() < 0.5 else add(
            caption, bad, odd_image(kind, good), 0.0, 1.0)
    caption, good, bad = scene_pair()
    add(caption, good, bad, 0.5, 0.5)                               # tie
    caption, good, bad = scene_pair()
    add(caption, good, bad, 0.7, 0.3)                               # label outside {0, 0.5, 1}
    caption, good, bad = scene_pair()
    add(caption, good, bad, 1.0, 1.0)                               # labels not summing to 1
    _, good, bad = scene_pair()
    add(None, good, bad, 1.0, 0.0)                                  # missing caption
    caption, good, bad = scene_pair()
    add(caption, None, bad, 1.0, 0.0)                               # missing image
    caption, good, bad = scene_pair()
    add(caption, b"\x00not an image at all", bad, 1.0, 0.0)         # undecodable bytes
    caption, good, bad = scene_pair()
    add(caption, good[: len(good) // 2], bad, 1.0, 0.0)             # truncated JPEG

    rng.shuffle(rows)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64())])
    os.makedirs(output_dir, exist_ok=True)
    table = pa.table({name: [row[name] for row in rows] for name in schema.names}, schema=schema)
    pq.write_table(table, os.path.join(output_dir, "train-00000-of-00001.parquet"))
    usable_pairs = num_clean_pairs + len(ODD_KINDS) + PLANTED["missing_image"] + PLANTED["undecodable_image"]
    return str(output_dir), dict(PLANTED), usable_pairs


def main():
    parser = argparse.ArgumentParser(description="Write a Pick-a-Pic-format dataset full of hostile rows.")
    parser.add_argument("--output_dir", required=True, help="Folder for the parquet file.")
    parser.add_argument("--image_size", type=int, default=64, help="Side of the normal images, in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the scenes and the row order.")
    args = parser.parse_args()
    path, planted, usable = make_hostile_dataset(args.output_dir, args.image_size, args.seed)
    print(json.dumps({"path": path, "planted": planted, "rows_passing_label_and_caption_checks": usable}))


if __name__ == "__main__":
    main()
