"""How the synthetic world looks: its shapes, colours and sizes, drawn with PIL.

`render` paints a scene's objects (dicts with name, colour, size, texture, x, y) on the background;
`mask` is an object's drawn pixels, from which `flowlib.data.scenes` takes its tight boxes.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SIZES = {"small": 56, "large": 96}
BACKGROUND = (232, 232, 226)


_POLYGONS = {
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "cross": [
        (0.32, 0),
        (0.68, 0),
        (0.68, 0.32),
        (1, 0.32),
        (1, 0.68),
        (0.68, 0.68),
        (0.68, 1),
        (0.32, 1),
        (0.32, 0.68),
        (0, 0.68),
        (0, 0.32),
        (0.32, 0.32),
    ],
}


def _star() -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    pts = (pts - pts.min(0)) / (pts.max(0) - pts.min(0))  # fill the unit square in both directions
    return [tuple(p) for p in pts]


_POLYGONS["star"] = _star()


@functools.cache
def mask(shape: str, side: int) -> Image.Image:
    drawn = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(drawn)
    if shape == "circle":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, side - 1, side - 1], fill=255)
    else:
        draw.polygon([(x * (side - 1), y * (side - 1)) for x, y in _POLYGONS[shape]], fill=255)
    return drawn


@functools.cache
def patch(color: str, texture: str, side: int) -> Image.Image:
    rgb = np.empty((side, side, 3), np.uint8)
    rgb[:] = COLORS[color]
    yy, xx = np.mgrid[0:side, 0:side]
    # Bands and dots of 10 px stay 4 px wide after the 0.4 downscale, so texture survives it.
    if texture == "striped":
        rgb[(yy // 10) % 2 == 1] = (np.array(COLORS[color]) * 0.35).astype(np.uint8)
    elif texture == "dotted":
        rgb[((xx % 20) - 10) ** 2 + ((yy % 20) - 10) ** 2 <= 25] = (25, 25, 25)
    return Image.fromarray(rgb)


def render(width: int, height: int, objects: list[dict]) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUND)
    for obj in objects:
        side = SIZES[obj["size"]]
        image.paste(patch(obj["color"], obj["texture"], side), (obj["x"], obj["y"]), mask(obj["name"], side))
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast; flat colours compress well anyway
    return buffer.getvalue()
