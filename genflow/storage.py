"""Where genflow reads and writes: a local (or shared) path, or an object-store URI.

    size = file_size("s3://bucket/shards/stats.json")         # None when there is no such file
    with open_input("s3://bucket/shards/train/celeba64-000000.tar") as stream: ...
    storage_path, storage_filesystem = ray_storage("s3://bucket/ray_results")   # for Ray's RunConfig

A location is a string. A local path (relative, absolute, a mount every node shares) is read and
written with Python's own files, exactly as without this module; `file:///abs/path` is the same
path written as a URI. A URI names an object store by its scheme:

  s3://BUCKET/KEY   Amazon S3 or an S3-compatible server (MinIO, Ceph, moto). The region is
                    AWS_REGION or AWS_DEFAULT_REGION; another endpoint AWS_ENDPOINT_URL_S3 or
                    AWS_ENDPOINT_URL. The credentials are AWS's standard chain, read by each process
                    where it runs: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
                    AWS_PROFILE, an instance role, IRSA.
  gs://BUCKET/KEY   Google Cloud Storage (GOOGLE_APPLICATION_CREDENTIALS, or the machine's account).

A location never carries credentials (s3://KEY:SECRET@BUCKET is refused): they would be printed,
logged and saved with the runs that name it.

Every process reaches the store with its own node's credentials, as Ray documents for its
storage: genflow passes on only which store (STORE_SETTINGS: the endpoint and region, in the Ray
runtime_envs it sets, `worker_env`), never a key, a token, a profile name or a credentials file's
path. Ray pickles the filesystem of its RunConfig into the run's saved state in the store itself
(Tune's tuner.pkl), and the dashboard shows every runtime_env; a profile or a file path may not
exist on another node, and a session token would be frozen at submit time. The local Ray that
genflow starts inherits this process's whole environment, so keys set in the shell work there;
on a Ray cluster every node needs credentials of its own, set where Ray is started on it (an
instance role, IRSA / GKE workload identity, or the variables in the nodes' environment).

pyarrow's filesystems do the work; Ray Train and pyarrow.parquet take them as they are. An object
store has no rename: a write there is one object, whole or absent, and what must look atomic
across objects (prepare's shards) is published in order instead (genflow/data/__init__.py).
Failures of the store itself (wrong credentials, no bucket, no endpoint) are a StorageError naming
the URI and the variables to check.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from genflow.atomic import write_atomically

REMOTE_SCHEMES = ("s3", "gs")
# Which store a location names, beyond its URI: not secret, and the same on every node, so they are
# passed on to Ray's processes (worker_env). Credentials are each node's own (see the docstring).
STORE_SETTINGS = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# Where the AWS SDK finds credentials other than the key variables, which it reads once, when a
# filesystem is made (the key variables it reads at each request): part of the filesystems' cache
# key, never passed on.
_CREDENTIAL_SOURCES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                       "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
# Where a process finds its credentials for each store (for error messages).
_CREDENTIALS_HINT = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or the machine's service account",
}
_READ_BUFFER = 1 << 20
# pyarrow reads an object by one ranged GET per buffer fill: large fills amortise a store's
# per-request latency (tens of ms on S3) over the transfer.
_REMOTE_READ_BUFFER = 8 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
    """A location that cannot be used (an unknown scheme) or a store that refused (credentials,
    bucket, endpoint); the message names the location and what to check. A ValueError: what the
    user set is wrong, and the CLI ends with the message alone."""


def scheme(location: str) -> str | None:
    """"s3", "gs", "file", ...: the URI scheme of `location`; None for a plain path."""
    match = _SCHEME.match(str(location))
    return match.group(1).lower() if match else None


def is_remote(location: str | Path) -> bool:
    """True for an object-store URI; False for a local path (a file:// URI included). Refuses an
    unknown scheme, naming the location."""
    found = scheme(str(location))
    if found == "file":
        _check_file_uri(str(location))
    if found is None or found == "file":
        return False
    if found not in REMOTE_SCHEMES:
        raise StorageError(f"{location}: unknown storage scheme {found}://; use a local or shared path, file://, "
                           f"s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    rest = str(location).split("://", 1)[1]
    bucket, slash, key = rest.partition("/")
    # No bucket name holds an "@" or a ":": USER:SECRET@BUCKET, which pyarrow would use as keys. An
    # AWS secret key often holds a "/", which then ends the "bucket" inside the secret (its ":" is
    # left there), before the "@"; such a secret never holds an "@", so the first one ends it.
    if "@" in bucket or (":" in bucket and "@" in rest):
        shown = f"{found}://{bucket.rsplit('@', 1)[1]}{slash}{key}" if "@" in bucket else f"{found}://{rest.split('@', 1)[1]}"
        raise StorageError(f"{shown}: the location carries credentials (USER:SECRET@ before the bucket), which would "
                           f"be printed, logged and saved with the runs; use {shown}, with the credentials in the "
                           f"environment of each machine that uses it ({_CREDENTIALS_HINT[found]})")
    return True


def _check_file_uri(location: str) -> None:
    """Refuse a file:// URI whose authority local_path would drop: credentials, or another machine."""
    parts = urlsplit(location)
    shown = f"file://{parts.path}"
    if "@" in parts.netloc:
        raise StorageError(f"{shown}: the location carries credentials (USER:SECRET@ before the path), which would be "
                           f"printed, logged and saved with the runs, and which a local file does not use; use {shown}")
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"{location}: names a file on the machine {parts.netloc}, but a file:// location is read "
                           f"where genflow runs; use {shown} for this machine's (or a mount every node shares), or an "
                           "object store's URI (s3://BUCKET/PREFIX)")


