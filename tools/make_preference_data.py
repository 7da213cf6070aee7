"""Write a small synthetic preference dataset in Pick-a-Pic v2's format, as parquet, with no download.

    python tools/make_preference_data.py --output_dir tiny-pickapic
    python tools/make_preference_data.py --output_dir tiny-pairs --layout chosen_rejected --non_square

Each row pairs two images drawn with PIL for one caption: a coloured shape (circle, square, triangle) on
a coloured background at a position, e.g. "a red circle on a blue background, top left". The preferred
image matches the caption; the other gets one attribute wrong (shape, its colour, the background colour
or the position), so the data carries a preference a model can learn, and a trained model's samples
can be checked against the caption.

Layouts (columns as the real datasets store them; images are raw JPEG bytes in a binary column):
  pickapic         caption, jpg_0, jpg_1, label_0, label_1. The winner sits in slot 0 or 1 at random
                   (labels 1.0/0.0 or 0.0/1.0); tie rows have 0.5/0.5, as in yuvalkirstain/pickapic_v2.
  chosen_rejected  prompt, chosen, rejected. No labels, so no ties.

Rows whose images don't decode (--num_undecodable) carry valid labels but garbage bytes in one image
column, to test that a loader survives the broken rows real scraped data contains.
The folder loads with `datasets.load_dataset(output_dir, split="train")`.
"""

import argparse
import glob
import io
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw


LAYOUTS = ("pickapic", "chosen_rejected")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 210),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 175),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Centre of the shape as a fraction of (width, height).
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
ATTRIBUTES = ("shape", "shape_color", "background_color", "position")
JPEG_QUALITY = 90
# Prefix of the bytes planted in undecodable rows; no image format starts like this.
UNDECODABLE_PREFIX = b"NOT-AN-IMAGE:"


def random_scene(rng):
    """A caption's content: which shape, its colour, the background colour (a different one), where."""
    shape_color, background_color = rng.sample(sorted(COLORS), 2)
    return {
        "shape": rng.choice(SHAPES),
        "shape_color": shape_color,
        "background_color": background_color,
        "position": rng.choice(sorted(POSITIONS)),
    }


def with_article(word):
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption_of(scene):
    """E.g. "a red circle on an orange background, top left"."""
    shape = with_article(f"{scene['shape_color']} {scene['shape']}")
    background = with_article(scene["background_color"])
    return f"{shape} on {background} background, {scene['position']}"


def corrupt_scene(scene, rng):
    """Copy of `scene` with exactly one attribute changed, keeping the shape visible on its background."""
    wrong = dict(scene)
    attribute = rng.choice(ATTRIBUTES)
    if attribute == "shape":
        wrong["shape"] = rng.choice([shape for shape in SHAPES if shape != scene["shape"]])
    elif attribute == "position":
        wrong["position"] = rng.choice([name for name in sorted(POSITIONS) if name != scene["position"]])
    else:
        # A new colour that differs from both the old one and the other colour in the scene.
        taken = {scene["shape_color"], scene["background_color"]}
        wrong[attribute] = rng.choice([color for color in sorted(COLORS) if color not in taken])
    return wrong


def image_sizes(image_size, non_square):
    """(width, height) choices: square, or four non-square aspect ratios around image_size (multiples of 8)."""
    if not non_square:
        return [(image_size, image_size)]
    long_side = round(image_size * 1.5 / 8) * 8  # 96 for 64
    mid_side = round(image_size * 1.25 / 8) * 8  # 80 for 64
    return [(long_side, image_size), (image_size, mid_side), (mid_side, image_size), (image_size, long_side)]


def draw_scene(scene, size, rng):
    """Render `scene` at `size` (width, height) as JPEG bytes, with a little jitter so no two images match."""
    width, height = size
    image = Image.new("RGB", size, jitter_color(COLORS[scene["background_color"]], rng))
    draw = ImageDraw.Draw(image)

    fraction_x, fraction_y = POSITIONS[scene["position"]]
    center_x = fraction_x * width + rng.uniform(-0.04, 0.04) * width
    center_y = fraction_y * height + rng.uniform(-0.04, 0.04) * height
    radius = min(width, height) * rng.uniform(0.16, 0.22)  # small enough to stay inside the image
    fill = jitter_color(COLORS[scene["shape_color"]], rng)
    box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)
    if scene["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif scene["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle, apex up
        apex = (center_x, center_y - radius)
        draw.polygon([apex, (center_x + radius, center_y + radius), (center_x - radius, center_y + radius)], fill=fill)

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def jitter_color(rgb, rng, amount=12):
    return tuple(min(255, max(0, channel + rng.randint(-amount, amount))) for channel in rgb)


def undecodable_bytes(rng):
    return UNDECODABLE_PREFIX + bytes(rng.randrange(256) for _ in range(64))


def make_pair(rng, sizes, kind):
    """One preference pair as (caption, preferred_jpeg, other_jpeg, is_tie).

    kind: "pair" (winner matches the caption, loser has one attribute wrong), "tie" (both match),
    or "undecodable" (a pair whose preferred or other image is replaced by garbage bytes).
    """
    scene = random_scene(rng)
    # Winner and loser draw their sizes independently, so with non_square they may differ.
    preferred = draw_scene(scene, rng.choice(sizes), rng)
    other_scene = scene if kind == "tie" else corrupt_scene(scene, rng)
    other = draw_scene(other_scene, rng.choice(sizes), rng)
    if kind == "undecodable":
        if rng.random() < 0.5:
            preferred = undecodable_bytes(rng)
        else:
            other = undecodable_bytes(rng)
    return caption_of(scene), preferred, other, kind == "tie"


def rows_to_table(pairs, layout, rng):
    """Arrange pairs into the layout's columns (pickapic: winner in a random slot)."""
    if layout == "chosen_rejected":
        return pa.table(
            {
                "prompt": pa.array([caption for caption, _, _, _ in pairs], pa.string()),
                "chosen": pa.array([preferred for _, preferred, _, _ in pairs], pa.binary()),
                "rejected": pa.array([other for _, _, other, _ in pairs], pa.binary()),
            }
        )

    columns = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for caption, preferred, other, is_tie in pairs:
        winner_in_slot_0 = rng.random() < 0.5
        columns["caption"].append(caption)
        columns["jpg_0"].append(preferred if winner_in_slot_0 else other)
        columns["jpg_1"].append(other if winner_in_slot_0 else preferred)
        if is_tie:
            label_0 = label_1 = 0.5
        else:
            label_0, label_1 = (1.0, 0.0) if winner_in_slot_0 else (0.0, 1.0)
        columns["label_0"].append(label_0)
        columns["label_1"].append(label_1)
    # Pick-a-Pic v2's types: string caption, binary JPEG bytes, float64 labels.
    schema = pa.schema(
        [
            ("caption", pa.string()),
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.float64()),
            ("label_1", pa.float64()),
        ]
    )
    return pa.table(columns, schema=schema)


