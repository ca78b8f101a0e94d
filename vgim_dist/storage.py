"""One way to read and write run files, whether the run directory is a local path or s3://bucket/prefix."""

from __future__ import annotations

import os

import fsspec


def resolve_endpoint(endpoint_url: str = "") -> str:
    """The S3 endpoint: the config value, else the standard AWS_ENDPOINT_URL(_S3) variables, else AWS."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")


def open_dir(uri: str, endpoint_url: str = "") -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) for a directory URI; S3 endpoint as ``resolve_endpoint`` says."""
    options = {}
    if uri.startswith("s3://"):
        endpoint = resolve_endpoint(endpoint_url)
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


PARTIAL = ".tmp-"   # infix of the temporary name a local write goes through


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a file whole: to a temporary name then renamed on local disks, in one PUT on object stores,
    so that a reader never sees half a file."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = f"{path}{PARTIAL}{os.getpid()}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def remove_partial(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Delete the temporary files that writers killed mid-write left directly under ``root`` (local disks
    only: an object store never holds half a write). Only while no writer is running."""
    if is_local(fs):
        for path in fs.glob(f"{root}/*{PARTIAL}*"):
            fs.rm(path)