def resolved(location: str | Path) -> str:
    """The location in its canonical form: an absolute local path, or the URI without a trailing
    slash (a URI never depends on the current folder)."""
    location = str(location)
    if is_remote(location):
        bucket_and_key = location.split("://", 1)[1].strip("/")
        if not bucket_and_key:
            raise StorageError(f"{location}: names no bucket; use {scheme(location)}://BUCKET/PREFIX")
        return f"{scheme(location)}://{bucket_and_key}"
    return str(local_path(location).resolve())


def local_path(location: str | Path) -> Path:
    """A local location as a Path (a file:// URI unwrapped)."""
    location = str(location)
    if scheme(location) == "file":
        return Path(unquote(urlsplit(location).path))
    return Path(location)


def join(location: str | Path, *parts: str) -> str:
    """`location`/part/...: a path joined as paths are, a URI with "/"."""
    location = str(location)
    if is_remote(location):
        return "/".join([location.rstrip("/"), *(part.strip("/") for part in parts)])
    return str(local_path(location).joinpath(*parts))


def name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path in it) of a location."""
    location = str(location)
    if not is_remote(location):
        return pafs.LocalFileSystem(), str(local_path(location).resolve())
    uri = resolved(location)
    with _errors(uri):
        sources = tuple(os.environ.get(name) for name in _CREDENTIAL_SOURCES)
        return _filesystem(scheme(uri), uri.split("/", 3)[2], tuple(worker_env().items()), sources), uri.split("://", 1)[1]


@lru_cache(maxsize=16)
def _filesystem(kind: str, bucket: str, settings: tuple[tuple[str, str], ...], sources: tuple) -> pafs.FileSystem:
    # `settings` (STORE_SETTINGS as set here) and `sources` (_CREDENTIAL_SOURCES) are the cache key:
    # another endpoint, region or profile makes a new filesystem. The key variables are not: the
    # filesystem reads them from the environment of the process using it at each request.
    env = dict(settings)
    if kind != "s3":
        return pafs.FileSystem.from_uri(f"{kind}://{bucket}")[0]
    # The endpoint and region are made explicit, so that the filesystem Ray pickles for its
    # controller and workers (RunConfig.storage_filesystem) names the same store wherever it is
    # unpickled. No key, token or profile: that pickle is saved in the store (Tune's tuner.pkl), and
    # each node authenticates by AWS's default chain. An S3-compatible server takes any region name.
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
              or ("us-east-1" if endpoint else pafs.resolve_s3_region(bucket)))
    return pafs.S3FileSystem(endpoint_override=endpoint, region=region)


def ray_storage(location: str | Path) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: a local path as it is (Ray's own
    local storage), a URI as a path in its filesystem (so that a custom endpoint is used)."""
    if not is_remote(location):
        return resolved(location), None
    fs, path = filesystem(location)
    return path, fs


