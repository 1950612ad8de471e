"""Validated run configuration (pydantic models).

Units are in field names, choices are enums, and no arrays live in the config: arrays live in
files. Every model forbids unknown keys so a typo is an error, not a silently ignored option.

A minimal run file::

    data: {path: scan.cxi}
    model: {kind: ptychography, probe_modes: 1, slices: 1}
    probe: {init: from_data}
    epochs: 20
    output: run.zarr
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used, with the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class DataFormat(str, enum.Enum):
    auto = "auto"
    native = "native"
    cxi = "cxi"
    adorym = "adorym"


class DataConfig(_Strict):
    """Where the measurements are and metadata the file may lack."""

    path: Path
    format: DataFormat = DataFormat.auto
    energy_ev: float | None = Field(None, gt=0, description="overrides the file's energy")
    pixel_size_m: float | None = Field(None, gt=0, description="object-plane pixel size override")
    detector_distance_m: float | None = Field(None, gt=0)
    check_values: bool = Field(True, description="scan intensities for NaN/negative values")


class LossKind(str, enum.Enum):
    lsq = "lsq"  # least squares on amplitudes [eq. 4]
    poisson = "poisson"  # Poisson maximum likelihood [eq. 5]


class ModelConfig(_Strict):
    kind: str = Field("ptychography", description="a registered forward model")
    probe_modes: int = Field(1, ge=1)
    slices: int = Field(1, ge=1)
    slice_spacing_m: float | None = Field(
        None, gt=0, description="distance between slices; required when slices > 1"
    )
    loss: LossKind = LossKind.lsq

    @field_validator("kind")
    @classmethod
    def _registered(cls, v: str) -> str:
        from adorym_dask.registry import model_names

        if v not in model_names():
            raise ValueError(f"unknown model {v!r}; registered models: {sorted(model_names())}")
        return v

    @model_validator(mode="after")
    def _spacing_for_multislice(self) -> ModelConfig:
        if self.slices > 1 and self.slice_spacing_m is None:
            raise ValueError("model.slice_spacing_m is required when model.slices > 1")
        return self


class ProbeInit(str, enum.Enum):
    from_data = "from_data"
    file = "file"
    aperture = "aperture"


class ProbeConfig(_Strict):
    init: ProbeInit = ProbeInit.from_data
    path: Path | None = Field(None, description=".npy file, complex [py, px] or [modes, py, px]")
    aperture_radius_px: float = Field(16.0, gt=0)
    aperture_inner_radius_px: float = Field(0.0, ge=0)
    defocus_m: float = 0.0
    refine: bool = True
    refine_start_epoch: int = Field(1, ge=0, description="first epoch (0-based) that updates it")
    step_size: float = Field(
        0.01, gt=0, description="Adam step as a fraction of the initial max |probe|"
    )

    @model_validator(mode="after")
    def _path_for_file(self) -> ProbeConfig:
        if self.init is ProbeInit.file and self.path is None:
            raise ValueError("probe.path is required when probe.init is 'file'")
        return self


class Representation(str, enum.Enum):
    real_imag = "real_imag"
    delta_beta = "delta_beta"


class StoreKind(str, enum.Enum):
    zarr = "zarr"  # double-buffered blocks in the run's zarr store (default; out of core)
    hdf5 = "hdf5"  # the paper's H5 mode: blocks in one HDF5 file, one writer at a time
    memory = "memory"  # the paper's DO mode: blocks in the workers' memory


class ObjectConfig(_Strict):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    representation: Representation = Representation.real_imag
    shape_px: tuple[int, int] | None = Field(
        None, description="(n_y, n_x); derived from positions and detector when absent"
    )
    margin_px: int = Field(0, ge=0, description="extra pixels on every side when derived")
    chunks_px: tuple[int, int] = Field(
        (128, 128), alias="chunks", description="block size along (y, x); key 'chunks' works too"
    )
    store: StoreKind = StoreKind.zarr
    slice_thickness_m: float | None = Field(
        None, gt=0, description="delta_beta thickness per slice; default slice spacing or pixel size"
    )

    @field_validator("chunks_px", "shape_px")
    @classmethod
    def _positive(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError("must be positive")
        return v


class OptimizerName(str, enum.Enum):
    adam = "adam"
    gd = "gd"


class OptimizerConfig(_Strict):
    name: OptimizerName = OptimizerName.adam
    step_size: float | None = Field(
        None,
        gt=0,
        description="default: 0.03 for real_imag; for delta_beta the delta/beta step that "
        "shifts a slice's phase by 0.03 rad",
    )
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)


class Scheduler(str, enum.Enum):
    distributed = "distributed"
    sync = "sync"


class ClusterConfig(_Strict):
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "auto"
    address: str | None = Field(None, description="connect to a running scheduler instead")
    scheduler: Scheduler = Field(
        Scheduler.distributed, description="'sync' runs every task in-process (debugging)"
    )
    dashboard_address: str | None = ":0"


class RunConfig(_Strict):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    probe: ProbeConfig = ProbeConfig()
    object: ObjectConfig = ObjectConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    epochs: int = Field(20, ge=1)
    minibatch_size: int = Field(32, ge=1, description="tiles per optimizer step")
    tile_group_size: int = Field(8, ge=1, description="tiles per gradient task")
    seed: int = 0
    output: Annotated[str, BeforeValidator(str)] = Field(
        "run.zarr", description="the run store: a folder, or an fsspec URL (file://, s3://, ...)"
    )
    publish_every_epochs: int = Field(
        1, ge=0, description="copy the object into output's 'object' array every N epochs "
        "(0: only at the end); commits for --resume happen every minibatch regardless",
    )
    overwrite: bool = False
    cluster: ClusterConfig = ClusterConfig()
    progress: bool = True


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config tree."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the documented keys)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def config_from_dict(
    tree: dict[str, Any], *, source: str = "<dict>", base_dir: Path | None = None
) -> RunConfig:
    """Validate a raw tree; relative paths are resolved against ``base_dir``."""
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    def fix(p: Path | None) -> Path | None:
        if p is None or p.is_absolute() or "://" in str(p):
            return p
        return (base / p).resolve()

    cfg = cfg.model_copy(deep=True)
    cfg.data.path = fix(cfg.data.path)
    cfg.output = str(fix(Path(cfg.output))) if "://" not in cfg.output else cfg.output
    if cfg.probe.path is not None:
        cfg.probe.path = fix(cfg.probe.path)
    return cfg


def load_config(path: str | Path, *, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file, apply ``key.sub=value`` overrides and validate.

    Relative paths in the file are relative to the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    apply_overrides(tree, overrides or [])
    return config_from_dict(tree, source=str(path), base_dir=path.resolve().parent)
