"""The miniature world of `make toy`: captioned pictures of one coloured shape, a reward, and a caption checker.

A scene is one shape (circle, square or triangle) in one of four colours on a white or black background:
3 x 4 x 2 = 24 captions such as "a red circle on a black background". The caption names the shape, its colour
and the background; it does not say where the shape is or how big it is. In the training pictures the shape's
size and place are uniform at random (radius 5-8 px in a 32 x 32 picture, anywhere it fits).

The reward (the "human" whose preferences DPO learns) is centredness, a property the captions leave open:

    reward(image) = 1 - d / d_max

d is the distance in pixels from the image centre to the centroid of the foreground (pixels that differ from
the background colour, which is read off the image's border), d_max half the image diagonal; 1 is a perfectly
centred shape, 0 a shape in a corner or no shape at all. The base model draws shapes anywhere, like its
training pictures, so pairs sampled from it disagree on the reward, and a model that learnt the preference
centres its shapes while still drawing what the caption says.

Caption fidelity checks exactly what the caption says, programmatically, with no learned model:
- background: the median colour of the border, snapped to the nearest palette colour;
- shape colour: the median colour of the foreground, snapped the same way;
- shape: the circle, square or triangle, drawn into the foreground's bounding box, that overlaps the foreground
  best (intersection over union).
An image is faithful when all three match the caption and the foreground is large enough to be a shape.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

from fixtures.make_preference_data import COLORS, SHAPES, with_article


IMAGE_SIZE = 32
SHAPE_COLORS = ("red", "green", "blue", "yellow")
BACKGROUND_COLORS = ("white", "black")
RADIUS_RANGE = (5.0, 8.0)  # half the shape's extent, in pixels of the 32-pixel picture
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled: smooth edges, sub-pixel positions

# Caption checker thresholds, calibrated on rendered scenes (tests/test_toy.py checks every caption).
FOREGROUND_DISTANCE = 80.0  # RGB distance from the background colour above which a pixel is foreground
MIN_FOREGROUND_PIXELS = 12  # fewer than this and there is no shape to speak of

PALETTE_NAMES = tuple(sorted(COLORS))
PALETTE = np.array([COLORS[name] for name in PALETTE_NAMES], dtype=np.float64)


def caption_of(shape, shape_color, background_color):
    """E.g. "a red circle on a black background"."""
    return f"{with_article(f'{shape_color} {shape}')} on {with_article(background_color)} background"


def all_scenes():
    """Every (shape, shape colour, background colour) of the world, in a fixed order."""
    return [(shape, color, background) for background in BACKGROUND_COLORS for color in SHAPE_COLORS
            for shape in SHAPES]


CAPTIONS = {caption_of(*scene): scene for scene in all_scenes()}


def parse_caption(caption):
    """(shape, shape colour, background colour) of one of the world's captions."""
    if caption not in CAPTIONS:
        raise ValueError(f"{caption!r} is not a caption of the toy world; captions look like "
                         f"{next(iter(CAPTIONS))!r}.")
    return CAPTIONS[caption]


def render(shape, shape_color, background_color, center, radius, size=IMAGE_SIZE):
    """Draw one scene: `center` (x, y) and `radius` in pixels of the `size` x `size` picture."""
    scale = SUPERSAMPLE
    image = Image.new("RGB", (size * scale, size * scale), COLORS[background_color])
    draw = ImageDraw.Draw(image)
    x, y, r = center[0] * scale, center[1] * scale, radius * scale
    fill = COLORS[shape_color]
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "triangle":  # apex up
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; the world has {', '.join(SHAPES)}.")
    return image.resize((size, size), Image.Resampling.BOX)


def random_scene_image(rng, size=IMAGE_SIZE):
    """(image, caption) of a uniformly random scene: any caption, any size in RADIUS_RANGE, anywhere it fits."""
    shape, shape_color, background_color = all_scenes()[rng.integers(len(CAPTIONS))]
    radius = rng.uniform(*RADIUS_RANGE) * size / IMAGE_SIZE
    center = rng.uniform(radius + 1, size - radius - 1, size=2)
    return render(shape, shape_color, background_color, center, radius, size), caption_of(shape, shape_color,
                                                                                          background_color)


def nearest_palette_color(rgb):
    return PALETTE_NAMES[int(np.argmin(((PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)))]


def analyse(image):
    """What the caption checker and the reward see in one picture (a dict)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)
    foreground = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=-1)) > FOREGROUND_DISTANCE
    found = {"background": nearest_palette_color(background_rgb), "foreground_pixels": int(foreground.sum()),
             "color": None, "shape": None, "shape_iou": None, "centroid": None}
    if found["foreground_pixels"] < MIN_FOREGROUND_PIXELS:
        return found
    rows, columns = np.nonzero(foreground)
    found["color"] = nearest_palette_color(np.median(pixels[foreground], axis=0))
    box = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
    ious = {shape: mask_iou(foreground, shape_mask(shape, box, (width, height))) for shape in SHAPES}
    found["shape"] = max(ious, key=ious.get)
    found["shape_iou"] = ious[found["shape"]]
    # Pixel centres sit at index + 0.5, so the centre of the picture is (width / 2, height / 2).
    found["centroid"] = (float(columns.mean() + 0.5), float(rows.mean() + 0.5))
    return found


def shape_mask(shape, box, size):
    """Boolean mask of `shape` filling the pixel box (left, top, right, bottom), drawn as render() draws it."""
    scale = SUPERSAMPLE
    canvas = Image.new("L", (size[0] * scale, size[1] * scale), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = (coordinate * scale for coordinate in box)
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=255)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=255)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=255)
    return np.asarray(canvas.resize(size, Image.Resampling.BOX)) >= 128


def mask_iou(first, second):
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else 0.0


def centredness(image):
    """The toy reward of one picture: 1 - (distance of the foreground's centroid from the centre) / (half diagonal)."""
    found = analyse(image)
    if found["centroid"] is None:
        return 0.0
    width, height = image.size
    distance = math.hypot(found["centroid"][0] - width / 2, found["centroid"][1] - height / 2)
    return 1.0 - distance / math.hypot(width / 2, height / 2)


def centredness_reward(images, captions):
    """The reward in the form tools/relabel_pairs.py and tools/evaluate.py take (`--reward_fn`)."""
    return [centredness(image) for image in images]


def caption_fidelity(image, caption):
    """Whether the picture shows what the caption says, attribute by attribute (a dict of bools, plus "all")."""
    shape, shape_color, background_color = parse_caption(caption)
    found = analyse(image)
    checks = {"background": found["background"] == background_color, "color": found["color"] == shape_color,
              "shape": found["shape"] == shape}
    checks["all"] = all(checks.values())
    return checks


def fidelity_rates(checks):
    """Per-attribute rates (and "all") over a list of caption_fidelity() results."""
    return {name: float(np.mean([check[name] for check in checks])) for name in checks[0]}
