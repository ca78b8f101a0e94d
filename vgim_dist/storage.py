"""One way to read and write run files, whether the run directory is a local path or s3://bucket/prefix.

An unreachable store is waited out: every read and write of a run file is retried with backoff for up to
``RETRY_FOR_S``. A fault that waiting cannot fix (a full disk, a damaged file) raises `StorageFault` at once,
with one line naming the path.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec
import xxhash

RETRY_FOR_S = 300.0     # how long a run waits for its store to come back before failing
log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageFault(RuntimeError):
    """A storage fault that retrying cannot fix (a damaged committed file, a full disk); names the path."""


def resolve_endpoint(endpoint_url: str = "") -> str:
    """The S3 endpoint: the config value, else the standard AWS_ENDPOINT_URL(_S3) variables, else AWS."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")


def absolute_uri(uri: str) -> str:
    """A local path made absolute (``~`` expanded), ``sqlite:///relative.db`` likewise; any other URI as it
    is. A Ray worker's working directory is its session folder, not the user's: it must get absolute paths."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return f"sqlite:///{absolute_uri(path)}" if path and not path.startswith(("/", ":memory:")) else uri
    if not uri or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def open_dir(uri: str, endpoint_url: str = "") -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) for a directory URI; S3 endpoint as ``resolve_endpoint`` says."""
    options = {}
    if uri.startswith("s3://"):
        endpoint = resolve_endpoint(endpoint_url)
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/")


def checksum(data: bytes) -> str:
    """The checksum recorded for every committed file (checkpoint files, shards): xxh3-64, hex."""
    return xxhash.xxh3_64_hexdigest(data)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


PARTIAL = ".tmp-"   # infix of the temporary name a local write goes through


def transient(e: BaseException) -> bool:
    """A connection refused, reset or timed out: the store may come back."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(e, (BotoConnectionError, HTTPClientError))


def retrying(what: str, path: str, fn: Callable[..., T], *args) -> T:
    """``fn(*args)``, retried with backoff (1 s, doubling to 30 s) for up to RETRY_FOR_S while it fails with a
    transient error; any other error is raised at once."""
    deadline, delay = time.monotonic() + RETRY_FOR_S, 1.0
    while True:
        try:
            return fn(*args)
        except Exception as e:
            if not transient(e):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageFault(f"cannot {what} {path}: the store did not answer for {RETRY_FOR_S:.0f} s "
                                   f"({type(e).__name__}: {' '.join(str(e).split())}); what the run committed "
                                   "is kept: continue with --resume once the store is back") from e
            log.warning("cannot %s %s (%s: %s); retrying in %.0f s", what, path, type(e).__name__,
                        " ".join(str(e).split()), delay)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def shown(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` as a user would write it: with its ``s3://`` on an object store."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return retrying("read", shown(fs, path), fs.cat_file, path)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a file whole: to a temporary name then renamed on local disks, in one PUT on object stores,
    so that a reader never sees half a file. Retried while the store is unreachable."""
    retrying("write", shown(fs, path), _write_once, fs, path, data)


def _write_once(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    if not is_local(fs):
        # No makedirs: an object store has no folders, and s3fs would create a missing bucket, so a store
        # that lost its bucket mid-run would be refilled silently instead of failing.
        try:
            fs.pipe_file(path, data)
        except FileNotFoundError:
            bucket = fs.unstrip_protocol(path.split("/", 1)[0])
            raise StorageFault(f"{shown(fs, path)}: the bucket {bucket} does not exist (vgim never creates "
                               "one for a run: create it, or check run.dir)") from None
        return
    tmp = f"{path}{PARTIAL}{os.getpid()}"
    try:
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            existing = parent
            while not os.path.isdir(existing):
                existing = os.path.dirname(existing)
            usage = shutil.disk_usage(existing)
            raise StorageFault(f"{path}: no space left on device ({usage.free:,} bytes free of {usage.total:,}; "
                               f"{len(data):,} needed)") from None
        raise


def remove_partial(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Delete the temporary files that writers killed mid-write left directly under ``root`` (local disks
    only: an object store never holds half a write). Only while no writer is running."""
    if is_local(fs):
        for path in fs.glob(f"{root}/*{PARTIAL}*"):
            fs.rm(path)
