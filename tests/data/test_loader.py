import hashlib
import io
import itertools
import json
import re
import shutil
import tarfile
import warnings
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from genflow.data.loader import ShardStream, dataset_digest, eval_loader, read_stats, train_loader
from genflow.data.tarstream import tar_members
from genflow.data.verify import ShardError


def keys_by_pixels(shards, split):
    """The key of each image of the split, by its pixel bytes (the loader yields no keys)."""
    keys = {}
    for shard in read_stats(shards)["shards"][split]:
        with tarfile.open(shards / shard["file"]) as tar:
            for member in tar:
                if member.name.endswith(".ppm"):
                    pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                    keys[pixels.transpose(2, 0, 1).tobytes()] = member.name.split(".")[0]
    return keys


def seen_keys(batches, keys):
    return [keys[image.mul(255).round().byte().numpy().tobytes()] for images, _ in batches for image in images]


def epoch_per_rank(shards, world_size, epochs=1, **kwargs):
    loaders = [train_loader(shards, rank=rank, world_size=world_size, **kwargs) for rank in range(world_size)]
    return [[list(loader) for loader in loaders] for _ in range(epochs)], loaders


def training_keys(shards):
    """The keys of the "train" split: the prepared train split minus its validation tail."""
    keys = keys_by_pixels(shards, "train")
    return {pixels: key for pixels, key in keys.items() if key not in set(validation_keys(shards, keys))}


def validation_keys(shards, keys):
    return seen_keys(eval_loader(shards, split="validation", batch_size=4), keys)


def test_validation_is_the_train_splits_tail_and_training_never_sees_it(prepared):
    # 70 train images (shards of 16,16,16,16,6): validation_count(70) = 7, the last 7 as written.
    keys = keys_by_pixels(prepared, "train")
    manifest = pq.read_table(prepared / "manifest.parquet").to_pandas()
    written = list(manifest[manifest["split"] == "train"]["key"])
    assert validation_keys(prepared, keys) == written[-7:]
    (ranks,), _ = epoch_per_rank(prepared, 1, epochs=1, batch_size=9, num_workers=2, seed=0)
    trained = seen_keys(ranks[0], keys)
    assert sorted(trained) == sorted(written[:-7])  # 63 = 7 whole batches of 9
    assert len(seen_keys(eval_loader(prepared, split="train", batch_size=16), keys)) == 63
    # The test split is untouched by the carving.
    assert len(list(itertools.chain.from_iterable(i for i, _ in eval_loader(prepared, split="test", batch_size=8)))) == 30


def test_short_last_training_batch_is_never_a_single_image(prepared):
    n = sum(len(images) for images, _ in eval_loader(prepared, split="train", batch_size=16))
    loader = train_loader(prepared, batch_size=n - 1, num_workers=0, seed=0)
    assert [len(images) for images, _ in loader] == [n - 1]
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_loader(prepared, batch_size=n + 1, num_workers=0)


def test_two_ranks_two_workers_see_every_sample_at_most_once_per_epoch(prepared):
    # 63 training images: 32 per rank (64 slots, one image twice), 4 whole batches of 8 each.
    keys = training_keys(prepared)
    epochs, loaders = epoch_per_rank(prepared, 2, epochs=2, batch_size=8, num_workers=2, seed=1)
    assert [loader.batches_per_epoch for loader in loaders] == [4, 4] and len(loaders[0]) == 4
    rank_sets = []
    for ranks in epochs:
        assert [len(batches) for batches in ranks] == [4, 4]
        seen = Counter(seen_keys(ranks[0], keys) + seen_keys(ranks[1], keys))
        assert set(seen) == set(keys.values()) and sum(seen.values()) == 64 and max(seen.values()) == 2
        assert [len(images) for images, _ in ranks[0]] == [8, 8, 8, 8]
        rank_sets.append(set(seen_keys(ranks[0], keys)))
    assert rank_sets[0] != rank_sets[1]  # the next epoch reshuffles across ranks