def in_ray_storage(path: str, storage: str | Path) -> str:
    """A path Ray reports under ray_storage(storage) (a checkpoint's), as a location: a URI for a store."""
    return f"{scheme(str(storage))}://{path.lstrip('/')}" if is_remote(storage) else path


def worker_env() -> dict[str, str]:
    """The STORE_SETTINGS set here, for the Ray runtime_envs genflow sets (the job's, the Train
    workers'): which store, never credentials (each node has its own; see the docstring)."""
    return {name: os.environ[name] for name in STORE_SETTINGS if os.environ.get(name)}


def refusal(location: str, err: Exception) -> StorageError:
    """The StorageError of a store that refused `location` or could not be reached: what it said,
    and what to check."""
    kind = scheme(location) or ""
    if kind not in _CREDENTIALS_HINT:
        return StorageError(f"{location}: the store refused or could not be reached ({str(err).strip()}); check that "
                            "it exists and is reachable from here")
    where = ", AWS_REGION and, for an S3-compatible server, AWS_ENDPOINT_URL" if kind == "s3" else ""
    return StorageError(f"{location}: the store refused or could not be reached ({str(err).strip()}); check that "
                        f"the bucket exists; check the credentials ({_CREDENTIALS_HINT[kind]}){where}. Ray workers use "
                        "their own node's credentials (genflow passes on no keys): on a Ray cluster, set them on "
                        "every Ray node, where Ray is started")


