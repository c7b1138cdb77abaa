"""Locations: local paths work as before, URIs reach an S3-compatible server (moto on loopback),
and what cannot work is a clear error naming the location."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from genflow import storage
from genflow.storage import StorageError


def test_local_paths_stay_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolved("data/shards") == str(tmp_path / "data" / "shards")
    assert storage.resolved(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert storage.join("data", "train", "a.tar") == str(Path("data/train/a.tar"))
    assert storage.ray_storage("ray_results") == (str(tmp_path / "ray_results"), None)
    storage.write_bytes("folder/file.bin", b"abc")
    assert (tmp_path / "folder" / "file.bin").read_bytes() == b"abc"
    assert storage.stat("folder/file.bin")[0] == 3 and storage.stat("folder") is None and storage.is_dir("folder")
    assert storage.listdir("folder") == [("file.bin", False)] and storage.listdir("nothing") == []


@pytest.mark.parametrize("location", ["hdfs://namenode/shards", "s3a://bucket/shards", "S4://bucket/x"])
def test_an_unknown_scheme_is_refused_naming_it(location):
    with pytest.raises(StorageError, match=rf"{location}: unknown storage scheme .*s3://BUCKET/PREFIX"):
        storage.resolved(location)


def test_a_uri_without_a_bucket_is_refused():
    with pytest.raises(StorageError, match="s3:///: names no bucket"):
        storage.resolved("s3:///")


def test_files_round_trip_through_the_store(s3_bucket, tmp_path):
    location = f"{s3_bucket}/some/prefix"
    storage.write_bytes(storage.join(location, "a.txt"), "hello")
    (tmp_path / "big.bin").write_bytes(os.urandom(6 << 20))  # over a multipart upload's 5 MiB part
    storage.upload(tmp_path / "big.bin", storage.join(location, "sub", "big.bin"))
    assert storage.read_text(f"{location}/a.txt") == "hello"
    assert storage.read_bytes(f"{location}/sub/big.bin") == (tmp_path / "big.bin").read_bytes()
    assert storage.listdir(location + "/") == [("a.txt", False), ("sub", True)]
    assert storage.file_size(f"{location}/sub/big.bin") == 6 << 20 and storage.file_size(f"{location}/sub") is None
    assert storage.is_dir(location) and not storage.exists(f"{location}/nothing")
    storage.remove_tree(location)
    assert storage.listdir(location) == [] and not storage.exists(location)
    storage.write_bytes(f"{s3_bucket}/a.txt", "at the root")
    storage.remove_tree(s3_bucket)  # a bucket's root: emptied, the bucket kept
    assert storage.listdir(s3_bucket) == [] and storage.missing_bucket(s3_bucket) is None


def test_the_filesystem_ray_pickles_reaches_the_store_without_this_environment(s3_bucket):
    # Ray's controller and workers get RunConfig.storage_filesystem pickled, in processes that may
    # not have this process's AWS variables.
    storage.write_bytes(f"{s3_bucket}/x/a.txt", "from the driver")
    path, filesystem = storage.ray_storage(f"{s3_bucket}/x")
    assert isinstance(filesystem, pafs.S3FileSystem) and path == s3_bucket.removeprefix("s3://") + "/x"
    clean_env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    code = "import pickle, sys; fs = pickle.loads(sys.stdin.buffer.read()); print(fs.open_input_stream(sys.argv[1]).read().decode())"
    done = subprocess.run([sys.executable, "-c", code, f"{path}/a.txt"], input=pickle.dumps(filesystem),
                          capture_output=True, env=clean_env, timeout=60)
    assert done.stdout.decode().strip() == "from the driver", done.stderr.decode()[-2000:]


def test_a_missing_bucket_or_file_is_named(s3_bucket):
    from genflow.data.loader import read_stats

    missing = s3_bucket.replace("genflow-", "missing-") + "/shards"
    with pytest.raises(FileNotFoundError, match=rf"{missing}: no such shard folder \(the store has no bucket"):
        read_stats(missing)
    with pytest.raises(FileNotFoundError, match=rf"{s3_bucket}/shards: no such shard folder \(nothing is there\)"):
        read_stats(f"{s3_bucket}/shards")
    with pytest.raises(FileNotFoundError, match=rf"{s3_bucket}/a.tar: no such file"):
        storage.read_bytes(f"{s3_bucket}/a.tar")


def test_wrong_credentials_are_a_clear_error_naming_the_uri(s3_bucket, monkeypatch):
    from moto import settings

    storage.write_bytes(f"{s3_bucket}/a.txt", "x")
    # moto checks credentials once its no-auth allowance is spent: none here.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY")
    for action in (lambda: storage.read_bytes(f"{s3_bucket}/a.txt"), lambda: storage.write_bytes(f"{s3_bucket}/b.txt", "y"),
                   lambda: storage.listdir(s3_bucket)):
        with pytest.raises(StorageError, match=rf"{s3_bucket}.*: the store refused .*AWS_ACCESS_KEY_ID"):
            action()
