"""Shared pytest fixtures: the real reference data in ``../shared/data``."""

from __future__ import annotations

import bz2
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("ADORYM_DASK_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    # <workspace>/main/tests/conftest.py -> <workspace>/shared/data
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return _REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the shared reference data (``$ADORYM_DASK_SHARED_DATA`` or ``../shared/data``)."""
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(
            f"shared reference data not found at {path} "
            "(set ADORYM_DASK_SHARED_DATA to the folder holding tike/, tomopy/, cdtools/)"
        )
    return path


@pytest.fixture(scope="session")
def siemens_star(shared_data: Path, tmp_path_factory) -> dict:
    """tike's experimental Siemens-star ptychography, decompressed once per session.

    Returns
    -------
    dict
        ``data`` float32 [516, 128, 128] intensities (zero frequency at [0, 0],
        not fft-shifted), ``probe`` complex [128, 128], ``scan`` float [516, 2]
        (row, col) of the probe's top-left corner in object pixels, fractional.

    Notes
    -----
    The scan is centred on 0 (about -164 .. +168): shift it, e.g.
    ``scan - scan.min(0) + 1``, and use an object of
    ``ceil(scan.max(0)) + 128 + 2`` pixels. The stored probe has
    ``sum |P|^2 ~ 52`` while a pattern holds ~4.6e5 photons: rescale it by
    ``sqrt(data.sum((1, 2)).mean() / sum |P|^2)`` before ePIE.
    """
    src = shared_data / "tike" / "siemens-star-small.npz.bz2"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    dst = tmp_path_factory.mktemp("siemens_star") / "siemens-star-small.npz"
    with bz2.open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)
    with np.load(dst) as z:
        data = np.asarray(z["data"], dtype=np.float32).reshape(-1, *z["data"].shape[-2:])
        probe = np.asarray(z["probe"]).reshape(z["probe"].shape[-2:])
        scan = np.asarray(z["scan"], dtype=np.float64).reshape(-1, 2)
    return {"data": data, "probe": probe, "scan": scan}
