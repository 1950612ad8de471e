"""Forward-model registry: built-ins plus the ``adorym_dask.models`` entry-point group.

A plug-in package adds a model without editing ours by declaring, in its pyproject::

    [project.entry-points."adorym_dask.models"]
    my_model = "my_package.module:build"

where ``build(config: RunConfig, measurements: Measurements) -> ForwardModel``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adorym_dask.config import RunConfig
    from adorym_dask.models.base import ForwardModel
    from adorym_dask.storage.measurements import Measurements

ENTRY_POINT_GROUP = "adorym_dask.models"
Builder = Callable[["RunConfig", "Measurements"], "ForwardModel"]


def _build_ptychography(cfg: RunConfig, meas: Measurements) -> ForwardModel:
    from adorym_dask.models.ptychography import FarFieldPtychography

    thickness = cfg.object.slice_thickness_m or cfg.model.slice_spacing_m or meas.pixel_size_m
    return FarFieldPtychography(
        det_shape=tuple(meas.det_shape),
        representation=cfg.object.representation.value,
        wavelength_m=meas.wavelength_m,
        pixel_size_m=meas.pixel_size_m,
        slice_spacing_m=cfg.model.slice_spacing_m,
        slice_thickness_m=thickness,
        loss_kind=cfg.model.loss.value,
        mask=meas.mask,
    )


BUILTIN: dict[str, Builder] = {"ptychography": _build_ptychography}


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def model_names() -> set[str]:
    """Every model kind that a config may name."""
    return set(BUILTIN) | set(_plugins())


def model_builder(kind: str) -> Builder:
    """The builder registered for ``kind`` (a built-in wins over a plug-in of the same name)."""
    if kind in BUILTIN:
        return BUILTIN[kind]
    plugins = _plugins()
    if kind not in plugins:
        raise KeyError(f"unknown model {kind!r}; registered: {sorted(model_names())}")
    return plugins[kind].load()
