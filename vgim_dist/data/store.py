"""Shard stores: a local directory or an ``s3://bucket/prefix``, behind one small interface."""

from __future__ import annotations

from pathlib import Path

import fsspec

from vgim_dist.storage import remove_partial, resolve_endpoint, write_bytes


class StoreError(RuntimeError):
    """The store cannot be reached or used; the message names the URI and the endpoint."""


class Store:
    """Named objects under one URI. Writes are atomic: a reader never sees half an object."""

    def __init__(self, uri: str, endpoint_url: str = ""):
        self.uri = uri.rstrip("/")
        self.remote = self.uri.startswith("s3://")
        if self.remote:
            import s3fs  # noqa: PLC0415 - only needed for remote stores

            self.endpoint = resolve_endpoint(endpoint_url)
            # Few retries and a short connect timeout: an unreachable store should fail in seconds.
            self.fs = s3fs.S3FileSystem(
                endpoint_url=self.endpoint or None, skip_instance_cache=True, use_listings_cache=False,
                config_kwargs={"connect_timeout": 5, "read_timeout": 60,
                                          "retries": {"max_attempts": 2}})
            self.root = self.uri[len("s3://"):]
        else:
            self.endpoint = ""
            self.fs = fsspec.filesystem("file")
            self.root = str(Path(self.uri).expanduser().resolve())

    def __str__(self) -> str:
        return f"{self.uri} (endpoint {self.endpoint})" if self.endpoint else self.uri

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except Exception as e:  # any transport error becomes one clear message
            raise StoreError(f"cannot {what} {self}: {type(e).__name__}: {e}") from e

    def check(self, create: bool = False) -> None:
        """Fail fast with a clear message when the store is unreachable (or missing, unless ``create``)."""
        if self._call("reach", self.fs.exists, self.root):
            return
        if not create:
            raise StoreError(f"no such store: {self}")
        self._call("create", self.fs.makedirs, self.root, True)

    def exists(self, name: str) -> bool:
        return self._call("reach", self.fs.exists, self._path(name))

    def read_bytes(self, name: str) -> bytes:
        return self._call("read from", self.fs.cat_file, self._path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call("write to", write_bytes, self.fs, self._path(name), data)

    def remove_partial(self) -> None:
        """Delete what writers that died mid-write left behind (none may be running)."""
        self._call("clean up", remove_partial, self.fs, self.root)
