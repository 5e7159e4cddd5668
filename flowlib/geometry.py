"""Where each image token's patch comes from in the original image.

The processor turns an image of W x H pixels into one or more grids of
patches (LLaVA-1.5: one grid after padding or cropping; LLaVA-NeXT: a squashed
base view plus high-resolution tiles, trimmed of padding in token units, with
a newline token closing every row; Qwen2-VL / Qwen2.5-VL: one grid at the
image's own aspect, 2 x 2 patches merged per token; LLaVA-OneVision: NeXT's
layout with more tiles, pooled bilinearly when they hold too many tokens).
This module replays that geometry axis by axis so that a box in original
pixels maps to the exact image tokens it covers.

Coverage rule (used for "related image patches"): a patch is related to a box
when at least one of the patch's processed pixels takes its value, under
nearest-neighbour resampling, from an original pixel whose centre lies inside
the box. With nearest resampling this is exact (tests check it against a
geometric oracle); with the bicubic resampling the real checkpoints use it is
the same rule the official code approximates by painting the box red and
keeping the patches that contain a pure red pixel.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .sample import Box


def pil_nearest_source(old: int, new: int) -> np.ndarray:
    """For each of `new` output pixels along one axis, the source pixel PIL's NEAREST resize reads.

    Pillow accumulates the step in double precision (`ImagingScaleAffine`); a closed
    form such as floor((j + 0.5) * old / new) disagrees with it on exact ties.
    """
    step = old / new
    position = step * 0.5
    out = np.empty(new, dtype=np.int64)
    for j in range(new):
        out[j] = int(position)
        position += step
    return out


def _shift(source: np.ndarray, offset: int, size: int) -> np.ndarray:
    """Map padded-canvas indices to original indices (-1 where the canvas is padding)."""
    shifted = source - offset
    return np.where((shifted >= 0) & (shifted < size), shifted, -1)


def _paste(source: np.ndarray, offset: int, canvas: int) -> np.ndarray:
    """Place a resized axis at `offset` on a zero-padded canvas of `canvas` pixels (-1 = padding)."""
    out = np.full(canvas, -1, dtype=np.int64)
    out[offset : offset + len(source)] = source
    return out


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(..., default_to_square=False)`."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice of high-resolution canvas (height, width) for an image."""
    best, best_effective, best_wasted = None, 0, math.inf
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_h, cand_w), effective, wasted
    return best


def _box_pixel_range(start: float, length: float) -> tuple[int, int]:
    """Original pixel indices [lo, hi) whose centres lie in [start, start + length)."""
    return math.ceil(start - 0.5), math.ceil(start + length - 0.5)


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """One grid of patches and where its tokens sit inside the image-token block.

    `source_rows[i]` is the original pixel row that processed pixel row i of the
    grid reads (-1 for padding); likewise `source_cols`. Token (r, c) of the grid
    sits at offset `offset + r * row_stride + c` within the image-token block.
    """

    name: str
    source_rows: np.ndarray
    source_cols: np.ndarray
    patch_size: int
    offset: int
    row_stride: int

    @property
    def rows(self) -> int:
        return len(self.source_rows) // self.patch_size

    @property
    def cols(self) -> int:
        return len(self.source_cols) // self.patch_size

    def token_offsets(self) -> np.ndarray:
        r, c = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        return (self.offset + r * self.row_stride + c).ravel()

    def _axis_hits(self, source: np.ndarray, lo: int, hi: int) -> np.ndarray:
        inside = (source >= lo) & (source < hi)
        return inside.reshape(-1, self.patch_size).any(axis=1)

    def box_token_offsets(self, box: Box) -> np.ndarray:
        """Offsets of the grid's tokens whose patches the box covers (coverage rule above)."""
        rows = np.nonzero(self._axis_hits(self.source_rows, *_box_pixel_range(box.y, box.h)))[0]
        cols = np.nonzero(self._axis_hits(self.source_cols, *_box_pixel_range(box.x, box.w)))[0]
        r, c = np.meshgrid(rows, cols, indexing="ij")
        return (self.offset + r * self.row_stride + c).ravel()


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """All patch grids of one image, the newline slots and the total token count."""

    grids: tuple[PatchGrid, ...]
    newline_offsets: np.ndarray
    num_tokens: int

    def grid(self, name: str) -> PatchGrid:
        for grid in self.grids:
            if grid.name == name:
                return grid
        raise KeyError(f"no grid {name!r}; this image has {[g.name for g in self.grids]}")

    def patch_offsets(self) -> np.ndarray:
        return np.sort(np.concatenate([g.token_offsets() for g in self.grids]))

    def box_offsets(self, box: Box) -> np.ndarray:
        """Image-block offsets of every patch the box covers, in every grid (sorted, unique)."""
        return np.unique(np.concatenate([g.box_token_offsets(box) for g in self.grids]))


