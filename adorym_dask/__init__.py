"""adorym-dask: automatic-differentiation X-ray image reconstruction on Dask.

>>> import adorym_dask
>>> result = adorym_dask.reconstruct("run.yaml")        # doctest: +SKIP
>>> result.open()                                        # doctest: +SKIP
"""

from adorym_dask._dask_config import register_defaults as _register_defaults

_register_defaults()

from adorym_dask.config import ConfigError, RunConfig, load_config  # noqa: E402

__all__ = ["reconstruct", "load_config", "RunConfig", "ConfigError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``reconstruct`` is imported on first use: the dashboard preload module (imported by a
    scheduler, ``dask scheduler --preload adorym_dask.dashboard``) should not pull in torch."""
    if name == "reconstruct":
        from adorym_dask.api import reconstruct

        return reconstruct
    raise AttributeError(f"module 'adorym_dask' has no attribute {name!r}")
