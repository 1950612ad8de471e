"""Register the Dask configuration defaults shipped with the package."""

from __future__ import annotations

from pathlib import Path

import dask.config
import yaml

CONFIG_FILE = Path(__file__).with_name("adorym-dask.yaml")


def register_defaults() -> None:
    """Add ``adorym-dask.yaml`` to Dask's defaults (user settings keep priority)."""
    import distributed  # noqa: F401  (its own defaults must be registered first)

    with CONFIG_FILE.open() as fh:
        dask.config.update_defaults(yaml.safe_load(fh))
