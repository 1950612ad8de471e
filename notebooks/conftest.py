"""Run the notebooks as tests (nbmake); skip those that read the real data when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# notebook -> the files of ../shared/data it reads
NEEDS_DATA = {
    "01_farfield_siemens_star.ipynb": ["tike/siemens-star-small.npz.bz2"],
    "03_tomography_tooth.ipynb": ["tomopy/tooth.h5"],
}


def _shared_data() -> Path:
    env = os.environ.get("ADORYM_DASK_SHARED_DATA")
    # <workspace>/main/notebooks/conftest.py -> <workspace>/shared/data
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    data = _shared_data()
    for item in items:
        needs = NEEDS_DATA.get(Path(str(item.fspath)).name, [])
        missing = [f for f in needs if not (data / f).exists()]
        if missing:
            item.add_marker(pytest.mark.skip(
                reason=f"real data {', '.join(missing)} not found under {data} "
                "(set ADORYM_DASK_SHARED_DATA)"))
