"""Stream the prepared shards as torch DataLoaders of (images, attrs) batches.

    loader = train_loader("data/shards", batch_size=64, rank=rank, world_size=world_size, num_workers=2)
    for epoch in range(epochs):
        for images, attrs in loader:  # float32 [B, 3, 64, 64] in image_range; float32 [B, 40] in {0, 1}
            ...

The shards are a folder or an object-store URI (`s3://bucket/shards`, genflow/storage.py): each
worker reads, of each shard its samples lie in, the bytes of those samples and no others (prepare
writes samples of one size, so sample k of a shard starts at byte k * shards.sample_bytes; each
sample read there is checked to be the one manifest.parquet lists at k), a file or an object alike.

Splits: "train" (the prepared train split minus its validation tail), "validation" (the last
`validation_count` images of the prepared train split, see genflow/data/split.py: what
checkpoints and searches are scored on) and "test" (final evaluation only).

One iteration of a train loader is one epoch; the next iteration is the next epoch (reshuffled),
or the one `set_epoch` names (resuming from a checkpoint). How an epoch is divided, so that DDP
ranks never wait on each other:
  1. All ranks derive the same plan from (seed, epoch): the split's shards in a shuffled order,
     read as one sequence of N samples, started at a random offset.
  2. Rank r takes ceil(N / world_size) samples from position r * ceil(N / world_size) on,
     wrapping around (when N is not a multiple of world_size, fewer than world_size samples
     are seen twice).
  3. Training batches are whole: a rank's last ceil(N / world_size) mod batch_size samples
     are left out of the epoch (others each epoch, as the offset moves), so no step trains on
     a batch of one image and every step on every rank averages over batch_size images.
  4. The rank's batches are cut into contiguous blocks, one per DataLoader worker; a worker
     reads only the shards its block covers, shuffles within a buffer and yields whole batches.
Samples (not shards) are the unit of this split, so counts are exact however many shards there
are. Which samples a rank sees in an epoch does not depend on the number of loader workers; their
order within it does (each worker shuffles its own block), so `train.loader_workers` is part of
a training run's identity (genflow/track/identity.py), as `train.workers` is.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import filters as wds_filters
from webdataset.tariterators import group_by_keys

from genflow import storage
from genflow.data.attributes import MANIFEST_FILE
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.data.shards import ATTRS_EXT, ATTRS_NPY_HEADER, IMAGE_EXT, ppm_header, sample_bytes, shard_bytes
from genflow.data.split import validation_count
from genflow.data.tarstream import TarFormatError, tar_members

_SHUFFLE_BUFFER = 1000  # samples (~12 KB each) each worker holds to mix its stream
# What webdataset's group_by_keys makes of a sample prepare writes: its two members, nothing else.
_SAMPLE_FIELDS = {"__key__", "__url__", IMAGE_EXT, ATTRS_EXT}


def read_stats(shards: str | Path) -> dict:
    """stats.json of a finished prepare (a folder or a URI, genflow/storage.py); a clear error
    when the location is not one."""
    folder = str(shards)
    path = storage.join(folder, "stats.json")
    if not storage.is_file(path):
        if not storage.is_dir(folder):
            raise FileNotFoundError(f"{folder}: no such shard folder ({storage.why_absent(folder)}); run "
                                    "`genflow data prepare` (data.shards)")
        raise FileNotFoundError(
            f"{folder}: no stats.json, so not a finished `genflow data prepare` output (interrupted?); run it again"
        )
    return json.loads(storage.read_text(path))


def dataset_digest(shards: str | Path) -> str:
    """One sha256 over every shard's sha256, each verified against the file (genflow.data.verify)."""
    from genflow.data.verify import verified_digest

    return verified_digest(shards)