def test_uneven_split_gives_equal_batches(prepared):
    # 63 over 3 ranks: 21 each, so 4 whole batches of 5 and one image per rank left for another epoch.
    keys = training_keys(prepared)
    (ranks,), _ = epoch_per_rank(prepared, 3, batch_size=5, num_workers=2, seed=0)
    assert [len(batches) for batches in ranks] == [4, 4, 4]
    seen = Counter(key for batches in ranks for key in seen_keys(batches, keys))
    assert sum(seen.values()) == 60 and max(seen.values()) == 1


def test_worker_count_does_not_change_what_a_rank_sees(prepared):
    keys = keys_by_pixels(prepared, "train")
    by_workers = {}
    for workers in (0, 1, 2):
        loader = train_loader(prepared, batch_size=4, rank=1, world_size=2, num_workers=workers, seed=2)
        batches = list(loader)
        assert len(batches) == loader.batches_per_epoch == 8
        by_workers[workers] = sorted(seen_keys(batches, keys))
    assert by_workers[0] == by_workers[1] == by_workers[2]


def test_epochs_advance_and_set_epoch_replays(prepared):
    keys = keys_by_pixels(prepared, "train")
    loader = train_loader(prepared, batch_size=9, num_workers=0, seed=0)
    first, second = seen_keys(list(loader), keys), seen_keys(list(loader), keys)
    assert sorted(first) == sorted(second) and first != second
    loader.set_epoch(0)
    assert seen_keys(list(loader), keys) == first
    resumed = train_loader(prepared, batch_size=9, num_workers=0, seed=0, epoch=1)
    assert seen_keys(list(resumed), keys) == second


def test_images_and_attrs_types_ranges_and_values(prepared):
    manifest = pq.read_table(prepared / "manifest.parquet").to_pandas()
    test_rows = manifest[manifest["split"] == "test"]
    unit = list(eval_loader(prepared, batch_size=8))
    signed = list(eval_loader(prepared, batch_size=8, image_range=(-1.0, 1.0)))
    assert [len(images) for images, _ in unit] == [8, 8, 8, 6]
    images, attrs = unit[0]
    assert images.dtype == attrs.dtype == torch.float32
    assert images.shape == (8, 3, 64, 64) and attrs.shape == (8, 40) and images.is_contiguous()
    all_images = torch.cat([i for i, _ in unit])
    all_signed = torch.cat([i for i, _ in signed])
    assert all_images.min() >= 0 and all_images.max() <= 1 and all_images.max() > 0.9
    assert all_signed.min() >= -1 and all_signed.max() <= 1 and all_signed.min() < -0.9
    assert torch.allclose(all_signed, all_images * 2 - 1, atol=1e-6)
    # Shard order is manifest order: the attributes line up with the manifest's.
    all_attrs = torch.cat([a for _, a in unit]).numpy()
    assert set(np.unique(all_attrs)) <= {0.0, 1.0}
    assert (all_attrs == test_rows.iloc[:, 3:].to_numpy(dtype=np.float32)).all()


def test_eval_loader_is_deterministic_complete_and_limited(prepared):
    keys = keys_by_pixels(prepared, "test")
    once = seen_keys(eval_loader(prepared, batch_size=7), keys)
    assert once == seen_keys(eval_loader(prepared, batch_size=7), keys)
    assert sorted(once) == sorted(keys.values()) and len(once) == 30
    with_workers = eval_loader(prepared, batch_size=7, num_workers=2)
    assert sorted(seen_keys(with_workers, keys)) == sorted(once)
    limited = eval_loader(prepared, batch_size=7, limit_batches=2)
    assert len(limited) == 2 and seen_keys(limited, keys) == once[:14]


