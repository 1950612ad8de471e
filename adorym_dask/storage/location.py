"""Where a run store lives: a local folder, or an fsspec URL (``file://``, ``s3://``, ...)."""

from __future__ import annotations

import functools

import zarr


def is_url(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """A local path made absolute (workers may run in another folder); URLs as they are."""
    import os

    return str(path) if is_url(path) else os.path.abspath(os.path.expanduser(str(path)))


@functools.lru_cache(maxsize=32)
def zarr_store(path: str):
    """The zarr store for a run: a local path as is, a URL through fsspec (cached per process).

    ``file://`` URLs create missing folders (fsspec's ``auto_mkdir``), as a local path does.
    """
    path = str(path)
    if not is_url(path):
        return path
    from zarr.storage import FsspecStore

    options = {"auto_mkdir": True} if path.startswith("file://") else {}
    return FsspecStore.from_url(path, storage_options=options)


def open_group(path: str, mode: str = "r+") -> zarr.Group:
    return zarr.open_group(store=zarr_store(path), mode=mode)


def open_array(path: str, name: str, mode: str = "r+") -> zarr.Array:
    return zarr.open_array(store=zarr_store(path), path=name, mode=mode)


def _sync(coro):
    from zarr.core.sync import sync

    return sync(coro)


def put_bytes(path: str, key: str, data: bytes) -> None:
    """Write one object of a URL store (a single PUT: replaced whole or not at all)."""
    from zarr.core.buffer import default_buffer_prototype

    store = zarr_store(path)
    _sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def get_bytes(path: str, key: str) -> bytes | None:
    """Read one object of a URL store, or None if it does not exist."""
    from zarr.core.buffer import default_buffer_prototype

    buf = _sync(zarr_store(path).get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()
