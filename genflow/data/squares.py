"""Aligned CelebA image bytes -> training squares: decode, centre crop, antialiased resize.

    batch = SquareBatch(plan_squares(crop=148, size=64))
    note = batch.add(jpeg_bytes)       # decodes into the batch's buffer; BadImage if unusable
    squares = batch.squares()          # uint8 [n, 64, 64, 3], and the batch is empty again

The square is Pillow's antialiased bicubic resize (a=-0.5, the support widened by the
downscale factor) of the centre crop box, computed for a whole batch by one call of torch's
vectorised uint8 kernel: ~8x faster than Pillow image by image, and within one grey level of it
at the default (at downscales of 3x and more, a few pixels by hard edges differ by a few levels).

When the crop is at least twice the size (148 -> 64), JPEGs are decoded at half scale by
libjpeg-turbo's DCT scaling, which drops frequencies the square cannot hold anyway for ~65% of
a full decode's CPU. The half-scale crop box then starts at a half pixel (15 / 2 = 7.5), which
torch cannot take as a box. It needs no box: torch samples output i of a window starting at w
from w + (i + 0.5) * scale, and Pillow's box resize from 7.5 + (i + 0.5) * scale, so a window
started `skip` outputs earlier, at 7.5 - skip * scale (a whole pixel: -11 for 74/64), gives
Pillow's outputs from output `skip` on. The few outputs before are dropped. Other crops and
sizes decode in full and resize the whole-pixel crop box (tests/data/test_squares.py checks
both against Pillow).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from genflow.data.celeba import IMAGE_SIZE

WIDTH, HEIGHT = IMAGE_SIZE


class BadImage(Exception):
    """An image that cannot soundly become a training image; the message is the reason."""


def centre_box(crop: int) -> tuple[int, int]:
    """(left, top) of the centre `crop` square of an aligned image, in whole pixels.

    Rounded down like the straightforward script's `(178 - crop) // 2`; for the default 148
    that is (15, 35), exactly the centre.
    """
    return (WIDTH - crop) // 2, (HEIGHT - crop) // 2


@dataclass(frozen=True)
class SquarePlan:
    """How every image becomes its square, fixed by (crop, size)."""

    crop: int
    size: int
    eighths: int  # JPEGs are decoded at eighths/8 of their size: 8 (full) or 4 (half)
    frame: tuple[int, int]  # (height, width) decoded
    pad: tuple[int, int]  # blank (rows, columns) before the decoded image in the batch buffer
    window: tuple[slice, slice]  # the buffer's (rows, columns) that torch resizes
    keep: tuple[slice, slice]  # the resized window's (rows, columns) that are the square
    scale_factor: float | None  # resized/window pixels; None: the window is the box, resized to size


@lru_cache
def plan_squares(crop: int, size: int) -> SquarePlan:
    left, top = centre_box(crop)
    if crop >= 2 * size:
        frame = (math.ceil(HEIGHT / 2), math.ceil(WIDTH / 2))  # libjpeg-turbo rounds scaled sizes up
        rows = _shifted_window(Fraction(top, 2), Fraction(crop, 2), size, frame[0])
        cols = _shifted_window(Fraction(left, 2), Fraction(crop, 2), size, frame[1])
        if rows and cols:
            return SquarePlan(
                crop, size, eighths=4, frame=frame, pad=(rows[0], cols[0]),
                window=(slice(rows[1], rows[2]), slice(cols[1], cols[2])),
                keep=(slice(rows[3], rows[3] + size), slice(cols[3], cols[3] + size)),
                scale_factor=size / (crop / 2),
            )
    return SquarePlan(
        crop, size, eighths=8, frame=(HEIGHT, WIDTH), pad=(0, 0),
        window=(slice(top, top + crop), slice(left, left + crop)),
        keep=(slice(0, size), slice(0, size)), scale_factor=None,
    )


def _shifted_window(offset: Fraction, extent: Fraction, size: int, length: int) -> tuple[int, int, int, int] | None:
    """(pad, start, stop, skip) on one axis: a whole-pixel window of the padded image whose
    resize, from output `skip` on, is Pillow's resize of the box [offset, offset + extent) to
    `size`. The window takes in every pixel the kept outputs' filters read (torch narrows the
    filter at a window's edges). None when no window needs fewer than size / 2 dropped outputs,
    or when the kept outputs would read past the image, where Pillow narrows its filter.
    """
    scale = extent / size
    support = 2 * max(scale, 1)  # bicubic's radius, widened when downscaling
    first_read = offset + scale / 2 - support - 1  # one pixel of margin on either side
    last_read = offset + extent - scale / 2 + support + 1
    if first_read < 0 or last_read > length:
        return None
    for skip in range(size // 2 + 1):
        start = offset - skip * scale
        if start.denominator == 1 and start <= first_read:
            break
    else:
        return None
    start = int(start)
    pad = max(0, -start)
    # Past the last kept output's reach: at least skip + size + 1 outputs, whatever the rounding.
    stop = math.ceil(last_read)
    return pad, start + pad, stop + pad, skip


def decode_rgb(data: bytes, out: np.ndarray, eighths: int = 8) -> str | None:
    """Decode one aligned image at eighths/8 scale into `out` (uint8 [height, width, 3]).

    Returns a note when the image had to be converted; raises BadImage with the reason when
    it cannot be used. JPEGs go straight into `out` through libjpeg-turbo (simplejpeg), the
    fastest decode there is here (~2x Pillow's); the rest goes through Pillow.
    """
    if data[:2] != b"\xff\xd8":
        return _decode_with_pil(data, out, eighths, "{format} data under a .jpg name, decoded")
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as err:
        raise BadImage(f"corrupt JPEG: {err}") from None
    _check_size(width, height)
    if colorspace in ("CMYK", "YCCK"):
        # libjpeg-turbo does not undo Adobe's inverted CMYK; Pillow does.
        return _decode_with_pil(data, out, eighths, f"{colorspace} JPEG, converted to RGB")
    try:
        decoded = simplejpeg.decode_jpeg(data, "RGB", min_height=out.shape[0], min_width=out.shape[1], buffer=out)
    except ValueError as err:
        raise BadImage(f"corrupt JPEG: {err}") from None
    if decoded.shape != out.shape:
        raise RuntimeError(f"libjpeg-turbo decoded {decoded.shape}, expected {out.shape} at scale {eighths}/8")
    return "grayscale JPEG, converted to RGB" if colorspace == "Gray" else None


def _decode_with_pil(data: bytes, out: np.ndarray, eighths: int, note: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            _check_size(*opened.size)
            note = note.format(format=opened.format)
            image = opened.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # what Pillow raises on unreadable data
        raise BadImage(f"not a readable image: {err}") from None
    if eighths != 8:
        # Not a JPEG's DCT scaling, but the nearest filter to it: a box average.
        image = image.reduce(8 // eighths)
    out[...] = np.asarray(image)
    return note


def _check_size(width: int, height: int) -> None:
    if (width, height) != IMAGE_SIZE:
        raise BadImage(f"wrong size {width}x{height}, expected {WIDTH}x{HEIGHT} (img_align_celeba)")


class SquareBatch:
    """Images decoded one by one into one buffer, made squares by one resize call."""

    def __init__(self, plan: SquarePlan, capacity: int = 64):
        self.plan, self.capacity, self.count = plan, capacity, 0
        (height, width), (pad_rows, pad_cols) = plan.frame, plan.pad
        # The padding stays blank: only outputs that are dropped read it.
        self.frames = np.zeros((capacity, height + pad_rows, width + pad_cols, 3), np.uint8)
        # libjpeg-turbo writes whole rows: a padded slot is decoded aside, then copied in.
        self.scratch = np.empty((height, width, 3), np.uint8) if plan.pad != (0, 0) else None

    def __len__(self) -> int:
        return self.count

    def full(self) -> bool:
        return self.count == self.capacity

    def add(self, data: bytes) -> str | None:
        """Decode one image into the batch: its conversion note; BadImage leaves the batch as it was."""
        slot = self.frames[self.count]
        if self.scratch is None:
            note = decode_rgb(data, slot, self.plan.eighths)
        else:
            note = decode_rgb(data, self.scratch, self.plan.eighths)
            slot[self.plan.pad[0] :, self.plan.pad[1] :] = self.scratch
        self.count += 1
        return note

    def squares(self) -> np.ndarray:
        """uint8 [n, size, size, 3]: the squares of the images added since the last call."""
        plan, count = self.plan, self.count
        self.count = 0
        if count == 0:
            return np.empty((0, plan.size, plan.size, 3), np.uint8)
        # A channels-last view, which is what torch's vectorised uint8 path takes: no copy.
        windows = torch.from_numpy(self.frames[:count]).permute(0, 3, 1, 2)[:, :, plan.window[0], plan.window[1]]
        if plan.scale_factor is None:
            resized = F.interpolate(windows, size=(plan.size, plan.size), mode="bicubic", antialias=True)
        else:
            resized = F.interpolate(
                windows, scale_factor=plan.scale_factor, recompute_scale_factor=False, mode="bicubic", antialias=True
            )
        return resized[:, :, plan.keep[0], plan.keep[1]].permute(0, 2, 3, 1).contiguous().numpy()


def square_image(data: bytes, crop: int, size: int) -> tuple[np.ndarray, str | None]:
    """One image's square, uint8 [size, size, 3], and its conversion note (see decode_rgb)."""
    batch = SquareBatch(plan_squares(crop, size), capacity=1)
    note = batch.add(data)
    return batch.squares()[0], note