def llava15_geometry(width: int, height: int, image_size: int, patch_size: int, pad: bool) -> ImageGeometry:
    """LLaVA-1.5: pad to a square (original LLaVA) or resize the short side and centre-crop (llava-hf default)."""
    if pad:
        side = max(width, height)
        rows = _shift(pil_nearest_source(side, image_size), (side - height) // 2, height)
        cols = _shift(pil_nearest_source(side, image_size), (side - width) // 2, width)
    else:
        new_h, new_w = shortest_edge_size(height, width, image_size)
        top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
        rows = pil_nearest_source(height, new_h)[top : top + image_size]
        cols = pil_nearest_source(width, new_w)[left : left + image_size]
    grid = PatchGrid("image", rows, cols, patch_size, offset=0, row_stride=image_size // patch_size)
    return ImageGeometry((grid,), np.zeros(0, dtype=np.int64), grid.rows * grid.cols)


def _fit_canvas(width: int, height: int, canvas_h: int, canvas_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns of the image resized into the canvas, aspect kept, on centred zero padding.

    As transformers' get_patch_output_size, for LLaVA-NeXT's and OneVision's anyres canvases.
    """
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        new_w, new_h = canvas_w, min(math.ceil(height * scale_w), canvas_h)
    else:
        new_h, new_w = canvas_h, min(math.ceil(width * scale_h), canvas_w)
    rows = _paste(pil_nearest_source(height, new_h), (canvas_h - new_h) // 2, canvas_h)
    cols = _paste(pil_nearest_source(width, new_w), (canvas_w - new_w) // 2, canvas_w)
    return rows, cols


def _unpad_tokens(rows: np.ndarray, cols: np.ndarray, width: int, height: int, patch_size: int):
    """`rows` and `cols` less the padding the model trims from the tiles' token map.

    The model trims in token units (modeling_llava_next.unpad_image), not in pixels: whole token rows or
    columns, as many as the original image's aspect leaves over.
    """
    tokens_h, tokens_w = len(rows) // patch_size, len(cols) // patch_size
    if width / height > tokens_w / tokens_h:
        kept = int(round(height * (tokens_w / width), 7))
        trim = (tokens_h - kept) // 2
        rows = rows[trim * patch_size : (tokens_h - trim) * patch_size]
    else:
        kept = int(round(width * (tokens_h / height), 7))
        trim = (tokens_w - kept) // 2
        cols = cols[trim * patch_size : (tokens_w - trim) * patch_size]
    return rows, cols


def llava_next_geometry(width: int, height: int, image_size: int, patch_size: int, pinpoints) -> ImageGeometry:
    """LLaVA-NeXT anyres: squashed base view, then high-resolution tiles trimmed in token units, newline per row."""
    base = PatchGrid(
        "base_view",
        pil_nearest_source(height, image_size),
        pil_nearest_source(width, image_size),
        patch_size,
        offset=0,
        row_stride=image_size // patch_size,
    )
    rows, cols = _fit_canvas(width, height, *select_best_resolution(height, width, pinpoints))
    rows, cols = _unpad_tokens(rows, cols, width, height, patch_size)
    base_tokens = base.rows * base.cols
    stride = len(cols) // patch_size + 1
    high = PatchGrid("high_resolution", rows, cols, patch_size, offset=base_tokens, row_stride=stride)
    newlines = base_tokens + np.arange(high.rows) * stride + high.cols
    return ImageGeometry((base, high), newlines, base_tokens + high.rows * stride)


#: The colour the official code paints the question's boxes with on its mask image.
PAINT = (255, 0, 0)


def painted_patch_offsets(image_processor, geometry: ImageGeometry, width: int, height: int, boxes) -> np.ndarray:
    """The official code's related patches: image-block offsets of the patches holding a pure red pixel.

    The boxes are painted pure red (PIL `rectangle` over [x, y, x + w, y + h], ends included) on a black
    `width` x `height` image, which runs through the very same image processor as the image, with
    rescaling and normalisation off; a patch is related when one of its processed pixels is exactly
    (255, 0, 0). Bicubic resampling blurs the edges, so a box under about two processed pixels wide may
    leave no pure red pixel at all (`geometry`'s coverage rule still maps it).
    """
    from PIL import Image, ImageDraw

    mask = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.rectangle([box.x, box.y, box.x1, box.y1], fill=PAINT)
    pixels = image_processor(mask, do_normalize=False, do_rescale=False, return_tensors="np")["pixel_values"]
    pixels = np.asarray(pixels)[0]  # (3, S, S), or (tiles, 3, S, S) for LLaVA-NeXT: base view first
    red = np.all(np.moveaxis(pixels, -3, -1) == np.array(PAINT, dtype=pixels.dtype), axis=-1)
    offsets = []
    for index, grid in enumerate(geometry.grids):
        if red.ndim == 2:  # one view
            canvas = red
        elif index == 0:  # the base view
            canvas = red[0]
        else:  # the high-resolution tiles, row-major over the canvas, then trimmed in token units as the model does
            side = red.shape[-1]
            canvas_h, canvas_w = select_best_resolution(height, width, image_processor.image_grid_pinpoints)
            tiles = red[1:].reshape(canvas_h // side, canvas_w // side, side, side)
            canvas = tiles.transpose(0, 2, 1, 3).reshape(canvas_h, canvas_w)
        size = grid.patch_size
        patches = canvas.reshape(canvas.shape[0] // size, size, canvas.shape[1] // size, size).any(axis=(1, 3))
        top, left = (patches.shape[0] - grid.rows) // 2, (patches.shape[1] - grid.cols) // 2
        rows, cols = np.nonzero(patches[top : top + grid.rows, left : left + grid.cols])
        offsets.append(grid.offset + rows * grid.row_stride + cols)
    return np.unique(np.concatenate(offsets)) if offsets else np.zeros(0, dtype=np.int64)


def qwen_vl_geometry(
    width: int, height: int, *, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int
) -> ImageGeometry:
    """Qwen2-VL / Qwen2.5-VL dynamic resolution: one grid of merged patches, no newline tokens.

    The image is resized (aspect kept) to multiples of `patch_size * merge_size` (28) within
    `min_pixels`..`max_pixels` (transformers' `smart_resize`), cut into `patch_size` (14) pixel patches,
    and every `merge_size` x `merge_size` block of patches becomes one token, row-major over the blocks:
    a token reads a 28 x 28 pixel square of the resized image.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    side = patch_size * merge_size
    new_h, new_w = smart_resize(height, width, factor=side, min_pixels=min_pixels, max_pixels=max_pixels)
    rows, cols = pil_nearest_source(height, new_h), pil_nearest_source(width, new_w)
    grid = PatchGrid("image", rows, cols, side, offset=0, row_stride=new_w // side)
    return ImageGeometry((grid,), np.zeros(0, dtype=np.int64), grid.rows * grid.cols)


def bilinear_support(old: int, new: int) -> np.ndarray:
    """Bool ``(new, old)``: which of `old` inputs each of `new` outputs reads with a nonzero weight.

    Replays torch's bilinear interpolation (align_corners=False) along one axis on one-hot inputs, so
    the support is the kernel's own, exact zero weights included.
    """
    import torch

    eye = torch.eye(old, dtype=torch.float32)[None, :, :, None]  # channel c is the one-hot of input c
    out = torch.nn.functional.interpolate(eye, size=[new, 1], mode="bilinear")[0, :, :, 0]
    return (out != 0).T.numpy()


@dataclasses.dataclass(frozen=True)
class PooledGrid(PatchGrid):
    """A patch grid whose token map was resized (bilinear) to `row_map.shape[0]` x `col_map.shape[0]` tokens.

    `row_map[i, r]` is True when output token row i reads input patch row r (likewise `col_map`); a box
    covers the output tokens that read any patch it covers.
    """

    row_map: np.ndarray = None
    col_map: np.ndarray = None

    @property
    def rows(self) -> int:
        return self.row_map.shape[0]

    @property
    def cols(self) -> int:
        return self.col_map.shape[0]

    def box_token_offsets(self, box: Box) -> np.ndarray:
        row_hits = self._axis_hits(self.source_rows, *_box_pixel_range(box.y, box.h))
        col_hits = self._axis_hits(self.source_cols, *_box_pixel_range(box.x, box.w))
        rows = np.nonzero(self.row_map[:, row_hits].any(axis=1))[0]
        cols = np.nonzero(self.col_map[:, col_hits].any(axis=1))[0]
        r, c = np.meshgrid(rows, cols, indexing="ij")
        return (self.offset + r * self.row_stride + c).ravel()


def _tile_axis(canvas: np.ndarray, tile: int, used: int) -> np.ndarray:
    """Concatenate the first `used` pixels of each `tile`-pixel tile along one canvas axis."""
    return np.concatenate([canvas[start : start + used] for start in range(0, len(canvas), tile)])


def onevision_geometry(
    width: int, height: int, image_size: int, patch_size: int, pinpoints, max_tiles: int
) -> ImageGeometry:
    """LLaVA-OneVision anyres-max-N: squashed base view, then tiles unpadded in token units, pooled, newlines.

    The base view is the image squashed to `image_size` (384); each tile of the best-fitting canvas is a
    384-pixel square. SigLIP reads `image_size // patch_size` (27) patches per side, so the last 6 pixels
    of every view are never seen. The tiles' token map is trimmed of padding in token units (as LLaVA-NeXT),
    then, when it holds over 1.1^2 x `max_tiles` views' worth of tokens, resized bilinearly down to about
    `max_tiles` views (modeling_llava_onevision.pack_image_features); each row ends with a newline token.
    """
    per_side = image_size // patch_size
    used = per_side * patch_size
    base = PatchGrid(
        "base_view",
        pil_nearest_source(height, image_size)[:used],
        pil_nearest_source(width, image_size)[:used],
        patch_size,
        offset=0,
        row_stride=per_side,
    )
    rows, cols = _fit_canvas(width, height, *select_best_resolution(height, width, pinpoints))
    rows, cols = _tile_axis(rows, image_size, used), _tile_axis(cols, image_size, used)
    rows, cols = _unpad_tokens(rows, cols, width, height, patch_size)
    cur_h, cur_w = len(rows) // patch_size, len(cols) // patch_size
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * per_side**2))
    out_h, out_w = (int(cur_h // ratio), int(cur_w // ratio)) if ratio > 1.1 else (cur_h, cur_w)
    row_map = bilinear_support(cur_h, out_h) if ratio > 1.1 else np.eye(cur_h, dtype=bool)
    col_map = bilinear_support(cur_w, out_w) if ratio > 1.1 else np.eye(cur_w, dtype=bool)
    base_tokens = per_side * per_side
    stride = out_w + 1
    high = PooledGrid(
        "high_resolution",
        rows,
        cols,
        patch_size,
        offset=base_tokens,
        row_stride=stride,
        row_map=row_map,
        col_map=col_map,
    )
    newlines = base_tokens + np.arange(out_h) * stride + out_w
    return ImageGeometry((base, high), newlines, base_tokens + out_h * stride)
