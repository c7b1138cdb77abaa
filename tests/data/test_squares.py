import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from genflow.data.squares import BadImage, SquareBatch, centre_box, plan_squares, square_image
from genflow.data.synth import write_sample


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[bytes]:
    root = tmp_path_factory.mktemp("squares")
    write_sample(root, n=12, seed=5)
    return [path.read_bytes() for path in sorted((root / "img_align_celeba").iterdir())]


def squares_of(jpegs: list[bytes], crop: int, size: int) -> np.ndarray:
    batch = SquareBatch(plan_squares(crop, size), capacity=len(jpegs))
    notes = [batch.add(data) for data in jpegs]
    assert notes == [None] * len(jpegs) and len(batch) == len(jpegs) and batch.full()
    return batch.squares().astype(int)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def test_centre_box_is_the_centre():
    assert centre_box(148) == (15, 35)
    assert centre_box(178) == (0, 20)
    assert centre_box(147) == (15, 35)  # odd margins round down, as `//` does


def test_default_plan_decodes_at_half_scale_with_a_shifted_window():
    plan = plan_squares(148, 64)
    # Half scale: the box is [7.5, 81.5) x [17.5, 91.5), 74/64 = 37/32 window pixels per output;
    # 7.5 - 16 * 37/32 = -11 and 17.5 - 16 * 37/32 = -1 are the first whole pixels.
    assert (plan.eighths, plan.frame, plan.pad) == (4, (109, 89), (1, 11))
    assert (plan.window[0].start, plan.window[1].start) == (0, 0)
    assert plan.keep == (slice(16, 80), slice(16, 80))
    assert plan.scale_factor == 64 / 74


@pytest.mark.parametrize("crop,size", [(100, 64), (178, 64), (40, 64), (128, 32), (130, 64), (101, 32)])
def test_other_plans_decode_in_full(crop, size):
    # (100, 64): half scale would hold fewer than 64 pixels; (178, 64): the filter would read
    # past the image's edge; (40, 64): an enlargement; (128, 32): 12.5 - k * 2 is never whole;
    # (130, 64), (101, 32): the first whole-pixel window is 64 outputs early.
    plan = plan_squares(crop, size)
    left, top = centre_box(crop)
    assert (plan.eighths, plan.frame, plan.pad, plan.scale_factor) == (8, (218, 178), (0, 0), None)
    assert plan.window == (slice(top, top + crop), slice(left, left + crop))


@pytest.mark.parametrize("crop,size,skip", [(148, 64, 16), (147, 48, 16), (150, 50, 4), (160, 64, 6)])
def test_half_scale_squares_are_pillows_box_resize_of_the_half_scale_image(jpegs, crop, size, skip):
    # Independent: libjpeg-turbo's half-scale decode, then Pillow's bicubic over the exact,
    # fractional, box, image by image.
    plan = plan_squares(crop, size)
    assert plan.eighths == 4 and plan.keep[0].start == plan.keep[1].start == skip
    left, top = centre_box(crop)
    box = (left / 2, top / 2, (left + crop) / 2, (top + crop) / 2)
    ours = squares_of(jpegs, crop, size)
    for data, square in zip(jpegs, ours):
        half = simplejpeg.decode_jpeg(data, "RGB", min_height=109, min_width=89)
        assert half.shape == (109, 89, 3)
        pillow = np.asarray(Image.fromarray(half).resize((size, size), Image.Resampling.BICUBIC, box=box))
        difference = np.abs(square - pillow)
        assert difference.max() <= 1, (difference.max(), difference.mean())


@pytest.mark.parametrize("crop,size,mean_within", [(100, 64, 0.05), (178, 64, 0.1), (40, 64, 0.15), (128, 32, 0.25), (101, 32, 0.25)])
def test_full_scale_squares_are_pillows_resize_of_the_crop(jpegs, crop, size, mean_within):
    # Independent: Pillow's crop, then its bicubic resize. torch's uint8 kernel keeps fewer
    # weight bits at large downscales and clips its intermediate pass elsewhere, so pixels by
    # the drawn faces' hard edges may differ by a few levels.
    left, top = centre_box(crop)
    ours = squares_of(jpegs, crop, size)
    for data, square in zip(jpegs, ours):
        cropped = Image.open(io.BytesIO(data)).convert("RGB").crop((left, top, left + crop, top + crop))
        pillow = np.asarray(cropped.resize((size, size), Image.Resampling.BICUBIC))
        difference = np.abs(square - pillow)
        assert difference.mean() < mean_within and np.mean(difference > 3) < 0.01, (difference.mean(), difference.max())


def test_default_squares_are_the_straightforward_scripts_crop_and_resize(jpegs):
    # The straightforward script (full decode, crop, Lanczos) with another filter: ~37 dB on the
    # synthetic faces, as close as a bilinear resize of the same crop; a crop one source pixel
    # off scores ~26 dB, so the box is where it should be.
    scores, shifted = [], []
    for data in jpegs:
        ours, note = square_image(data, crop=148, size=64)
        assert note is None and ours.shape == (64, 64, 3) and ours.dtype == np.uint8
        image = Image.open(io.BytesIO(data)).convert("RGB")
        reference = image.crop((15, 35, 163, 183)).resize((64, 64), Image.Resampling.LANCZOS)
        off_by_one = image.crop((16, 35, 164, 183)).resize((64, 64), Image.Resampling.LANCZOS)
        scores.append(psnr(ours, np.asarray(reference)))
        shifted.append(psnr(ours, np.asarray(off_by_one)))
    assert np.mean(scores) > 35 and min(scores) > 32, scores
    assert np.mean(shifted) < 30 and np.mean(scores) > np.mean(shifted) + 6, shifted


def test_a_bad_image_leaves_the_batch_as_it_was(jpegs):
    batch = SquareBatch(plan_squares(148, 64), capacity=4)
    batch.add(jpegs[0])
    for bad, reason in [(jpegs[1][:300], "corrupt JPEG"), (b"not an image", "not a readable image")]:
        with pytest.raises(BadImage, match=reason):
            batch.add(bad)
    batch.add(jpegs[2])
    assert len(batch) == 2
    squares = batch.squares()
    assert len(batch) == 0 and squares.shape == (2, 64, 64, 3)
    assert np.array_equal(squares[0], square_image(jpegs[0], 148, 64)[0])
    assert np.array_equal(squares[1], square_image(jpegs[2], 148, 64)[0])
    assert batch.squares().shape == (0, 64, 64, 3)


def test_a_png_goes_through_pillow_at_the_same_scale(jpegs):
    image = Image.open(io.BytesIO(jpegs[0]))
    stream = io.BytesIO()
    image.save(stream, "PNG")
    for crop, size in [(148, 64), (100, 64)]:  # a half-scale plan, a full-scale plan
        square, note = square_image(stream.getvalue(), crop, size)
        assert note == "PNG data under a .jpg name, decoded"
        assert psnr(square, square_image(jpegs[0], crop, size)[0]) > 35
