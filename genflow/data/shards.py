"""Prepare: a CelebA source -> 64x64 WebDataset shards, a manifest and stats (the DVC stage).

    genflow data prepare [--source PATH] [--out DIR]

    {shards}/train/celeba64-000000.tar ...   KEY.ppm (64x64 RGB) + KEY.attrs.npy (uint8 [40], 0/1)
    {shards}/test/celeba64-000000.tar ...
    {shards}/manifest.parquet                one row per kept image: key, split, shard, 40 attributes
    {shards}/stats.json                      source, counts, how the squares were made, mean/std,
                                             shard sha256s, rejections

{shards} is a folder or an object-store URI (`--out s3://bucket/shards`, genflow/storage.py). A
folder is written beside and renamed into place; a URI, whose prefix cannot be renamed, gets each
shard uploaded to a hidden prefix beside it as it is finished, copied in by the store when all
are, stats.json last (genflow.data.published_in_order): a failed prepare leaves the earlier output
as it was, and without stats.json a prefix is never read as shards.

Images are stored as binary PPM: lossless like PNG, but decoding is a header check and a
memory view, where a 64x64 PNG costs the loader over 100x more CPU (benchmarks/loader.py
prints both). The price is size: 14 KB per sample in the tar, 2.9 GB for CelebA.

Each process writes whole shards with webdataset's TarWriter, 64 images at a time: decoded
one by one into one buffer, made squares by one resize call (squares.py). Per image that is
~100 us of decoding, ~40 us of resizing and ~110 us of TarWriter (benchmarks/prepare.py).

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
import signal
import sys
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from tqdm import tqdm

from genflow import storage
from genflow.config import DataParams
from genflow.data import published_in_order, replaced_atomically
from genflow.data.celeba import ATTRIBUTE_NAMES, CelebA, ImageSource, Rejection, open_celeba
from genflow.data.split import split_ids
from genflow.data.squares import BadImage, SquareBatch, centre_box, plan_squares

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


def ppm_header(size: int) -> bytes:
    return b"P6\n%d %d\n255\n" % (size, size)


def sample_bytes(size: int) -> int:
    """The bytes one sample takes in a shard prepare writes: its two members (attrs.npy, then ppm:
    TarWriter writes them sorted), each a 512-byte ustar header and its data padded to 512 bytes;
    no pax or long-name headers (USTAR_FORMAT, short keys). Sample k starts at byte k * this."""
    def member(data: int) -> int:
        return tarfile.BLOCKSIZE * (1 + -(-data // tarfile.BLOCKSIZE))

    return member(len(ATTRS_NPY_HEADER) + len(ATTRIBUTE_NAMES)) + member(len(ppm_header(size)) + 3 * size * size)


def shard_bytes(count: int, size: int) -> int:
    """The size of a shard of `count` samples as prepare writes it: the samples, then tarfile's
    end of archive (two zero blocks, padded to a whole tarfile.RECORDSIZE record)."""
    end = count * sample_bytes(size) + 2 * tarfile.BLOCKSIZE
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


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
    out = storage.resolved(data.shards)
    print(check_replaceable(out, source_path), file=sys.stderr)
    rejected_report = f"{out}.rejected.json"

    with _output(out) as (tmp, publish):
        written = _write_splits(tmp, celeba, {"train": train_names, "test": test_names}, data, publish)
        if len(written.rejected) > data.max_reject_fraction * celeba.n_images:
            storage.write_bytes(rejected_report, json.dumps([asdict(r) for r in written.rejected], indent=1) + "\n")
            storage.remove_tree(out)  # a previous output is no output for this source
            examples = "".join(f"\n  {r.file}: {r.reason}" for r in written.rejected[:5])
            raise ValueError(
                f"prepare {source_path}: {len(written.rejected)} of {celeba.n_images} images rejected "
                f"({len(written.rejected) / celeba.n_images:.2%}), more than data.max_reject_fraction="
                f"{data.max_reject_fraction}; no shards were written. First reasons:{examples}\n"
                f"all are listed in {rejected_report}; fix the source or raise data.max_reject_fraction"
            )
        stats = _stats(data, celeba, written, assigned={"train": len(train_names), "test": len(test_names)})
        pq.write_table(written.manifest, tmp / "manifest.parquet")
        publish("manifest.parquet")
        # Written last: a folder without stats.json is never a finished output (loader.read_stats).
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        publish("stats.json")
    storage.remove(rejected_report)
    counts = stats["counts"]
    print(
        f"prepared {out}: {counts['train']} train, {counts['test']} test, {counts['rejected']} rejected, "
        f"{counts['converted']} converted (listed in {storage.join(out, 'stats.json')})",
        file=sys.stderr,
    )
    return stats


@contextmanager
def _output(out: str) -> Iterator[tuple[Path, Callable[[str], None]]]:
    """(folder to write in, publish(file)): a folder that replaces `out` at the end, where
    publishing is nothing; or, for a URI, a staging folder whose files publish uploads."""
    if storage.is_remote(out):
        with published_in_order(out, last="stats.json") as staged:
            yield staged
    else:
        with replaced_atomically(out) as tmp:
            yield tmp, lambda file: None


def check_replaceable(out: str, source: Path) -> str:
    """Refuse an output folder (or URI prefix) that prepare did not write; say what will happen to it.

    Prepare replaces its output wholesale, so it may only replace its own earlier output: a
    folder holding prepare's files and nothing else (its stats.json is written last, so a
    folder with one is a finished output). Never the source, a folder containing it, or a
    folder with anything of the user's in it.
    """
    fix = "choose another --out (data.shards), e.g. data/shards"
    if not storage.is_remote(out):
        out_path, source = Path(out).resolve(), source.resolve()
        if out_path == source or source.is_relative_to(out_path):
            raise ValueError(f"prepare: the output {out} {'is' if out_path == source else 'contains'} the source {source}; "
                             f"replacing it would delete the source; {fix}")
    if not storage.exists(out):
        bucket = storage.missing_bucket(out)
        if bucket:
            raise ValueError(f"prepare: cannot write {out}: the store has no bucket {bucket!r}; create it, or {fix}")
        return f"prepare: writing {out}"
    if not storage.is_dir(out):
        raise ValueError(f"prepare: the output {out} is a file, not a folder; {fix}")
    entries = storage.listdir(out)
    if not entries:
        return f"prepare: writing {out} (an empty folder)"
    foreign = [name for name, _ in entries if name not in _OUTPUT_NAMES]
    for split in SPLITS:
        if (split, True) in entries:
            foreign += [f"{split}/{name}" for name, is_folder in storage.listdir(storage.join(out, split))
                        if is_folder or not _is_shard_name(name)]
    if foreign or not storage.is_file(storage.join(out, "stats.json")):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        what = f"holds files prepare did not write ({shown})" if foreign else "is not a finished prepare output (no stats.json)"
        raise ValueError(f"prepare: the output {out} {what}; prepare replaces its output and never deletes "
                         f"what it did not write; {fix}, or empty that folder yourself")
    return f"prepare: replacing the earlier prepare output in {out}"


# What a finished output holds: one folder per split, the manifest and stats.json.
_OUTPUT_NAMES = {*SPLITS, "manifest.parquet", "stats.json"}


def _is_shard_name(name: str) -> bool:
    prefix, _, number = name.partition("-")
    return prefix == SHARD_PATTERN.split("-")[0] and number.endswith(".tar") and number[:-4].isdigit()


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


def _write_splits(root: Path, celeba: CelebA, splits: dict[str, list[str]], data: DataParams,
                  publish: Callable[[str], None]) -> _Written:
    """Write every split's shards in parallel, one shard per task, each published as it is done
    (see _output); gather what was kept."""
    tasks = _shard_tasks(root, celeba, splits, data.shard_size)
    processes = min(data.processes or _usable_cores(), len(tasks))
    results: list[_ShardResult | None] = [None] * len(tasks)
    with tqdm(total=sum(len(t.names) for t in tasks), unit="img", desc="prepare", file=sys.stderr) as progress:
        with _TaskMapper(processes, (celeba.source, root, data.crop, data.size)) as map_unordered:
            for index, result in map_unordered(_write_shard, tasks):
                results[index] = result
                if result.kept:  # a shard whose every image was rejected is left out (below)
                    publish(tasks[index].file)
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
        # data.sample made these shards only when it is the source: recorded otherwise, a changed
        # sample setting would change a CelebA preparation's output, and with it (under DVC, where
        # prepare depends on the sample too: dvc.yaml) every stage downstream.
        "params": data.model_dump(exclude=None if data.is_sample() else {"sample"}),
        "squares": _describe_squares(data.crop, data.size),
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


def _describe_squares(crop: int, size: int) -> dict:
    """How the squares were made, for stats.json: what a reader of the data may want to know."""
    plan = plan_squares(crop, size)
    left, top = centre_box(crop)
    return {
        "crop_box": [left, top, left + crop, top + crop],  # left, top, right, bottom in source pixels
        "jpeg_decode_scale": plan.eighths / 8,  # libjpeg-turbo's DCT scaling
        "resize": "antialiased bicubic (Pillow's filter), torch uint8 kernel",
    }


_worker: dict = {}
_BATCH = 64  # images decoded into one buffer, then resized by one call


def _init_worker(source: ImageSource, root: Path, crop: int, size: int, pool_process: bool = False) -> None:
    # Set once per process, so that tasks carry only names and attributes.
    _worker.update(source=source, root=root, crop=crop, size=size)
    if pool_process:
        # One process per core already: torch's own threads would only contend. One thread
        # also keeps torch off the OpenMP pool that a forked child must not use.
        torch.set_num_threads(1)
        # Ctrl+C reaches every process of the terminal's group: the parent alone handles it
        # (terminates the pool, removes the temporary folder, prints one line); a pool process
        # ended by that terminate (SIGTERM) just ends, without the parent's handler.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_shard(task: _ShardTask) -> _ShardResult:
    """Decode the task's images and write the usable ones, in order, into one shard."""
    source, path = _worker["source"], _worker["root"] / task.file
    plan = plan_squares(_worker["crop"], _worker["size"])
    header = ppm_header(plan.size)
    kept, rejected, converted = [], [], []
    histogram = np.zeros((3, 256), np.int64) if task.with_histogram else None
    batch = SquareBatch(plan, _BATCH)
    with open(path, "wb") as file, wds.TarWriter(writer := _HashingWriter(file), encoder=False, mtime=_TAR_MTIME) as tar:
        # webdataset 1.0 takes a `format` but never hands it to tarfile, which then builds pax
        # headers (~8 us a sample) that our short names and sizes never need: same bytes.
        tar.tarstream.format = tarfile.USTAR_FORMAT
        for start in range(0, len(task.names), _BATCH):
            decoded = []  # positions in the task of the images in the batch
            for position in range(start, min(start + _BATCH, len(task.names))):
                name = task.names[position]
                try:
                    note = batch.add(source.read(name))
                except BadImage as bad:
                    rejected.append((name, str(bad)))
                    continue
                decoded.append(position)
                if note:
                    converted.append((name, note))
            squares = batch.squares()
            for position, pixels in zip(decoded, squares):
                attrs = task.attrs[position].astype(np.uint8)
                sample = {IMAGE_EXT: header + pixels.tobytes(), ATTRS_EXT: ATTRS_NPY_HEADER + attrs.tobytes()}
                tar.write({"__key__": CelebA.image_id(task.names[position]), **sample})
            kept += decoded
            if histogram is not None and decoded:
                # Histograms, not sums: as exact, and bincount over uint8 planes is several times
                # faster than an int64 sum.
                planes = torch.from_numpy(squares).permute(3, 0, 1, 2).contiguous().view(3, -1)
                for channel in range(3):
                    histogram[channel] += torch.bincount(planes[channel], minlength=256).numpy()
    return _ShardResult(kept, rejected, converted, writer.size, writer.sha256.hexdigest(), histogram)


class _HashingWriter:
    """A file's writer that hashes what it writes: the shard's sha256 without reading it back."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


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
