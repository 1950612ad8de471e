"""The Python entry points: ``load_config`` and ``reconstruct``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed import Client

from adorym_dask.config import RunConfig, config_from_dict, load_config
from adorym_dask.engine import RunResult, run


def reconstruct(
    config: RunConfig | str | Path | dict[str, Any],
    client: Client | None = None,
    *,
    overrides: list[str] | None = None,
    resume: bool = False,
    allow_config_change: bool = False,
) -> RunResult:
    """Run a reconstruction.

    Parameters
    ----------
    config : RunConfig, path or dict
        A validated config, a YAML run file, or the same tree as a dict.
    client : distributed.Client, optional
        Run on this client's cluster. Otherwise ``config.cluster`` decides: a LocalCluster by
        default, ``cluster.address`` to join a running scheduler, or ``cluster.scheduler: sync``.
    overrides : list of str, optional
        ``key.sub=value`` items applied on top of a file or dict (as ``--set`` in the CLI).
    resume : bool
        Continue the run stored at ``config.output`` from its last commit (``--resume``).
    allow_config_change : bool
        With ``resume``: continue even if science settings differ from the stored run's.

    Returns
    -------
    RunResult
        ``result.open()`` gives the run store as an ``xarray.Dataset``.
    """
    if isinstance(config, (str, Path)):
        cfg = load_config(config, overrides=overrides)
    elif isinstance(config, dict):
        from adorym_dask.config import apply_overrides

        cfg = config_from_dict(apply_overrides(dict(config), overrides or []))
    else:
        cfg = config
    return run(cfg, client, resume=resume, allow_config_change=allow_config_change)
