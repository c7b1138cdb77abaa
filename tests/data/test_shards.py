import hashlib
import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from genflow.config import DataParams
from genflow.data import shards as shards_module
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.data.loader import ShardStream, read_stats
from genflow.data import squares as squares_module
from genflow.data.shards import prepare
from genflow.data.synth import write_sample


def shard_samples(shards, split):
    """{key: {extension: bytes}} over the split's shards, and the tar members in order."""
    samples, members = {}, []
    for shard in read_stats(shards)["shards"][split]:
        with tarfile.open(shards / shard["file"]) as tar:
            for member in tar:
                members.append(member)
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples, members


def pixels(ppm: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(ppm)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_shards_manifest_and_stats(prepared):
    stats = read_stats(prepared)
    manifest = pq.read_table(prepared / "manifest.parquet").to_pydict()
    assert stats["counts"] == {"train": 70, "test": 30, "assigned": {"train": 70, "test": 30}, "rejected": 0, "converted": 0}
    assert [s["count"] for s in stats["shards"]["train"]] == [16, 16, 16, 16, 6]
    assert [s["file"] for s in stats["shards"]["test"]] == ["test/celeba64-000000.tar", "test/celeba64-000001.tar"]
    assert stats["source"]["is_sample"] is False and stats["params"]["crop"] == 148 and stats["params"]["shard_size"] == 16
    assert stats["squares"]["crop_box"] == [15, 35, 163, 183] and stats["squares"]["jpeg_decode_scale"] == 0.5
    for shard in stats["shards"]["train"] + stats["shards"]["test"]:
        data = (prepared / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]

    train, members = shard_samples(prepared, "train")
    assert list(train) == [key for key, split in zip(manifest["key"], manifest["split"]) if split == "train"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    assert [m.name for m in members[:2]] == [f"{manifest['key'][0]}.attrs.npy", f"{manifest['key'][0]}.ppm"]
    row = 5
    key = manifest["key"][row]
    assert manifest["shard"][row] == "train/celeba64-000000.tar"
    attrs = np.load(io.BytesIO(train[key]["attrs.npy"]))
    assert attrs.dtype == np.uint8 and attrs.tolist() == [int(manifest[name][row]) for name in ATTRIBUTE_NAMES]

    images = np.stack([pixels(sample["ppm"]) for sample in train.values()]) / 255.0
    assert images.shape == (70, 64, 64, 3)
    assert np.allclose(stats["mean"], images.mean(axis=(0, 1, 2)), atol=1e-9)
    assert np.allclose(stats["std"], images.std(axis=(0, 1, 2)), atol=1e-9)


def test_sample_k_of_a_shard_starts_at_k_sample_bytes(prepared):
    # What the loader's ranged reads rest on, against tarfile's own reading of the shards.
    stats = read_stats(prepared)
    stride = shards_module.sample_bytes(stats["params"]["size"])
    assert stride == 512 + 512 + 512 + 12800  # attrs.npy: 128 + 40 bytes; ppm: 13 + 64 * 64 * 3
    for shard in stats["shards"]["train"] + stats["shards"]["test"]:
        with tarfile.open(prepared / shard["file"]) as tar:
            members = tar.getmembers()
        assert [m.offset for m in members[::2]] == [k * stride for k in range(shard["count"])]
        assert all(m.name.endswith(".attrs.npy") for m in members[::2]) and len(members) == 2 * shard["count"]
        assert shard["bytes"] == shards_module.shard_bytes(shard["count"], stats["params"]["size"])


def test_three_layouts_give_identical_shards(tmp_path, prepare_into):
    stats = {}
    for layout in ("official", "zip", "kaggle"):
        write_sample(tmp_path / layout, n=30, layout=layout, seed=7)
        stats[layout] = prepare_into(tmp_path / layout, tmp_path / f"shards-{layout}", processes=2)
    assert stats["zip"]["shards"] == stats["official"]["shards"] == stats["kaggle"]["shards"]
    manifests = [pq.read_table(tmp_path / f"shards-{layout}" / "manifest.parquet") for layout in stats]
    assert manifests[0].equals(manifests[1]) and manifests[0].equals(manifests[2])
    assert manifests[0].num_rows == 30


def test_reruns_are_byte_identical_whatever_the_process_count(tmp_path, prepare_into):
    write_sample(tmp_path / "s", n=40, seed=2)
    first = prepare_into(tmp_path / "s", tmp_path / "a", processes=1, shard_size=7)
    again = prepare_into(tmp_path / "s", tmp_path / "a", processes=1, shard_size=7)
    parallel = prepare_into(tmp_path / "s", tmp_path / "b", processes=2, shard_size=7)
    assert first["shards"] == again["shards"] == parallel["shards"]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 4 + 2  # stats, manifest, 4 train shards (28 = 4 x 7), 2 test shards (12)
    for name in files:
        if name.name != "stats.json":  # it names the output folder
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def corrupt(root):
    """Every kind of bad input, one image each; returns the expected outcome per file."""
    images = root / "img_align_celeba"

    def rewrite(name, convert):
        with Image.open(images / name) as image:
            image.load()
        convert(image, images / name)

    data = (images / "000001.jpg").read_bytes()
    (images / "000001.jpg").write_bytes(data[: len(data) // 2])
    rewrite("000002.jpg", lambda image, path: image.convert("L").save(path, "JPEG", quality=90))
    rewrite("000003.jpg", lambda image, path: image.convert("CMYK").save(path, "JPEG", quality=90))
    rewrite("000004.jpg", lambda image, path: image.save(path, "PNG"))
    (images / "000005.jpg").unlink()
    shutil.copy(images / "000006.jpg", images / "extra.jpg")
    attr_file = root / "list_attr_celeba.txt"
    lines = attr_file.read_text().splitlines()
    lines[8] = lines[8].rsplit(" ", 1)[0]  # line 9: 000007.jpg loses a value
    attr_file.write_text("\n".join(lines) + "\n")
    rewrite("000008.jpg", lambda image, path: image.resize((100, 120)).save(path, "JPEG"))
    (images / "000009.jpg").write_bytes(b"not an image")
    rejected = {
        "img_align_celeba/000001.jpg": "corrupt JPEG: ",
        "img_align_celeba/000005.jpg": "listed in list_attr_celeba.txt but missing from img_align_celeba",
        "img_align_celeba/extra.jpg": "not listed in list_attr_celeba.txt",
        "list_attr_celeba.txt:9": "000007.jpg: expected 40 attribute values, got 39",
        "img_align_celeba/000008.jpg": "wrong size 100x120, expected 178x218 (img_align_celeba)",
        "img_align_celeba/000009.jpg": "not a readable image: ",
    }
    converted = {
        "img_align_celeba/000002.jpg": "grayscale JPEG, converted to RGB",
        "img_align_celeba/000003.jpg": "CMYK JPEG, converted to RGB",
        "img_align_celeba/000004.jpg": "PNG data under a .jpg name, decoded",
    }
    return rejected, converted


def test_bad_inputs_are_converted_or_rejected_with_reasons(tmp_path, prepare_into):
    write_sample(tmp_path / "clean", n=40, seed=1)
    clean = prepare_into(tmp_path / "clean", tmp_path / "clean-shards", shard_size=100)
    shutil.copytree(tmp_path / "clean", tmp_path / "bad")
    expected_rejected, expected_converted = corrupt(tmp_path / "bad")
    stats = prepare_into(tmp_path / "bad", tmp_path / "shards", max_reject_fraction=0.2, shard_size=100)

    rejected = {r["file"]: r["reason"] for r in stats["rejected"]}
    assert rejected.keys() == expected_rejected.keys()
    for file, reason in expected_rejected.items():
        assert rejected[file].startswith(reason), (file, rejected[file])
    assert {r["file"]: r["note"] for r in stats["converted"]} == expected_converted
    assert stats["counts"]["rejected"] == 6 and stats["counts"]["converted"] == 3
    # The 39 well-formed rows were split (000005, listed but missing, among them), then the 4
    # unusable images dropped from their split.
    assert stats["counts"]["assigned"] == {"train": 27, "test": 12}
    assert stats["counts"]["train"] + stats["counts"]["test"] == 35

    manifest = pq.read_table(tmp_path / "shards" / "manifest.parquet").to_pydict()
    kept = set(manifest["key"])
    assert kept == {f"{i:06d}" for i in range(1, 41)} - {"000001", "000005", "000007", "000008", "000009"}
    ours = {**shard_samples(tmp_path / "shards", "train")[0], **shard_samples(tmp_path / "shards", "test")[0]}
    reference = {**shard_samples(tmp_path / "clean-shards", "train")[0], **shard_samples(tmp_path / "clean-shards", "test")[0]}
    assert clean["counts"]["rejected"] == 0
    gray = pixels(ours["000002"]["ppm"])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert psnr(pixels(ours["000003"]["ppm"]), pixels(reference["000003"]["ppm"])) > 30  # CMYK, colours kept
    assert psnr(pixels(ours["000004"]["ppm"]), pixels(reference["000004"]["ppm"])) > 35  # PNG, same picture


def test_too_many_rejects_fail_clearly_and_leave_no_output(tmp_path, prepare_into):
    write_sample(tmp_path / "s", n=20)
    prepare_into(tmp_path / "s", tmp_path / "shards")  # a previous good output
    data = (tmp_path / "s" / "img_align_celeba" / "000003.jpg").read_bytes()
    (tmp_path / "s" / "img_align_celeba" / "000003.jpg").write_bytes(data[:300])
    with pytest.raises(ValueError) as err:
        prepare_into(tmp_path / "s", tmp_path / "shards", max_reject_fraction=0.0)
    message = str(err.value)
    report = tmp_path / "shards.rejected.json"
    assert "1 of 20 images rejected (5.00%)" in message
    assert "data.max_reject_fraction=0.0" in message and str(report) in message
    assert "img_align_celeba/000003.jpg: corrupt JPEG" in message
    assert not (tmp_path / "shards").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "shards.rejected.json"]
    assert json.loads(report.read_text())[0]["file"] == "img_align_celeba/000003.jpg"

    prepare_into(tmp_path / "s", tmp_path / "shards", max_reject_fraction=0.1)
    assert not report.exists()  # the stats of a good run list the rejects; no stale report


def test_interrupted_prepare_leaves_nothing_the_loader_accepts(tmp_path, prepare_into, monkeypatch):
    write_sample(tmp_path / "s", n=30)
    calls = []

    def crash_midway(*args):
        calls.append(1)
        if len(calls) == 12:
            # The state a kill at this moment would leave: only a hidden temp folder, unfinished.
            (unfinished,) = tmp_path.glob(".shards.tmp-*")
            assert any(unfinished.rglob("*.tar")) and not (tmp_path / "shards").exists()
            for refused in (lambda: read_stats(unfinished), lambda: ShardStream(unfinished, "train", 4)):
                with pytest.raises(FileNotFoundError, match="no stats.json"):
                    refused()
            raise RuntimeError("worker died")
        return real_decode_rgb(*args)

    real_decode_rgb = squares_module.decode_rgb
    monkeypatch.setattr(squares_module, "decode_rgb", crash_midway)
    with pytest.raises(RuntimeError, match="worker died"):
        prepare_into(tmp_path / "s", tmp_path / "shards", shard_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_failing_worker_process_keeps_the_previous_output(tmp_path, prepare_into, monkeypatch):
    write_sample(tmp_path / "s", n=30)
    good = prepare_into(tmp_path / "s", tmp_path / "shards")

    def crash(*args):
        raise RuntimeError("worker died")

    monkeypatch.setattr(squares_module, "decode_rgb", crash)
    with pytest.raises(RuntimeError, match="worker died"):
        prepare_into(tmp_path / "s", tmp_path / "shards", processes=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "shards"]
    assert read_stats(tmp_path / "shards")["shards"] == good["shards"]


def test_sample_source_warns_loudly(tmp_path, capsys):
    write_sample(tmp_path / "sample", n=12)
    stats = prepare(DataParams(source="sample", sample={"dir": str(tmp_path / "sample")}, shards=str(tmp_path / "shards"), processes=1))
    assert stats["source"] == {"path": str(tmp_path / "sample"), "layout": "official", "is_sample": True}
    assert "This is NOT CelebA" in capsys.readouterr().err


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("out", ["user_folder", "source", "parent_of_source", "cwd"])
def test_prepare_never_replaces_a_folder_it_did_not_write(tmp_path, prepare_into, monkeypatch, out):
    write_sample(tmp_path / "data" / "s", n=12)
    (tmp_path / "data" / "user_folder").mkdir()
    (tmp_path / "data" / "user_folder" / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path / "data")
    target = {"user_folder": tmp_path / "data" / "user_folder", "source": tmp_path / "data" / "s",
              "parent_of_source": tmp_path / "data", "cwd": "."}[out]
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="choose another --out"):
        prepare_into(tmp_path / "data" / "s", target)
    assert tree(tmp_path) == before  # nothing deleted, nothing left behind (no .tmp- folder)


def test_prepare_replaces_its_own_output_and_says_so(tmp_path, prepare_into, capsys):
    write_sample(tmp_path / "s", n=12)
    prepare_into(tmp_path / "s", tmp_path / "shards")
    assert f"prepare: writing {tmp_path / 'shards'}" in capsys.readouterr().err
    prepare_into(tmp_path / "s", tmp_path / "shards", shard_size=4)
    assert f"prepare: replacing the earlier prepare output in {tmp_path / 'shards'}" in capsys.readouterr().err
    (tmp_path / "shards" / "train" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files prepare did not write \(train/notes.txt\)"):
        prepare_into(tmp_path / "s", tmp_path / "shards")
    assert (tmp_path / "shards" / "train" / "notes.txt").read_text() == "mine"


def test_prepare_into_a_bucket_writes_what_it_writes_into_a_folder_and_stats_json_last(tmp_path, s3_bucket, prepare_into,
                                                                                       monkeypatch):
    from genflow import storage
    from genflow.data.verify import verify_shards

    write_sample(tmp_path / "sample", n=40, seed=1)
    local = prepare_into(tmp_path / "sample", tmp_path / "shards", shard_size=8)
    uploaded, copied = [], []
    upload, copy = storage.upload, storage.copy
    monkeypatch.setattr(storage, "upload", lambda file, location: uploaded.append(location) or upload(file, location))
    monkeypatch.setattr(storage, "copy", lambda source, target: copied.append(target) or copy(source, target))
    remote = f"{s3_bucket}/shards"
    stats = prepare_into(tmp_path / "sample", remote, shard_size=8)
    assert stats["shards"] == local["shards"] and stats["counts"] == local["counts"]  # byte-identical shards
    assert read_stats(remote) == stats and verify_shards(remote) == verify_shards(tmp_path / "shards")
    # Uploaded to a hidden prefix beside it as each file was finished, then copied in, stats.json last.
    assert all(location.startswith(f"{s3_bucket}/.shards.staging-") for location in uploaded)
    assert len(uploaded) == len(copied) == 2 + sum(len(split) for split in stats["shards"].values())
    assert copied[-1] == f"{remote}/stats.json"
    assert storage.listdir(remote) == [("manifest.parquet", False), ("stats.json", False), ("test", True), ("train", True)]
    assert storage.listdir(s3_bucket) == [("shards", True)]  # the hidden prefix is gone
    filesystem, path = storage.filesystem(f"{remote}/manifest.parquet")
    assert pq.read_table(path, filesystem=filesystem).equals(pq.read_table(tmp_path / "shards" / "manifest.parquet"))


def test_a_failed_prepare_leaves_the_earlier_dataset_under_the_uri_as_it_was(tmp_path, s3_bucket, prepare_into,
                                                                            monkeypatch):
    from genflow import storage

    write_sample(tmp_path / "sample", n=20, seed=1)
    remote = f"{s3_bucket}/shards"
    earlier = prepare_into(tmp_path / "sample", remote)
    files = storage.listdir(f"{remote}/train")
    assert "replacing the earlier prepare output" in shards_module.check_replaceable(remote, tmp_path / "sample")

    def fail(*args, **kwargs):
        raise RuntimeError("stopped after the shards were uploaded")

    monkeypatch.setattr(shards_module, "_stats", fail)
    with pytest.raises(RuntimeError, match="stopped after"):
        prepare_into(tmp_path / "sample", remote)
    # The earlier output whole (the CelebA shards cost hours to rebuild), and no half of the new one.
    assert read_stats(remote) == earlier and storage.listdir(f"{remote}/train") == files
    assert storage.listdir(s3_bucket) == [("shards", True)]


def test_prepare_refuses_a_buckets_root(tmp_path, s3_bucket, prepare_into):
    from genflow import storage

    write_sample(tmp_path / "sample", n=12, seed=1)
    with pytest.raises(ValueError, match=rf"{s3_bucket} is a bucket's root: give a prefix in it, e\.g\. {s3_bucket}/shards"):
        prepare_into(tmp_path / "sample", s3_bucket)
    assert storage.listdir(s3_bucket) == []


def test_prepare_refuses_a_prefix_it_did_not_write_and_a_missing_bucket(tmp_path, s3_bucket, prepare_into):
    from genflow import storage

    write_sample(tmp_path / "sample", n=20, seed=1)
    storage.write_bytes(f"{s3_bucket}/mine/notes.txt", "the user's")
    with pytest.raises(ValueError, match=rf"{s3_bucket}/mine holds files prepare did not write \(notes.txt\)"):
        prepare_into(tmp_path / "sample", f"{s3_bucket}/mine")
    assert storage.read_text(f"{s3_bucket}/mine/notes.txt") == "the user's"
    missing = s3_bucket.replace("genflow-", "missing-")
    with pytest.raises(ValueError, match=rf"cannot write {missing}/shards: the store has no bucket"):
        prepare_into(tmp_path / "sample", f"{missing}/shards")


def test_a_celeba_sources_shards_do_not_depend_on_the_sample_settings(tmp_path):
    # Under DVC prepare depends on data.sample.dir too (dvc.yaml): a changed data.sample.n reruns
    # it on a CelebA source, and the same shards then keep every later stage from running again.
    write_sample(tmp_path / "celeba", n=12, seed=3)
    outputs, shards = [], tmp_path / "shards"
    for n in (40, 44):
        prepare(DataParams(source=str(tmp_path / "celeba"), sample={"n": n}, shards=str(shards), processes=1))
        outputs.append({str(path.relative_to(shards)): path.read_bytes() for path in shards.rglob("*") if path.is_file()})
    assert outputs[0] == outputs[1] and "sample" not in json.loads(outputs[0]["stats.json"])["params"]
    stats = prepare(DataParams(source="sample", sample={"dir": str(tmp_path / "celeba"), "n": 12},
                               shards=str(tmp_path / "from_sample"), processes=1))
    assert stats["params"]["sample"]["n"] == 12  # the sample's own settings made these