def make_preference_dataset(
    output_dir,
    num_pairs=32,
    num_ties=4,
    image_size=64,
    seed=0,
    layout="pickapic",
    non_square=False,
    num_undecodable=0,
    num_rows_per_file=None,
):
    """Write the dataset as train-XXXXX-of-YYYYY.parquet file(s) in `output_dir`; return the folder path.

    Rows: `num_pairs` usable pairs, `num_ties` ties (pickapic layout only; chosen_rejected cannot express
    a tie, so none are written there) and `num_undecodable` pairs with one garbage image, shuffled.
    `num_rows_per_file` splits the rows over several files (None: one file). Same seed, same bytes.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if min(num_pairs, num_ties, num_undecodable) < 0:
        raise ValueError("num_pairs, num_ties and num_undecodable must be >= 0")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if layout == "chosen_rejected":
        num_ties = 0
    num_rows = num_pairs + num_ties + num_undecodable
    if num_rows == 0:
        raise ValueError("the dataset would be empty: ask for at least one pair, tie or undecodable row")
    if num_rows_per_file is not None and num_rows_per_file < 1:
        raise ValueError(f"num_rows_per_file must be >= 1 or None, got {num_rows_per_file}")

    rng = random.Random(seed)
    sizes = image_sizes(image_size, non_square)
    kinds = ["pair"] * num_pairs + ["tie"] * num_ties + ["undecodable"] * num_undecodable
    rng.shuffle(kinds)  # spread ties and broken rows through the data, as in real dumps
    pairs = [make_pair(rng, sizes, kind) for kind in kinds]
    table = rows_to_table(pairs, layout, rng)

    os.makedirs(output_dir, exist_ok=True)
    # load_dataset reads every parquet file in the folder: remove shards of an earlier run first.
    for stale_file in glob.glob(os.path.join(output_dir, "train-*-of-*.parquet")):
        os.remove(stale_file)
    rows_per_file = num_rows if num_rows_per_file is None else num_rows_per_file
    num_files = -(-num_rows // rows_per_file)  # ceiling division
    for file_index in range(num_files):
        shard = table.slice(file_index * rows_per_file, rows_per_file)
        pq.write_table(shard, os.path.join(output_dir, f"train-{file_index:05d}-of-{num_files:05d}.parquet"))
    return str(output_dir)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Write a synthetic Pick-a-Pic-style preference dataset (parquet) of shapes and captions."
    )
    parser.add_argument("--output_dir", required=True, help="Folder for the parquet file(s); created if missing.")
    parser.add_argument(
        "--num_pairs",
        type=int,
        default=32,
        help="Usable pairs: a winner that matches the caption and a loser that doesn't.",
    )
    parser.add_argument(
        "--num_ties",
        type=int,
        default=4,
        help="Tie rows (labels 0.5/0.5, both images match). pickapic layout only: chosen_rejected cannot "
        "express a tie, so none are written there.",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=64,
        help="Side of the square images in pixels; with --non_square, the short side of the varied sizes.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed for scenes, sizes and slot order; same seed, same files."
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="pickapic",
        help="Columns to write: 'pickapic' (caption, jpg_0, jpg_1, label_0, label_1, as Pick-a-Pic v2) or "
        "'chosen_rejected' (prompt, chosen, rejected).",
    )
    parser.add_argument(
        "--non_square",
        action="store_true",
        help="Draw each image at a random non-square size (e.g. 96x64, 64x80 for --image_size 64); the two "
        "images of a pair may differ in size.",
    )
    parser.add_argument(
        "--num_undecodable",
        type=int,
        default=0,
        help="Extra rows with valid labels whose jpg_0 or jpg_1 (chosen or rejected) is garbage, not an image.",
    )
    parser.add_argument(
        "--num_rows_per_file",
        type=int,
        default=None,
        help="Split rows over several parquet files of at most this many rows (default: one file).",
    )
    return parser.parse_args(input_args)


def main(args):
    path = make_preference_dataset(
        args.output_dir,
        num_pairs=args.num_pairs,
        num_ties=args.num_ties,
        image_size=args.image_size,
        seed=args.seed,
        layout=args.layout,
        non_square=args.non_square,
        num_undecodable=args.num_undecodable,
        num_rows_per_file=args.num_rows_per_file,
    )
    print(f"Wrote {args.layout} preference dataset to {path}")


if __name__ == "__main__":
    main(parse_args())
