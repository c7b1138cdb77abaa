"""Prepare: a CelebA source -> 64x64 WebDataset shards, a manifest and stats (the DVC stage).

    genflow data prepare [--source PATH] [--out DIR]

    {shards}/train/celeba64-000000.tar ...   KEY.ppm (64x64 RGB) + KEY.attrs.npy (uint8 [40], 0/1)
    {shards}/test/celeba64-000000.tar ...
    {shards}/manifest.parquet                one row per kept image: key, split, shard, 40 attributes
    {shards}/stats.json                      source, counts, mean/std, shard sha256s, rejections

Images are stored as binary PPM: lossless like PNG, but decoding is a header check and a
memory view, where a 64x64 PNG costs the loader over 100x more CPU (benchmarks/loader.py
prints both). The price is size: 14 KB per sample in the tar, 2.9 GB for CelebA.

Each process writes whole shards with webdataset's TarWriter, 64 images at a time: each is
decoded in full by libjpeg-turbo into one buffer, then the batch's centre crops are resized by
one call of torch's antialiased bicubic uint8 kernel. Per image that is ~115 us of decoding,
~40 us of resizing and ~100 us of TarWriter (benchmarks/prepare.py).

Same input and params give byte-identical shards: the split and each shard's list of images
are fixed before any image is decoded, and the tar headers carry a fixed time and owner. (The
pixels depend on the libjpeg-turbo and torch builds: torch's uint8 resize has a vectorised
path on x86 and a generic one elsewhere, which may round a pixel the other way.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from genflow.config import DataParams
from genflow.data import replaced_atomically
from genflow.data.celeba import ATTRIBUTE_NAMES, IMAGE_SIZE, CelebA, ImageSource, Rejection, open_celeba
from genflow.data.split import split_ids

SPLITS = ("train", "test")
SHARD_PATTERN = "celeba64-%06d.tar"
IMAGE_EXT = "ppm"
ATTRS_EXT = "attrs.npy"
# webdataset's TarWriter stamps members with the current time unless given one.
_TAR_MTIME = 0


def _npy_header(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()[: -array.nbytes]


# What np.save writes for any uint8 [40] is this header and the 40 bytes: built once, it saves
# an np.save per image when writing and an np.load when loading.
ATTRS_NPY_HEADER = _npy_header(np.zeros(len(ATTRIBUTE_NAMES), np.uint8))


class BadImage(Exception):
    """An image that cannot soundly become a training image; the message is the reason."""


def ppm_header(size: int) -> bytes:
    return b"P6\n%d %d\n255\n" % (size, size)


def centre_box(crop: int) -> tuple[int, int]:
    """(left, top) of the centre `crop` square of an aligned image, in whole pixels.

    Rounded down like the straightforward script's `(178 - crop) // 2`; for the default 148
    that is (15, 35), exactly the centre.
    """
    return (IMAGE_SIZE[0] - crop) // 2, (IMAGE_SIZE[1] - crop) // 2


def decode_rgb(data: bytes, out: np.ndarray) -> str | None:
    """Decode one aligned image into `out` (uint8 [218, 178, 3]).

    Returns a note when the image had to be converted; raises BadImage with the reason when
    it cannot be used. JPEGs go straight into `out` through libjpeg-turbo (simplejpeg), the
    fastest full decode there is here (~2.5x Pillow's); the rest goes through Pillow.
    """
    if data[:2] != b"\xff\xd8":
        return _decode_with_pil(data, out, "{format} data under a .jpg name, decoded")
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as err:
        raise BadImage(f"corrupt JPEG: {err}") from None
    _check_size(width, height)
    if colorspace in ("CMYK", "YCCK"):
        # libjpeg-turbo does not undo Adobe's inverted CMYK; Pillow does.
        return _decode_with_pil(data, out, f"{colorspace} JPEG, converted to RGB")
    try:
        simplejpeg.decode_jpeg(data, "RGB", buffer=out)
    except ValueError as err:
        raise BadImage(f"corrupt JPEG: {err}") from None
    return "grayscale JPEG, converted to RGB" if colorspace == "Gray" else None


def _decode_with_pil(data: bytes, out: np.ndarray, note: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            _check_size(*opened.size)
            note = note.format(format=opened.format)
            out[...] = np.asarray(opened.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:  # what Pillow raises on unreadable data
        raise BadImage(f"not a readable image: {err}") from None
    return note


def _check_size(width: int, height: int) -> None:
    if (width, height) != IMAGE_SIZE:
        raise BadImage(f"wrong size {width}x{height}, expected {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} (img_align_celeba)")


def resize_crops(frames: np.ndarray, crop: int, size: int) -> np.ndarray:
    """uint8 [B, 218, 178, 3] decoded images -> their centre `crop` squares, resized to `size`.

    Antialiased bicubic (Pillow's filter: a=-0.5, support widened by the downscale factor),
    done by torch's uint8 kernel on the whole batch: ~8x faster than Pillow's resize image by
    image, and within one grey level of it (tests/data/test_shards.py).
    """
    left, top = centre_box(crop)
    # A channels-last view, which is what torch's vectorised uint8 path takes; no copy.
    batch = torch.from_numpy(frames).permute(0, 3, 1, 2)[:, :, top : top + crop, left : left + crop]
    resized = F.interpolate(batch, size=(size, size), mode="bicubic", antialias=True)
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def square_image(data: bytes, crop: int, size: int) -> tuple[np.ndarray, str | None]:
    """One image's training square, uint8 [size, size, 3], and its conversion note (see decode_rgb)."""
    frame = np.empty((1, IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8)
    note = decode_rgb(data, frame[0])
    return resize_crops(frame, crop, size)[0], note


def prepare(data: DataParams) -> dict:
    """Write the shards, manifest and stats for `data.source` into `data.shards`; return the stats."""
    source_path = data.source_path()
    if data.is_sample():
        print(
            f"\n{'!' * 78}\n!! data.source=sample: preparing the SYNTHETIC sample at {source_path} (drawn faces).\n"
            f"!! This is NOT CelebA. Set data.source to a CelebA folder or zip to train on CelebA.\n{'!' * 78}\n",
            file=sys.stderr,
        )
    celeba = open_celeba(source_path)
    if not celeba.names:
        raise ValueError(f"{source_path}: {celeba.attr_file} has no usable rows; nothing to prepare")
    # The split is made over every well-formed annotation row, before any image is read, so
    # that an image rejected later (missing, corrupt, wrong size) is only dropped from its own
    # split and never moves another image across (see split.py). The counts in stats.json are
    # of the kept images: floor(train_fraction * N) train only when nothing was rejected.
    train_names, test_names = split_ids(celeba.names, data.train_fraction, data.split_seed)
    out = Path(data.shards)
    rejected_report = out.parent / f"{out.name}.rejected.json"

    with replaced_atomically(out) as tmp:
        written = _write_splits(tmp, celeba, {"train": train_names, "test": test_names}, data)
        if len(written.rejected) > data.max_reject_fraction * celeba.n_images:
            rejected_report.write_text(json.dumps([asdict(r) for r in written.rejected], indent=1) + "\n")
            shutil.rmtree(out, ignore_errors=True)  # a previous output is no output for this source
            examples = "".join(f"\n  {r.file}: {r.reason}" for r in written.rejected[:5])
            raise ValueError(
                f"prepare {source_path}: {len(written.rejected)} of {celeba.n_images} images rejected "
                f"({len(written.rejected) / celeba.n_images:.2%}), more than data.max_reject_fraction="
                f"{data.max_reject_fraction}; no shards were written. First reasons:{examples}\n"
                f"all are listed in {rejected_report}; fix the source or raise data.max_reject_fraction"
            )
        stats = _stats(data, celeba, written, assigned={"train": len(train_names), "test": len(test_names)})
        pq.write_table(written.manifest, tmp / "manifest.parquet")
        # Written last: a folder without stats.json is never a finished output (loader.read_stats).
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    rejected_report.unlink(missing_ok=True)
    counts = stats["counts"]
    print(
        f"prepared {out}: {counts['train']} train, {counts['test']} test, {counts['rejected']} rejected, "
        f"{counts['converted']} converted (listed in {out / 'stats.json'})",
        file=sys.stderr,
    )
    return stats


@dataclass
class _Written:
    shards: dict[str, list[dict]]  # split -> [{file, count, bytes, sha256}]
    manifest: pa.Table
    rejected: list[Rejection]
    converted: list[dict]  # {file, note}: decoded after a conversion
    train_histogram: np.ndarray  # int64 [3, 256]


@dataclass
class _ShardTask:
    file: str  # relative to the output, e.g. "train/celeba64-000003.tar"
    names: list[str]  # image file names, in the order they are written
    attrs: np.ndarray  # bool [len(names), 40]
    with_histogram: bool  # only the train images' pixel statistics are wanted (stats.json mean/std)


@dataclass
class _ShardResult:
    kept: list[int]  # positions in the task of the images written
    rejected: list[tuple[str, str]]  # (name, reason)
    converted: list[tuple[str, str]]  # (name, note)
    bytes: int
    sha256: str
    histogram: np.ndarray | None  # int64 [3, 256]: per channel, the kept pixels' value counts


def _write_splits(root: Path, celeba: CelebA, splits: dict[str, list[str]], data: DataParams) -> _Written:
    """Write every split's shards in parallel, one shard per task; gather what was kept."""
    tasks = _shard_tasks(root, celeba, splits, data.shard_size)
    processes = min(data.processes or _usable_cores(), len(tasks))
    results: list[_ShardResult | None] = [None] * len(tasks)
    with tqdm(total=sum(len(t.names) for t in tasks), unit="img", desc="prepare", file=sys.stderr) as progress:
        with _TaskMapper(processes, (celeba.source, root, data.crop, data.size)) as map_unordered:
            for index, result in map_unordered(_write_shard, tasks):
                results[index] = result
                progress.update(len(tasks[index].names))

    # Gathered in task order, whatever order the processes finished in.
    shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
    rows: dict[str, list] = {"key": [], "split": [], "shard": []}
    kept_attrs, rejected, converted = [], list(celeba.rejected), []
    train_histogram = np.zeros((3, 256), np.int64)
    for task, result in zip(tasks, results):
        split = task.file.split("/")[0]
        rejected += [Rejection(celeba.source.describe(name), reason) for name, reason in result.rejected]
        converted += [{"file": celeba.source.describe(name), "note": note} for name, note in result.converted]
        if result.histogram is not None:
            train_histogram += result.histogram
        if not result.kept:  # every image of the shard was rejected: no empty shard
            (root / task.file).unlink()
            continue
        shards[split].append({"file": task.file, "count": len(result.kept), "bytes": result.bytes, "sha256": result.sha256})
        rows["key"] += [celeba.image_id(task.names[i]) for i in result.kept]
        rows["split"] += [split] * len(result.kept)
        rows["shard"] += [task.file] * len(result.kept)
        kept_attrs.append(task.attrs[result.kept])
    attrs = np.concatenate(kept_attrs) if kept_attrs else np.zeros((0, len(ATTRIBUTE_NAMES)), bool)
    manifest = pa.table({**rows, **{name: attrs[:, i] for i, name in enumerate(ATTRIBUTE_NAMES)}})
    return _Written(shards, manifest, rejected, converted, train_histogram)


def _shard_tasks(root: Path, celeba: CelebA, splits: dict[str, list[str]], shard_size: int) -> list[_ShardTask]:
    """Shard k of a split holds the split's images k*shard_size ... (k+1)*shard_size - 1.

    Fixed before decoding, like the split: an image rejected later leaves its shard one image
    short rather than moving every later image to another shard. Listed images missing from
    the source are left out here (the reader has rejected them).
    """
    attrs_by_name = dict(zip(celeba.names, celeba.attrs > 0))
    tasks = []
    for split, names in splits.items():
        (root / split).mkdir()
        present = [name for name in names if name not in celeba.missing]
        for k, start in enumerate(range(0, len(present), shard_size)):
            chunk = present[start : start + shard_size]
            attrs = np.stack([attrs_by_name[name] for name in chunk])
            tasks.append(_ShardTask(f"{split}/{SHARD_PATTERN % k}", chunk, attrs, with_histogram=split == "train"))
    return tasks


def _stats(data: DataParams, celeba: CelebA, written: _Written, assigned: dict[str, int]) -> dict:
    counts = {split: sum(shard["count"] for shard in written.shards[split]) for split in SPLITS}
    # Per-channel mean and std of the train images in [0, 1], from the exact pixel histogram.
    values = np.arange(256) / 255.0
    pixels = np.maximum(written.train_histogram.sum(1), 1)
    mean = written.train_histogram @ values / pixels
    std = np.sqrt(np.maximum(written.train_histogram @ values**2 / pixels - mean**2, 0.0))
    return {
        "source": {"path": str(data.source_path()), "layout": celeba.layout, "is_sample": data.is_sample()},
        "params": data.model_dump(),
        "counts": {
            **counts,
            "assigned": assigned,  # by the split, before decoding
            "rejected": len(written.rejected),
            "converted": len(written.converted),
        },
        "mean": mean.tolist(),
        "std": std.tolist(),
        "shards": written.shards,
        "rejected": [asdict(r) for r in written.rejected],
        "converted": written.converted,
    }


_worker: dict = {}
# Images decoded into one buffer and resized by one call: large enough that the resize runs
# at its batched speed, small enough that the buffer (7.5 MB) stays in cache-friendly reach.
_CHUNK = 64


def _init_worker(source: ImageSource, root: Path, crop: int, size: int, pool_process: bool = False) -> None:
    # Set once per process, so that tasks carry only names and attributes.
    _worker.update(source=source, root=root, crop=crop, size=size)
    if pool_process:
        # One process per core already: torch's own threads would only contend. One thread
        # also keeps torch off the OpenMP pool that a forked child must not use.
        torch.set_num_threads(1)


def _write_shard(task: _ShardTask) -> _ShardResult:
    """Decode the task's images and write the usable ones, in order, into one shard."""
    source, crop, size, path = _worker["source"], _worker["crop"], _worker["size"], _worker["root"] / task.file
    header = ppm_header(size)
    kept, rejected, converted = [], [], []
    histogram = np.zeros((3, 256), np.int64) if task.with_histogram else None
    frames = np.empty((_CHUNK, IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8)
    with wds.TarWriter(str(path), encoder=False, mtime=_TAR_MTIME) as tar:
        for start in range(0, len(task.names), _CHUNK):
            decoded = []  # positions in the task of the images now in frames[:len(decoded)]
            for position in range(start, min(start + _CHUNK, len(task.names))):
                name = task.names[position]
                try:
                    note = decode_rgb(source.read(name), frames[len(decoded)])
                except BadImage as bad:
                    rejected.append((name, str(bad)))
                    continue
                decoded.append(position)
                if note:
                    converted.append((name, note))
            if not decoded:
                continue
            squares = resize_crops(frames[: len(decoded)], crop, size)
            for position, pixels in zip(decoded, squares):
                attrs = task.attrs[position].astype(np.uint8)
                sample = {IMAGE_EXT: header + pixels.tobytes(), ATTRS_EXT: ATTRS_NPY_HEADER + attrs.tobytes()}
                tar.write({"__key__": CelebA.image_id(task.names[position]), **sample})
            kept += decoded
            if histogram is not None:
                # Histograms, not sums: bincount is several times faster than an int64 sum, as exact.
                for channel in range(3):
                    histogram[channel] += np.bincount(squares[..., channel].ravel(), minlength=256)
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha256.update(block)
    return _ShardResult(kept, rejected, converted, path.stat().st_size, sha256.hexdigest(), histogram)


def _usable_cores() -> int:
    # The cores this process may run on (a container's CPU set), not all the machine has.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _indexed(fn, task_and_index):
    task, index = task_and_index
    return index, fn(task)


class _TaskMapper:
    """Yields (index, fn(task)) as tasks finish: over a process pool, or here when processes == 1."""

    def __init__(self, processes: int, init_args: tuple):
        self.processes, self.init_args, self.pool = processes, init_args, None

    def __enter__(self):
        if self.processes <= 1:
            _init_worker(*self.init_args)
            return lambda fn, tasks: enumerate(map(fn, tasks))
        self.pool = Pool(self.processes, initializer=_init_worker, initargs=(*self.init_args, True))
        return lambda fn, tasks: self.pool.imap_unordered(partial(_indexed, fn), [(t, i) for i, t in enumerate(tasks)])

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
