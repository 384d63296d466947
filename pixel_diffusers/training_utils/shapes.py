"""The synthetic "shapes" dataset and the pixel classifiers that score prompt adherence on it.

Each image is one flat-coloured shape (circle, square or triangle) of random size and position on a flat background;
the caption names all three attributes ("a red circle on a blue background"). A few shape/colour combinations are
held out of training, so a model that follows its prompt must compose attributes it has only seen apart.

The classifiers need no training: the background is the median colour of the image border, the foreground is every
pixel far from it, its colour is the nearest palette entry to the foreground median, and the shape follows from how
much of its bounding box the foreground fills (square 1, circle pi/4, triangle 1/2).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

# Every colour can be a background; a shape is never drawn in its background's colour.
BACKGROUNDS: tuple[str, ...] = tuple(COLORS)

# (shape, colour) pairs never rendered by the training split; prompts for them measure composition.
HELD_OUT: tuple[tuple[str, str], ...] = (("circle", "yellow"), ("square", "blue"), ("triangle", "red"))

# Fill ratio of the bounding box separating the shapes: triangle 0.5 | circle 0.785 | square 1.0.
_TRIANGLE_CIRCLE_SPLIT = 0.64
_CIRCLE_SQUARE_SPLIT = 0.89


def caption(shape: str, color: str, background: str) -> str:
    """The training caption of one image, e.g. "a red circle on a blue background"."""
    return f"a {color} {shape} on a {background} background"


def class_names() -> list[str]:
    """Names of the (shape, colour) classes, indexed by `class_label` (e.g. "red circle")."""
    return [f"{color} {shape}" for shape in SHAPES for color in COLORS]


def class_label(shape: str, color: str) -> int:
    """The class index of a (shape, colour) pair: shape-major over `SHAPES` x `COLORS`."""
    return SHAPES.index(shape) * len(COLORS) + list(COLORS).index(color)


def render_shape(shape: str, color: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Draws one `size` x `size` RGB image; the shape spans 45-75% of the side at a random position."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}.")
    for name, value in (("color", color), ("background", background)):
        if value not in COLORS:
            raise ValueError(f"{name}={value!r} is not one of {tuple(COLORS)}.")
    if color == background:
        raise ValueError(f"color and background must differ, got {color!r} for both.")
    # Draw at 4x and downsample, so that edges are anti-aliased like a real photograph's.
    scale = 4
    canvas = size * scale
    image = Image.new("RGB", (canvas, canvas), COLORS[background])
    extent = rng.uniform(0.45, 0.75) * canvas
    left = rng.uniform(0.05 * canvas, 0.95 * canvas - extent)
    top = rng.uniform(0.05 * canvas, 0.95 * canvas - extent)
    box = (left, top, left + extent, top + extent)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)], fill=COLORS[color])
    return image.resize((size, size), Image.BOX)


def training_combinations(held_out=HELD_OUT) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) triple of the training split."""
    held_out = set(held_out)
    return [
        (shape, color, background)
        for shape in SHAPES
        for color in COLORS
        for background in BACKGROUNDS
        if color != background and (shape, color) not in held_out
    ]


class ShapesDataset(torch.utils.data.Dataset):
    """`num_samples` rendered images with captions; item i is the same image on every machine (seeded by `seed`, i).

    Items are dicts with "image" (PIL), "caption", "class_label", "shape", "color" and "background", the same keys
    the folder and `datasets` loaders of `pixel_diffusers.training_utils.data` produce.
    """

    def __init__(self, num_samples: int, size: int = 32, seed: int = 0, held_out=HELD_OUT):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}.")
        self.num_samples = num_samples
        self.size = size
        self.seed = seed
        self.combinations = training_combinations(held_out)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index))
        shape, color, background = self.combinations[rng.integers(len(self.combinations))]
        return {
            "image": render_shape(shape, color, background, self.size, rng),
            "caption": caption(shape, color, background),
            "class_label": class_label(shape, color),
            "shape": shape,
            "color": color,
            "background": background,
        }

    def size_of(self, index: int) -> tuple[int, int]:
        """(height, width) of item `index` without rendering it (used for bucketing)."""
        return self.size, self.size


def _as_uint8(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
    return array


def _nearest_color(rgb: np.ndarray) -> str:
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    return list(COLORS)[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def foreground_mask(image) -> np.ndarray:
    """Boolean (H, W) mask of the pixels far from the border's median colour."""
    array = _as_uint8(image).astype(np.float64)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    distance = np.linalg.norm(array - np.median(border, axis=0), axis=-1)
    return distance > 60.0


def classify_background(image) -> str:
    """Palette name of the image border's median colour."""
    array = _as_uint8(image).astype(np.float64)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return _nearest_color(np.median(border, axis=0))


def classify_color(image) -> str | None:
    """Palette name of the foreground's median colour, or None when there is no foreground."""
    mask = foreground_mask(image)
    if mask.sum() < 4:
        return None
    return _nearest_color(np.median(_as_uint8(image)[mask].astype(np.float64), axis=0))


def classify_shape(image) -> str | None:
    """"circle", "square" or "triangle" from the foreground's fill of its bounding box, or None without foreground."""
    mask = foreground_mask(image)
    if mask.sum() < 4:
        return None
    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box_area
    if fill < _TRIANGLE_CIRCLE_SPLIT:
        return "triangle"
    return "circle" if fill < _CIRCLE_SQUARE_SPLIT else "square"


def evaluation_prompts(num_images: int, seed: int = 0, include_held_out: bool = True) -> list[tuple[str, str, str]]:
    """`num_images` (shape, colour, background) triples cycling over every combination in a seeded order.

    Held-out (shape, colour) pairs are included unless `include_held_out=False` (a class-conditional model never saw
    their class label, so it cannot be asked for them).
    """
    held_out = set(HELD_OUT)
    combos = [
        (shape, color, background)
        for shape in SHAPES
        for color in COLORS
        for background in BACKGROUNDS
        if color != background and (include_held_out or (shape, color) not in held_out)
    ]
    order = np.random.default_rng(seed).permutation(len(combos))
    return [combos[order[i % len(combos)]] for i in range(num_images)]


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "HELD_OUT",
    "SHAPES",
    "ShapesDataset",
    "caption",
    "class_label",
    "class_names",
    "classify_background",
    "classify_color",
    "classify_shape",
    "evaluation_prompts",
    "foreground_mask",
    "render_shape",
    "training_combinations",
]
