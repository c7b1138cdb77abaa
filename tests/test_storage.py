"""Locations: local paths work as before, URIs reach an S3-compatible server (moto on loopback),
and what cannot work is a clear error naming the location."""

import json
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


def s3_users_keys(bucket: str) -> dict[str, str]:
    """The keys ({"AccessKeyId", "SecretAccessKey"}) of a new IAM user of the session's S3 server,
    allowed all of S3: keys moto checks once its settings.INITIAL_NO_AUTH_ACTION_COUNT is 0."""
    import boto3

    iam = boto3.client("iam")
    user = f"genflow-{bucket[-12:]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    return iam.create_access_key(UserName=user)["AccessKey"]


def test_the_filesystem_ray_pickles_holds_no_credential_and_uses_the_unpickling_processs_own(s3_bucket, monkeypatch):
    # Ray pickles RunConfig.storage_filesystem for its controller and workers, and Tune saves that
    # pickle in the store (tuner.pkl): it says which store, and every process authenticates with
    # the credentials of its own node.
    import ray.cloudpickle
    from moto import settings

    storage.write_bytes(f"{s3_bucket}/x/a.txt", "from the driver")
    key = s3_users_keys(s3_bucket)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks every request's keys from here
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-t0ken-value")
    path, filesystem = storage.ray_storage(f"{s3_bucket}/x")
    assert isinstance(filesystem, pafs.S3FileSystem) and path == s3_bucket.removeprefix("s3://") + "/x"
    for pickled in (pickle.dumps(filesystem), ray.cloudpickle.dumps(filesystem)):
        for credential in (key["SecretAccessKey"], key["AccessKeyId"], "session-t0ken-value"):
            assert credential.encode() not in pickled

    # Unpickled where only the keys are set (not the endpoint: the pickle names it), it reads with them.
    code = "import pickle, sys; fs = pickle.loads(sys.stdin.buffer.read()); print(fs.open_input_stream(sys.argv[1]).read().decode())"
    node_env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    node_env.update(AWS_EC2_METADATA_DISABLED="true", AWS_ACCESS_KEY_ID=key["AccessKeyId"])
    for secret, expected in ((key["SecretAccessKey"], "from the driver"), ("not-the-secret", "")):
        done = subprocess.run([sys.executable, "-c", code, f"{path}/a.txt"], input=pickle.dumps(filesystem),
                              capture_output=True, env={**node_env, "AWS_SECRET_ACCESS_KEY": secret}, timeout=60)
        assert done.stdout.decode().strip() == expected, done.stderr.decode()[-2000:]
    assert "ACCESS_DENIED" in done.stderr.decode() or "SignatureDoesNotMatch" in done.stderr.decode(), done.stderr.decode()[-2000:]


def test_a_profile_set_after_the_store_was_first_used_is_used(s3_bucket, monkeypatch, tmp_path):
    # The AWS SDK reads which profile (and which files) when a filesystem is made, not at each request.
    from moto import settings

    storage.write_bytes(f"{s3_bucket}/a.txt", "x")  # a filesystem made with the key variables
    key = s3_users_keys(s3_bucket)
    (tmp_path / "credentials").write_text(f"[genflow-test]\naws_access_key_id = {key['AccessKeyId']}\n"
                                          f"aws_secret_access_key = {key['SecretAccessKey']}\n")
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks every request's keys from here
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "genflow-test")
    assert storage.read_text(f"{s3_bucket}/a.txt") == "x"


def test_workers_are_told_which_store_never_its_credentials(monkeypatch):
    # genflow.storage.worker_env goes into the Ray runtime_envs genflow sets: the dashboard shows
    # them, and a profile name or a credentials file's path names nothing on another node.
    settings = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ENDPOINT_URL_S3": "http://minio:9000",
                "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1"}
    credentials = {"AWS_ACCESS_KEY_ID": "key-id-value", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
                   "AWS_SESSION_TOKEN": "t0ken-value", "AWS_PROFILE": "my-profile",
                   "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/gcs-key.json"}
    for name, value in {**settings, **credentials}.items():
        monkeypatch.setenv(name, value)
    assert storage.worker_env() == settings
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_REGION", "")
    assert storage.worker_env() == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}


@pytest.mark.parametrize("location", ["s3://AKIAKEY:wJalrXUtnFEMI@bucket/shards", "s3://AKIAKEY@bucket",
                                      "gs://ya29.a0Af@bucket/ray", "s3://:wJalrXUtnFEMI@bucket/x",
                                      # AWS secret keys often hold a "/": the first "/" is inside the secret
                                      "s3://AKIAKEY:wJalr/XUtnFEMI@bucket/shards", "s3://AKIAKEY:wJalr/XUtn/FEMI@bucket"])
def test_a_location_with_credentials_in_it_is_refused_without_echoing_them(location):
    shown = location.split("://")[0] + "://" + location.split("@", 1)[1]
    for use in (storage.resolved, storage.is_remote, storage.read_bytes, lambda where: storage.join(where, "a")):
        with pytest.raises(StorageError, match=rf"^{shown}: the location carries credentials") as refused:
            use(location)
        assert not any(part in str(refused.value) for part in ("wJalrXUtnFEMI", "AKIAKEY", "ya29"))
    assert storage.resolved("s3://bucket/an@in-a-key") == "s3://bucket/an@in-a-key"  # a key may hold one


def test_a_file_uri_names_a_local_path_alone(tmp_path):
    # local_path reads the path of a file:// URI only: what is before it would be dropped unread.
    assert storage.resolved(f"file://localhost{tmp_path}/x") == str(tmp_path / "x")
    with pytest.raises(StorageError, match=rf"^file://{tmp_path}/x: the location carries credentials") as refused:
        storage.resolved(f"file://me:s3cr3t-value@localhost{tmp_path}/x")
    assert "s3cr3t-value" not in str(refused.value)
    with pytest.raises(StorageError, match=rf"file://nfs-server{tmp_path}/x: names a file on the machine nfs-server"):
        storage.join(f"file://nfs-server{tmp_path}/x", "a")


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
        with pytest.raises(StorageError, match=rf"{s3_bucket}.*: the store refused .*AWS_ACCESS_KEY_ID.* on every Ray node"):
            action()
