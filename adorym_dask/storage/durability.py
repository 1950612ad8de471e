"""Putting written bytes on stable storage before a commit names them.

A checkpoint may only name block slots whose bytes are on disk: otherwise a power loss or an OS
crash after the commit leaves a checkpoint pointing at data that never arrived. Each writer
therefore fsyncs what it wrote (the chunk file and the folder whose entry the write renamed)
before its task returns, and the driver writes the checkpoint only after every such task has
returned. ``fsync`` of any descriptor of a file flushes that file's dirty pages, whichever
process wrote them, so the file is reopened here rather than kept open by zarr or h5py.

Object stores behind fsspec URLs other than ``file://`` (s3, gcs, ...) acknowledge a PUT only
once it is stored, so there is nothing to sync.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush one file's data and metadata to its device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to its device; a no-op where folders
    cannot be opened for syncing."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def local_path(path: str) -> Path | None:
    """The local file-system path of a run store (a folder, or a ``file://`` URL); None for
    remote object stores."""
    if "://" not in path:
        return Path(path)
    if path.startswith("file://"):
        return Path(path[len("file://"):])
    return None


def fsync_zarr_chunk(array, store_path: str, array_path: str, coords: tuple[int, ...]) -> None:
    """fsync the file of one chunk of a zarr array and the folder holding it.

    Parameters
    ----------
    array : zarr.Array
        The array (its metadata gives the chunk's key).
    store_path : str
        The run store (folder or URL).
    array_path : str
        The array's path inside the store.
    coords : tuple of int
        The chunk's grid coordinates.
    """
    root = local_path(store_path)
    if root is None:
        return
    key = array.metadata.encode_chunk_key(coords)
    chunk = root / array_path / key
    if chunk.exists():
        fsync_file(chunk)
    # zarr stores no file for a chunk equal to the fill value (and deletes an old one): then
    # the folder entry is what must reach the disk
    folder = chunk.parent
    while not folder.exists() and folder != root:
        folder = folder.parent
    fsync_dir(folder)