@contextmanager
def _errors(location: str) -> Iterator[None]:
    """A store's own failure as a StorageError naming the location and what to check; a missing
    file stays a FileNotFoundError (callers say what was expected there)."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except (OSError, ValueError) as err:
        raise refusal(location, err) from None


def _info(location: str) -> pafs.FileInfo:
    fs, path = filesystem(location)
    with _errors(location):
        return fs.get_file_info(path)


def stat(location: str | Path) -> tuple[int, int] | None:
    """(size in bytes, modification time in ns) of a file; None when there is no file there."""
    if not is_remote(location):
        try:
            found = os.stat(local_path(location))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (found.st_size, found.st_mtime_ns) if S_ISREG(found.st_mode) else None
    info = _info(str(location))
    if info.type != pafs.FileType.File:
        return None
    return info.size, info.mtime_ns or 0


def file_size(location: str | Path) -> int | None:
    found = stat(location)
    return None if found is None else found[0]


def is_file(location: str | Path) -> bool:
    return stat(location) is not None


def is_dir(location: str | Path) -> bool:
    """A folder, or a prefix with objects under it."""
    if not is_remote(location):
        return local_path(location).is_dir()
    return _info(str(location)).type == pafs.FileType.Directory


def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return local_path(location).exists()
    return _info(str(location)).type != pafs.FileType.NotFound


def listdir(location: str | Path) -> list[tuple[str, bool]]:
    """(name, is a folder) of what is directly in `location`, sorted; empty when it is not there."""
    if not is_remote(location):
        folder = local_path(location)
        return sorted((entry.name, entry.is_dir()) for entry in folder.iterdir()) if folder.is_dir() else []
    fs, path = filesystem(location)
    with _errors(str(location)):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted((info.base_name, info.type == pafs.FileType.Directory) for info in infos)


def open_input(location: str | Path) -> BinaryIO:
    """A buffered binary stream of the file (read(n), as Python's files); FileNotFoundError naming
    the location when there is none."""
    if not is_remote(location):
        return open(local_path(location), "rb", buffering=_READ_BUFFER)
    return _open_object(location, lambda fs, path: fs.open_input_stream(path, compression=None,
                                                                         buffer_size=_REMOTE_READ_BUFFER))


def open_range(location: str | Path, start: int, stop: int) -> BinaryIO:
    """A buffered binary stream of bytes [start, stop) of the file: only those bytes are read (a
    store's object by ranged GETs; seeking to `start` fetches nothing)."""
    file = open_input_file(location)
    buffer = _REMOTE_READ_BUFFER if is_remote(location) else _READ_BUFFER
    return io.BufferedReader(_Range(file, start, stop), buffer)


def open_input_file(location: str | Path):
    """The file, unbuffered, for seek and readinto: a local file, or a store's object (pyarrow's
    random-access file: one ranged GET per read); FileNotFoundError naming the location."""
    if not is_remote(location):
        return open(local_path(location), "rb", buffering=0)
    return _open_object(location, lambda fs, path: fs.open_input_file(path))


def _open_object(location: str | Path, opener):
    """opener(filesystem, path) for a store's object: its failures as StorageError, a missing object
    as FileNotFoundError naming the location."""
    fs, path = filesystem(location)
    with _errors(str(location)):
        try:
            return opener(fs, path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{location}: no such file") from None


class _Range(io.RawIOBase):
    """Bytes [start, stop) of a seekable file as a raw stream: a BufferedReader over it fills its
    buffer from the file, never past `stop`."""

    def __init__(self, file, start: int, stop: int):
        super().__init__()
        file.seek(start)
        self.file, self.left = file, stop - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with memoryview(buffer) as view:
            count = self.file.readinto(view[: min(len(view), self.left)]) if self.left > 0 else 0
        self.left -= count
        return count

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


def read_bytes(location: str | Path) -> bytes:
    with open_input(location) as stream:
        return stream.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | Path, data: bytes | str) -> None:
    """The whole file or none: locally by a rename, in a store as one object."""
    data = data.encode() if isinstance(data, str) else data
    if not is_remote(location):
        write_atomically(local_path(location), data)
        return
    fs, path = filesystem(location)
    with _errors(str(location)), fs.open_output_stream(path) as stream:
        stream.write(data)


def upload(local_file: str | Path, location: str | Path) -> None:
    """Copy a local file to `location` (a URI, or a local path)."""
    if not is_remote(location):
        shutil.copyfile(local_file, local_path(location))
        return
    fs, path = filesystem(location)
    with _errors(str(location)), open(local_file, "rb") as source, fs.open_output_stream(path) as stream:
        shutil.copyfileobj(source, stream, _READ_BUFFER)


def copy(source: str, target: str) -> None:
    """Copy an object within one store (a server-side copy: S3's CopyObject)."""
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    with _errors(source):
        fs.copy_file(source_path, target_path)


def remove(location: str | Path) -> None:
    """Remove a file; nothing when there is none."""
    if not is_remote(location):
        local_path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with _errors(str(location)):
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


def remove_tree(location: str | Path) -> None:
    """Remove a folder (a prefix) and everything under it; nothing when there is none."""
    if not is_remote(location):
        shutil.rmtree(local_path(location), ignore_errors=True)
        return
    fs, path = filesystem(location)
    with _errors(str(location)):
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            if "/" in path:
                fs.delete_dir(path)
            else:  # a bucket's root: its objects go, the bucket stays
                fs.delete_dir_contents(path)


def missing_bucket(location: str | Path) -> str | None:
    """The bucket of a URI when the store has no such bucket; None otherwise (and for a path)."""
    if not is_remote(location):
        return None
    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    with _errors(str(location)):
        return bucket if fs.get_file_info(bucket).type == pafs.FileType.NotFound else None


def why_absent(location: str | Path) -> str:
    """Why nothing is at `location`, for an error message: a store's missing bucket is named."""
    bucket = missing_bucket(location)
    return f"the store has no bucket {bucket!r}" if bucket else "nothing is there"


def check_bucket(location: str | Path, what: str) -> None:
    """Refuse a URI whose bucket the store does not have (or whose store refuses us) now, naming the
    setting `what`, rather than after the work that was to be written there."""
    bucket = missing_bucket(location)
    if bucket:
        raise StorageError(f"{what}={location}: the store has no bucket {bucket!r}; create it, or set {what} to "
                           "another location")
