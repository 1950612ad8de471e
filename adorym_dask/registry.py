"""Forward-model registry: built-ins plus the ``adorym_dask.models`` entry-point group.

A plug-in package adds a model without editing ours by declaring, in its pyproject::

    [project.entry-points."adorym_dask.models"]
    my_model = "my_package.module:REGISTRATION"

where ``REGISTRATION`` is a :class:`ModelRegistration`: the builder
``build(config: RunConfig, measurements: Measurements) -> ForwardModel`` and the pydantic class
of its ``model:`` keys (a subclass of :class:`adorym_dask.config.ModelConfig`), so a plug-in
model is configured exactly like a built-in one. An entry point may also name a bare builder;
its ``model:`` section then takes only the shared keys (``kind``, ``loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adorym_dask.config import ModelConfig, RunConfig
    from adorym_dask.models.base import ForwardModel
    from adorym_dask.storage.measurements import Measurements

ENTRY_POINT_GROUP = "adorym_dask.models"
Builder = Callable[["RunConfig", "Measurements"], "ForwardModel"]


@dataclass(frozen=True)
class ModelRegistration:
    """What a model registers: how to build it, and the class of its ``model:`` keys."""

    build: Builder
    config: type[ModelConfig] | None = None


def _build_ptychography(cfg: RunConfig, meas: Measurements) -> ForwardModel:
    from adorym_dask.models.ptychography import build_ptychography

    return build_ptychography(cfg, meas)


def _build_holography(cfg: RunConfig, meas: Measurements) -> ForwardModel:
    from adorym_dask.models.holography import build_holography

    return build_holography(cfg, meas)


def _build_tomography(cfg: RunConfig, meas: Measurements) -> ForwardModel:
    from adorym_dask.models.tomography import build_tomography

    return build_tomography(cfg, meas)


def _build_ptychotomography(cfg: RunConfig, meas: Measurements) -> ForwardModel:
    from adorym_dask.models.ptychotomography import build_ptychotomography

    return build_ptychotomography(cfg, meas)


def _builtin() -> dict[str, ModelRegistration]:
    from adorym_dask.config import (
        HolographyConfig,
        PtychographyConfig,
        PtychotomographyConfig,
        TomographyConfig,
    )

    return {
        "ptychography": ModelRegistration(_build_ptychography, PtychographyConfig),
        "holography": ModelRegistration(_build_holography, HolographyConfig),
        "tomography": ModelRegistration(_build_tomography, TomographyConfig),
        "ptychotomography": ModelRegistration(_build_ptychotomography, PtychotomographyConfig),
    }


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def model_names() -> set[str]:
    """Every model kind that a config may name."""
    return set(_builtin()) | set(_plugins())


def registration(kind: str) -> ModelRegistration:
    """The registration of ``kind`` (a built-in wins over a plug-in of the same name)."""
    builtin = _builtin()
    if kind in builtin:
        return builtin[kind]
    plugins = _plugins()
    if kind not in plugins:
        raise KeyError(f"unknown model {kind!r}; registered: {sorted(model_names())}")
    loaded = plugins[kind].load()
    if isinstance(loaded, ModelRegistration):
        return loaded
    return ModelRegistration(loaded)


def model_config_class(kind: str) -> type[ModelConfig]:
    """The pydantic class that validates ``model:`` for ``kind``."""
    from adorym_dask.config import ModelConfig

    return registration(kind).config or ModelConfig


def model_builder(kind: str) -> Builder:
    """The builder registered for ``kind``."""
    return registration(kind).build