def test_refuses_unfinished_or_altered_shard_folders(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="run `genflow data prepare`"):
        train_loader(tmp_path / "absent", batch_size=4)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no stats.json"):
        train_loader(tmp_path / "half", batch_size=4)
    stats = read_stats(prepared)
    stats["shards"]["train"][0]["bytes"] += 1
    altered = tmp_path / "altered"
    altered.mkdir()
    (altered / "train").symlink_to(prepared / "train")
    (altered / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(FileNotFoundError, match="celeba64-000000.tar: missing or not the size"):
        ShardStream(altered, "train", 4)
    with pytest.raises(ValueError, match="no 'val' shards \\(splits: train, validation, test\\)"):
        eval_loader(prepared, split="val", batch_size=4)


def test_dataset_digest_names_the_shard_contents(prepared, tmp_path):
    digest = dataset_digest(prepared)
    assert len(digest) == 64 and digest == dataset_digest(prepared)
    # The digest is of the verified files: a recorded hash the file does not have is an error,
    # not another name (genflow.data.verify).
    copy = shutil.copytree(prepared, tmp_path / "shards")
    stats = read_stats(copy)
    stats["shards"]["test"][1]["sha256"] = "0" * 64
    (copy / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(ShardError, match="content differs from the sha256 stats.json records"):
        dataset_digest(copy)


def copy_to(folder, location):
    """Every file of a local shard folder, uploaded under `location` (a URI)."""
    from genflow import storage

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload(path, storage.join(location, str(path.relative_to(folder))))


def test_a_bucket_streams_the_same_batches_as_a_local_copy(prepared, s3_bucket):
    from genflow.data.attributes import training_attribute_table
    from genflow.eval.fid import Source

    remote = f"{s3_bucket}/shards"
    copy_to(prepared, remote)
    assert read_stats(remote) == read_stats(prepared) and dataset_digest(remote) == dataset_digest(prepared)
    for local_batch, remote_batch in itertools.zip_longest(eval_loader(prepared, batch_size=16),
                                                           eval_loader(remote, batch_size=16)):
        assert all(torch.equal(a, b) for a, b in zip(local_batch, remote_batch))
    # Rank 1 of 2 with a DataLoader worker (a forked process opening its own streams): only its
    # own shards, the same samples in the same order as from the folder.
    loaders = [train_loader(shards, batch_size=8, rank=1, world_size=2, num_workers=1, seed=5) for shards in (prepared, remote)]
    local_epoch, remote_epoch = (list(loader) for loader in loaders)
    assert len(remote_epoch) == len(local_epoch) > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(local_epoch, remote_epoch))
    assert torch.equal(training_attribute_table(remote), training_attribute_table(prepared))
    assert (Source.parse(remote).kind, Source.parse(f"{remote}:train").split) == ("shards", "train")


def test_a_missing_shard_in_a_bucket_is_named(prepared, s3_bucket):
    from genflow import storage

    remote = f"{s3_bucket}/shards"
    copy_to(prepared, remote)
    shard = storage.join(remote, read_stats(prepared)["shards"]["test"][0]["file"])
    storage.remove(shard)
    with pytest.raises(FileNotFoundError, match=rf"{shard}: missing or not the size stats.json records"):
        eval_loader(remote, batch_size=16)
    with pytest.raises(ShardError, match=rf"{shard}: missing"):
        dataset_digest(remote)


class CountingFile:
    """A file whose reads are counted into `counts` (the bytes the loader took from the file)."""

    def __init__(self, file, counts):
        self.file, self.counts = file, counts

    def read(self, size=-1):
        data = self.file.read(size)
        self.counts.append(len(data))
        return data

    def readinto(self, buffer):
        count = self.file.readinto(buffer)
        self.counts.append(count)
        return count

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def count_reads(monkeypatch):
    """[bytes of each read] from the shards from now on, ranged (storage.open_input_file) or from
    byte 0 (storage.open_input, which tar_members reads a whole shard with)."""
    from genflow import storage

    counts = []
    for opener in ("open_input_file", "open_input"):
        monkeypatch.setattr(storage, opener, lambda location, opened=getattr(storage, opener): CountingFile(opened(location), counts))
    return counts


def read_from_byte_zero(monkeypatch):
    """Every shard read as before ranged reads: from its first byte, grouped and sliced."""
    monkeypatch.setattr(ShardStream, "ranged_keys", lambda self: {})


def batches_of(make_loaders):
    return [batch for loader in make_loaders() for batch in loader]


def same_batches(a, b):
    return len(a) == len(b) > 0 and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("make_loaders", [
    # Shuffled: 3 ranks x 2 workers, ranges from random offsets, mid-shard and across shards.
    lambda shards: [train_loader(shards, batch_size=5, rank=rank, world_size=3, num_workers=2, seed=rank) for rank in range(3)],
    lambda shards: [train_loader(shards, batch_size=9, num_workers=0, seed=4, epoch=1)],
    # In order: validation is sample 15 of train shard 3 on, into shard 4; test with 2 workers.
    lambda shards: [eval_loader(shards, split="validation", batch_size=4)],
    lambda shards: [eval_loader(shards, split="test", batch_size=7, num_workers=2)],
], ids=["shuffled-3-ranks-2-workers", "shuffled-1-rank", "validation-mid-shard", "test-2-workers"])
def test_ranged_reads_give_the_batches_of_the_read_from_byte_zero(prepared, monkeypatch, make_loaders):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prepare's shards never fall back
        ranged = batches_of(lambda: make_loaders(prepared))
    read_from_byte_zero(monkeypatch)
    assert same_batches(ranged, batches_of(lambda: make_loaders(prepared)))


def test_a_range_reads_only_its_samples_bytes(prepared, monkeypatch):
    # Validation: sample 15 of train shard 3 (of 16), then samples 0-5 of shard 4 (of 6).
    stream = ShardStream(prepared, "validation", 4, shuffle=False)
    stream.ranged_keys()  # the manifest: read once, not part of the shards' bytes
    stride, calls = stream.stride, []
    monkeypatch.setattr("genflow.data.loader.tar_members", lambda path, *span: calls.append(span) or tar_members(path, *span))
    counts = count_reads(monkeypatch)
    ranged = list(stream)
    assert calls == [(15 * stride, 16 * stride), (0, 6 * stride)]
    assert sum(counts) == 7 * stride
    counts.clear()
    read_from_byte_zero(monkeypatch)
    assert same_batches(ranged, list(stream))
    assert sum(counts) >= 22 * stride  # 16 samples of shard 3 to reach its last, then shard 4's 6


def test_a_bucket_range_fetches_only_its_samples_bytes(prepared, s3_bucket, monkeypatch):
    remote = f"{s3_bucket}/shards"
    copy_to(prepared, remote)
    local = list(ShardStream(prepared, "validation", 4, shuffle=False))
    stream = ShardStream(remote, "validation", 4, shuffle=False)
    stream.ranged_keys()
    counts = count_reads(monkeypatch)  # pyarrow's S3 file: one ranged GET per read, none on a seek
    assert same_batches(list(stream), local)
    assert sum(counts) == 7 * stream.stride


def rewritten(shards, tmp_path, shard_file, rewrite):
    """A copy of `shards` whose `shard_file` is rewrite(members) (a list of (TarInfo, data)), with
    stats.json's size and sha256 of it updated: a consistent output, but for the layout."""
    copy = shutil.copytree(shards, tmp_path / "shards")
    with tarfile.open(copy / shard_file) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar]
    with tarfile.open(copy / shard_file, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in rewrite(members):
            tar.addfile(member, io.BytesIO(data))
    stats = read_stats(copy)
    for shard in stats["shards"]["train"]:
        if shard["file"] == shard_file:
            shard["bytes"] = (copy / shard_file).stat().st_size
            shard["sha256"] = hashlib.sha256((copy / shard_file).read_bytes()).hexdigest()
    (copy / "stats.json").write_text(json.dumps(stats))
    return copy


def with_fractional_mtimes(members):
    # What webdataset's TarWriter writes without a fixed mtime: a pax header before every member.
    for member, data in members:
        member.mtime = 1.5
        yield member, data


def with_two_samples_swapped(members):
    # Samples 15 and 14 of the shard in each other's place: the same size, another order.
    return members[:28] + members[30:32] + members[28:30]


def with_a_member_moved(members):
    # Sample 14 without its attrs (never read: validation starts at 15), sample 15 with an extra
    # member after its attrs: the same size, and byte 15 * stride holds the extra member.
    key = members[30][0].name.split(".")[0]
    extra = tarfile.TarInfo(f"{key}.txt")
    extra.size = 512
    return members[:28] + [members[29], members[30], (extra, bytes(512)), members[31]] + members[32:]


def with_a_block_moved(members):
    # Sample 14's image a block shorter (never read), sample 15 with an empty extra member: the
    # same size, and byte 15 * stride holds the data of sample 15's attrs, not a header.
    (image_info, image), key = members[29], members[30][0].name.split(".")[0]
    image_info.size -= 512
    return members[:29] + [(image_info, image[:-512]), members[30], (tarfile.TarInfo(f"{key}.txt"), b""), *members[31:]]


@pytest.mark.parametrize("rewrite, warned, as_prepared", [
    # Every shard of the split is checked from stats.json alone: this one is larger.
    (with_fractional_mtimes, "1 of 2 shards are not laid out as `genflow data prepare` writes them", True),
    # The same size: found at the seek target, whose sample is not the manifest's.
    (with_two_samples_swapped, "celeba64-000003.tar: byte 215040 does not hold sample 15", False),
    # The same size and the manifest's key there, but not prepare's two members.
    (with_a_member_moved, "celeba64-000003.tar: byte 215040 does not hold sample 15", True),
    # The same size, and no tar header at all there (tar_members refuses its checksum).
    (with_a_block_moved, "celeba64-000003.tar: byte 215040 does not hold sample 15", True),
])
def test_a_shard_laid_out_otherwise_is_read_from_its_first_byte(prepared, tmp_path, monkeypatch, rewrite, warned, as_prepared):
    shards = rewritten(prepared, tmp_path, "train/celeba64-000003.tar", rewrite)
    with pytest.warns(UserWarning, match=re.escape(warned)):
        batches = list(eval_loader(shards, split="validation", batch_size=4))
    assert same_batches(batches, list(eval_loader(prepared, split="validation", batch_size=4))) == as_prepared
    read_from_byte_zero(monkeypatch)
    assert same_batches(batches, list(eval_loader(shards, split="validation", batch_size=4)))


def test_without_a_manifest_every_shard_is_read_from_its_first_byte(prepared, tmp_path):
    copy = shutil.copytree(prepared, tmp_path / "shards")
    (copy / "manifest.parquet").unlink()
    with pytest.warns(UserWarning, match="2 of 2 shards are not laid out .* manifest.parquet: there is none"):
        batches = list(eval_loader(copy, split="validation", batch_size=4))
    assert same_batches(batches, list(eval_loader(prepared, split="validation", batch_size=4)))


def test_a_manifest_without_the_shards_column_is_one_line_of_warning(prepared, tmp_path):
    # A manifest another writer made: the loader reads from byte 0 and says why, in one line.
    copy = shutil.copytree(prepared, tmp_path / "shards")
    manifest = pq.read_table(copy / "manifest.parquet")
    pq.write_table(manifest.drop_columns(["shard"]), copy / "manifest.parquet")
    with pytest.warns(UserWarning) as warned:
        batches = list(eval_loader(copy, split="validation", batch_size=4))
    [message] = [str(warning.message) for warning in warned]
    assert "manifest.parquet: unreadable, No match for FieldRef.Name(shard)" in message and "\n" not in message
    assert same_batches(batches, list(eval_loader(prepared, split="validation", batch_size=4)))