class ShardStream(IterableDataset):
    """One rank's batches of one split for one epoch; see the module docstring for the plan."""

    def __init__(
        self,
        shards: str | Path,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        limit_batches: int | None = None,
        whole_batches: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        folder = str(shards)
        stats = read_stats(folder)
        # (file, first sample, stop) pieces of shards, in the order prepare wrote them.
        pieces = split_pieces(folder, stats, split)
        self.files = [file for file, _, _ in pieces]
        self.firsts = [first for _, first, _ in pieces]
        self.counts = [stop - first for _, first, stop in pieces]
        self.size = stats["params"]["size"]
        self.folder, self.stride, self._ranged = folder, sample_bytes(self.size), None
        # stats.json's records of the shards read (one shard may hold train and validation pieces).
        records = {storage.join(folder, shard["file"]): shard for shards in stats["shards"].values() for shard in shards}
        self.records = [records[file] for file in dict.fromkeys(self.files)]
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.epoch, self.shuffle, self.limit_batches = seed, epoch, shuffle, limit_batches
        self.whole_batches = whole_batches
        if whole_batches and len(self) == 0:
            raise ValueError(f"{folder}: the {split!r} split has {sum(self.counts)} images, fewer than one batch of "
                             f"{batch_size} for each of {world_size} ranks; lower train.batch_size or train.workers")

    @property
    def samples_per_rank(self) -> int:
        per_rank = math.ceil(sum(self.counts) / self.world_size)
        return per_rank if self.limit_batches is None else min(per_rank, self.limit_batches * self.batch_size)

    def __len__(self) -> int:
        if self.whole_batches:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 batches: images [B, 3, size, size], attrs [B, 40] (ShardLoader scales them)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches = len(self)
        first_batch, end_batch = batches * worker // workers, batches * (worker + 1) // workers
        start = first_batch * self.batch_size
        stop = min(end_batch * self.batch_size, self.samples_per_rank)
        samples = self._read(self._segments(start, stop))
        if self.shuffle:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
            samples = wds_filters.shuffle(_SHUFFLE_BUFFER, _SHUFFLE_BUFFER, rng=rng)(samples)
        while batch := list(itertools.islice(samples, self.batch_size)):
            yield self._collate(batch)

    def _segments(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(shard index, first, stop) sample ranges covering this worker's [start, stop) of the rank."""
        order, offset = list(range(len(self.files))), 0
        total = sum(self.counts)
        if self.shuffle:
            rng = random.Random(f"{self.seed}:{self.epoch}")  # the same on every rank
            rng.shuffle(order)
            offset = rng.randrange(total)
        begins = np.cumsum([0] + [self.counts[i] for i in order])
        segments = []
        position = (offset + self.rank * math.ceil(total / self.world_size) + start) % total
        remaining = stop - start
        while remaining > 0:
            j = int(np.searchsorted(begins, position, side="right")) - 1
            first = position - int(begins[j])
            take = min(remaining, self.counts[order[j]] - first)
            segments.append((order[j], first, first + take))
            remaining -= take
            position = (position + take) % total
        return segments

    def ranged_keys(self) -> dict[str, np.ndarray]:
        """{shard file: the key of each of its samples} of the shards read by byte ranges; read once
        (ShardLoader reads it before its workers start, which then have it)."""
        if self._ranged is None:
            self._ranged = ranged_keys(self.folder, self.records, self.size)
        return self._ranged

    def _read(self, segments: list[tuple[int, int, int]]) -> Iterator[dict]:
        for shard, first, stop in segments:
            offset = self.firsts[shard]
            yield from self._shard_samples(self.files[shard], offset + first, offset + stop)

    def _shard_samples(self, path: str, first: int, stop: int) -> Iterator[dict]:
        """Samples first ... stop - 1 of the shard at `path`, reading from sample `first`'s bytes on
        where the shard is laid out as prepare writes it (benchmarks/loader.py prints the bytes saved)."""
        keys = self.ranged_keys().get(path)
        if keys is not None:
            # Sample k is at byte k * stride only in what prepare wrote, so every sample the range
            # yields must be the one the manifest lists at its place, with prepare's two members.
            # Anything else (another writer's layout, a shard edited since) is read from its first
            # byte, from the first sample that disagrees: that read defines sample k (the k-th group
            # of members) and checks every header, so such a shard still gives exactly the samples
            # it gave before ranged reads, at the old cost, and a corrupt one is refused there as
            # before. An error here would refuse tars that read correctly; verify's sha256s are
            # what tell an edited shard (genflow/data/verify.py).
            try:
                for sample in group_by_keys(tar_members(path, first * self.stride, stop * self.stride)):
                    if first == stop or sample.keys() != _SAMPLE_FIELDS or sample["__key__"] != keys[first]:
                        break
                    yield sample
                    first += 1
            except TarFormatError:
                pass
            if first == stop:
                return
            warnings.warn(f"{path}: byte {first * self.stride} does not hold sample {first} as `genflow data prepare` "
                          f"writes it (the key {MANIFEST_FILE} lists, two members); reading the shard from its first "
                          "byte instead (run `genflow data prepare` again to read only the samples needed)", stacklevel=2)
        # webdataset groups the members into samples; tar_members reads them ~5x faster than
        # the tarfile-based expander webdataset would use (benchmarks/loader.py).
        yield from itertools.islice(group_by_keys(tar_members(path)), first, stop)

    def _collate(self, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        # The shards' fixed headers are checked, then the bytes are used where they lie: decoding
        # is a comparison and a copy (see shards.py for why PPM).
        header, size = ppm_header(self.size), self.size
        pixels = np.empty((len(batch), 3, size, size), np.uint8)
        attrs = np.empty((len(batch), len(ATTRIBUTE_NAMES)), np.uint8)
        for i, sample in enumerate(batch):
            image, values = sample[IMAGE_EXT], sample[ATTRS_EXT]
            if not (image.startswith(header) and values.startswith(ATTRS_NPY_HEADER)):
                raise ValueError(f"{sample['__url__']}: sample {sample['__key__']} is not what prepare writes; run it again")
            pixels[i] = np.frombuffer(image, np.uint8, offset=len(header)).reshape(size, size, 3).transpose(2, 0, 1)
            attrs[i] = np.frombuffer(values, np.uint8, offset=len(ATTRS_NPY_HEADER))
        return torch.from_numpy(pixels), torch.from_numpy(attrs)


def split_pieces(folder: str, stats: dict, split: str) -> list[tuple[str, int, int]]:
    """The (shard file, first sample, stop) pieces that make up `split`, in written order; the
    shards are checked against stats.json first."""
    source = "train" if split in ("train", "validation") else split
    listed = stats["shards"].get(source)
    if split not in ("train", "validation", "test") or not listed:
        raise ValueError(f"{folder}: no {split!r} shards (splits: train, validation, test); run `genflow data prepare`")
    for shard in listed:
        path = storage.join(folder, shard["file"])
        if storage.file_size(path) != shard["bytes"]:
            raise FileNotFoundError(f"{path}: missing or not the size stats.json records; run `genflow data prepare` again")
    total = sum(shard["count"] for shard in listed)
    # The validation set is the train split's tail (genflow/data/split.py); "train" is the rest.
    begin, end = {"train": (0, total - validation_count(total)), "validation": (total - validation_count(total), total),
                  "test": (0, total)}[split]
    pieces, position = [], 0
    for shard in listed:
        first, stop = max(begin - position, 0), min(end - position, shard["count"])
        if first < stop:
            pieces.append((storage.join(folder, shard["file"]), first, stop))
        position += shard["count"]
    if not pieces:
        raise ValueError(f"{folder}: the {split!r} split is empty ({total} {source} images); prepare more images")
    return pieces


def ranged_keys(folder: str, shards: list[dict], size: int) -> dict[str, np.ndarray]:
    """{file: the key of each of its samples, in order} of those of `shards` (stats.json records)
    that can be read by byte ranges: a shard whose size is what prepare writes for its count
    (shards.shard_bytes), and whose samples the manifest lists. The others are read from their
    first byte to each range (a warning says so): the shards of another writer, or of an output
    whose manifest is gone."""
    fixed = [shard for shard in shards if shard["bytes"] == shard_bytes(shard["count"], size)]
    listed, why = _manifest_keys(folder) if fixed else ({}, "")
    ranged = {storage.join(folder, shard["file"]): listed[shard["file"]] for shard in fixed
              if len(listed.get(shard["file"], ())) == shard["count"]}
    if len(ranged) < len(shards):
        warnings.warn(f"{folder}: {len(shards) - len(ranged)} of {len(shards)} shards are not laid out as `genflow data "
                      f"prepare` writes them (samples of {sample_bytes(size)} bytes, listed in {MANIFEST_FILE}{why}); "
                      "each range of them is read from the shard's first byte (run `genflow data prepare` again to "
                      "read only the samples needed)", stacklevel=3)
    return ranged


def _manifest_keys(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """({shard file as stats.json names it: its samples' keys in written order}, "" or why there
    are none: no manifest, or one that cannot be read)."""
    path = storage.join(folder, MANIFEST_FILE)
    if not storage.is_file(path):
        return {}, ": there is none"
    filesystem, inner = storage.filesystem(path)
    try:
        table = pq.read_table(inner, filesystem=filesystem, columns=["shard", "key"], read_dictionary=["shard"])
    except pa.ArrowException as err:  # its first line: a missing column's error goes on with the file's whole schema
        return {}, f": unreadable, {str(err).strip().splitlines()[0]}"
    shard = table["shard"].combine_chunks()
    codes, keys = shard.indices.to_numpy(), table["key"].to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")  # rows grouped by shard, each group in written order
    groups = np.split(keys[order], np.cumsum(np.bincount(codes, minlength=len(shard.dictionary)))[:-1])
    # Fixed-width strings: one buffer, not an object per key, for the loader workers to share.
    return {file: group.astype(str) for file, group in zip(shard.dictionary.to_pylist(), groups)}, ""


class ShardLoader(DataLoader):
    """A DataLoader of (images, attrs) float32 batches from a ShardStream.

    Workers send uint8 and the floats are made here: a worker's batch travels through fresh
    shared memory, whose page faults cost more than the conversion when it is 4x larger.
    """

    def __init__(self, stream: ShardStream, image_range: tuple[float, float], num_workers: int):
        super().__init__(stream, batch_size=None, num_workers=num_workers)
        self.image_range = image_range

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        low, high = self.image_range
        scale, low = np.float32((high - low) / 255.0), np.float32(low)
        self.dataset.ranged_keys()  # here, not once in every worker
        for images, attrs in super().__iter__():
            # numpy, not torch: one pass on one thread, where torch's threads contend with the
            # loader's workers for the cores.
            pixels = np.multiply(images.numpy(), scale, dtype=np.float32)
            if low:
                pixels += low
            yield torch.from_numpy(pixels), torch.from_numpy(attrs.numpy().astype(np.float32))


class TrainLoader(ShardLoader):
    """A ShardLoader whose every iteration is the next epoch (or the one set_epoch names)."""

    def __init__(self, stream: ShardStream, image_range: tuple[float, float], num_workers: int):
        super().__init__(stream, image_range, num_workers)
        self.next_epoch = stream.epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Workers copy the dataset when the iteration starts: set the epoch before that.
        self.dataset.epoch = self.next_epoch
        self.next_epoch += 1
        return super().__iter__()


def train_loader(
    shards: str | Path,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 1,
    seed: int = 0,
    epoch: int = 0,
    image_range: tuple[float, float] = (0.0, 1.0),
    split: str = "train",
) -> TrainLoader:
    """Shuffled whole batches of `split` for DDP rank `rank`: the same number on every rank.

    Iterate it once per epoch; `loader.batches_per_epoch` (= len(loader)) batches each time.
    """
    stream = ShardStream(shards, split, batch_size, rank, world_size, seed, epoch, shuffle=True, whole_batches=True)
    return TrainLoader(stream, image_range, num_workers)


def eval_loader(
    shards: str | Path,
    *,
    split: str = "test",
    batch_size: int,
    num_workers: int = 0,
    image_range: tuple[float, float] = (0.0, 1.0),
    limit_batches: int | None = None,
) -> ShardLoader:
    """Every sample of `split` once (the first `limit_batches` batches), in shard order; the
    last batch may be short. `split="validation"` is what model selection scores.

    With workers, each reads a contiguous block of batches and the DataLoader interleaves
    them: the order is still the same on every run.
    """
    stream = ShardStream(shards, split, batch_size, shuffle=False, limit_batches=limit_batches)
    return ShardLoader(stream, image_range, num_workers)
