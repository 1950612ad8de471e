"""Validated run configuration (pydantic models).

Units are in field names, choices are enums, and no arrays live in the config: arrays live in
files. Every model forbids unknown keys so a typo is an error, not a silently ignored option.

A minimal run file::

    data: {path: scan.cxi}
    model: {kind: ptychography, probe_modes: 1, slices: 1}
    probe: {init: from_data}
    refine: {positions: {start_epoch: 2}}     # the probe is refined by default
    epochs: 20
    output: run.zarr
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
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
    data_exchange = "data_exchange"  # TomoPy's Data Exchange HDF5 (flat/dark corrected on read)


class TileSubset(str, enum.Enum):
    all = "all"
    even = "even"
    odd = "odd"
    first_half = "first_half"
    second_half = "second_half"


class DataConfig(_Strict):
    """Where the measurements are and metadata the file may lack."""

    path: Path
    format: DataFormat = DataFormat.auto
    energy_ev: float | None = Field(None, gt=0, description="overrides the file's energy")
    pixel_size_m: float | None = Field(None, gt=0, description="object-plane pixel size override")
    detector_distance_m: float | None = Field(None, gt=0)
    source_distance_m: float | None = Field(
        None, gt=0, description="cone beam: focus-to-sample distance; near-field distances "
        "become effective plane-wave ones, z1 z2 / (z1 + z2), and a CXI file's object pixel "
        "the detector pixel divided by the magnification (z1 + z2) / z1",
    )
    subset: TileSubset = Field(
        TileSubset.all, description="use only some tiles: 'even'/'odd' (alternate scan "
        "points, two disjoint halves covering the same field) or 'first_half'/'second_half'",
    )
    check_values: bool = Field(True, description="scan intensities for NaN/negative values")


class LossKind(str, enum.Enum):
    lsq = "lsq"  # least squares on amplitudes [eq. 4]
    poisson = "poisson"  # Poisson maximum likelihood [eq. 5], reported as its deviance


class ModelConfig(_Strict):
    """Keys every model shares. A model adds its own by registering a subclass (see
    :mod:`adorym_dask.registry`); ``model:`` is validated against the class of its ``kind``."""

    kind: str = Field("ptychography", description="a registered forward model")
    loss: LossKind = LossKind.lsq


class Propagation(str, enum.Enum):
    far_field = "far_field"
    near_field = "near_field"


class PtychographyConfig(ModelConfig):
    """``model:`` keys of ptychography (multislice, incoherent probe modes; far field, or
    near field with the Fresnel propagator over each tile's ``distances_m``)."""

    propagation: Propagation = Propagation.far_field
    probe_modes: int = Field(1, ge=1)
    slices: int = Field(1, ge=1)
    slice_spacings_m: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="free-space distance between consecutive slices, one per gap "
        "(slices - 1 values; unequal spacings allowed); refinable as refine.slice_spacings",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "slice_spacing_m" in data:
            raise ValueError(
                "model.slice_spacing_m was replaced by model.slice_spacings_m, a list with one "
                "distance per gap between slices, e.g. slice_spacings_m: [2.0e-6]"
            )
        return data

    @model_validator(mode="after")
    def _spacing_for_multislice(self) -> PtychographyConfig:
        gaps = self.slices - 1
        if gaps and self.slice_spacings_m is None:
            raise ValueError(
                f"model.slice_spacings_m is required when model.slices > 1: give {gaps} "
                "distance(s) in metres, one per gap between slices"
            )
        if self.slice_spacings_m is not None and len(self.slice_spacings_m) != gaps:
            raise ValueError(
                f"model.slice_spacings_m has {len(self.slice_spacings_m)} value(s) but "
                f"model.slices = {self.slices} has {gaps} gap(s); give one distance per gap"
            )
        return self


class HolographyConfig(ModelConfig):
    """``model:`` keys of multi-distance (in-line, near-field) holography."""

    slices: int = Field(1, ge=1)
    slice_spacings_m: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="distance between consecutive slices, one per gap",
    )
    kappa: float | None = Field(
        None, gt=0, description="homogeneous object: beta = kappa * delta with one refinable "
        "kappa (refine.kappa); needs object.representation: delta_beta",
    )
    tile_px: int = Field(
        512, ge=4, description="holograms larger than this are split into tiles of this "
        "size, each predicted from the object under it plus a halo (the tiling approach)",
    )
    margin_factor: float = Field(
        1.25, ge=1.0, description="the object's margin around the holograms' field (and the "
        "window of an unsplit hologram): this many times the Fresnel spread "
        "lambda z_max / (2 pixel), plus refine.affine.max_shift_px",
    )
    tile_halo_factor: float = Field(
        6.0, ge=1.0, description="split holograms: each tile's halo, in Fresnel spreads; "
        "the object beyond a tile's window is not vacuum, and the kernel's tail decays slowly "
        "(6 spreads: tiled equals untiled to 5e-5 of the peak; 1.25: 1e-2)",
    )

    @model_validator(mode="after")
    def _spacing_for_multislice(self) -> HolographyConfig:
        gaps = self.slices - 1
        given = len(self.slice_spacings_m or [])
        if given != gaps:
            raise ValueError(
                f"model.slice_spacings_m has {given} value(s) but model.slices = {self.slices} "
                f"has {gaps} gap(s); give one distance per gap"
            )
        return self


class TomographyConfig(ModelConfig):
    """``model:`` keys of projection tomography (rotation about y; absorption through beta,
    phase through delta with near-field propagation when the file gives ``distances_m``).

    With ``loss: lsq`` and no propagation the fit is least squares on line integrals,
    ``-ln(I / I0)`` against ``2 k integral(beta)`` (with gd: ART); otherwise on amplitudes
    (lsq) or intensities (poisson), as the other models."""

    n_z: int | None = Field(None, ge=1, description="voxels along z (default n_x)")
    rotation_centre_px: float | Literal["auto"] | None = Field(
        None, description="detector column of the rotation axis; default the file's "
        "rotation_centre_px, else (det_x - 1)/2; 'auto' finds it from two projections 180 "
        "degrees apart; refinable as refine.rotation_centre",
    )
    tile_px: int = Field(
        256, ge=1, description="projections with more rows are cut into bands of at most "
        "this many rows, each predicted from its y-slab (plus a halo) only",
    )
    halo_factor: float = Field(
        6.0, ge=1.0, description="near-field propagation: each band's halo, in Fresnel "
        "spreads lambda z / (2 pixel)",
    )


class PtychotomographyConfig(ModelConfig):
    """``model:`` keys of joint ptychotomography: far-field ptychography through the rotated
    volume at every angle, one probe (with incoherent modes) shared by all angles."""

    probe_modes: int = Field(1, ge=1)
    n_z: int | None = Field(None, ge=1, description="voxels along z (default n_x)")
    slices: int = Field(
        1, ge=1, description="multislice slices along the beam through the rotated volume "
        "(1: projection approximation); the lab z samples are summed in this many groups",
    )


def _model_config(value: Any) -> ModelConfig:
    """Validate ``model:`` against the config class registered for its ``kind``."""
    if isinstance(value, ModelConfig):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError("model must be a mapping of keys, e.g. {kind: ptychography}")
    from adorym_dask.registry import model_config_class, model_names

    kind = value.get("kind", "ptychography")
    if kind not in model_names():
        raise ValueError(
            f"model.kind: unknown model {kind!r}; registered models: {sorted(model_names())}"
        )
    try:
        return model_config_class(kind).model_validate(value)
    except ValidationError as err:
        raise ValueError(_error_lines(err, prefix="model.")) from None


class ProbeInit(str, enum.Enum):
    from_data = "from_data"
    file = "file"
    aperture = "aperture"


_MOVED_PROBE_KEYS = {
    "refine": "the probe is refined by default; 'refine: {probe: null}' holds it fixed",
    "refine_start_epoch": "use 'refine: {probe: {start_epoch: N}}' (0-based)",
    "step_size": "use 'refine: {probe: {step_size: S}}' (a fraction of max |probe|)",
}


class ProbeConfig(_Strict):
    """How the probe starts; how it is refined is under ``refine.probe``."""

    init: ProbeInit = ProbeInit.from_data
    path: Path | None = Field(None, description=".npy file, complex [py, px] or [modes, py, px]")
    aperture_radius_px: float = Field(16.0, gt=0)
    aperture_inner_radius_px: float = Field(0.0, ge=0)
    defocus_m: float = 0.0
    mode_noise: float = Field(
        0.5, ge=0, description="extra modes start as mode 0 plus complex Gaussian noise of "
        "this rms relative to mode 0's rms, then are orthogonalised",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, where in _MOVED_PROBE_KEYS.items():
                if key in data:
                    raise ValueError(f"probe.{key} moved to the refine section: {where}")
        return data

    @model_validator(mode="after")
    def _path_for_file(self) -> ProbeConfig:
        if self.init is ProbeInit.file and self.path is None:
            raise ValueError("probe.path is required when probe.init is 'file'")
        return self


class Representation(str, enum.Enum):
    real_imag = "real_imag"
    delta_beta = "delta_beta"


class Margin(str, enum.Enum):
    vacuum = "vacuum"  # held at transmission 1 (an isolated sample)
    free = "free"  # refined (a sample larger than the field)


class StoreKind(str, enum.Enum):
    zarr = "zarr"  # double-buffered blocks in the run's zarr store (default; out of core)
    hdf5 = "hdf5"  # the paper's H5 mode: blocks in one HDF5 file, one writer at a time
    memory = "memory"  # the paper's DO mode: blocks in the workers' memory


class Constraint(str, enum.Enum):
    none = "none"
    phase_only = "phase_only"  # |T| = 1 (real_imag) or beta = 0 (delta_beta)
    absorption_only = "absorption_only"  # T real and >= 0 (real_imag) or delta = 0


class ShrinkwrapConfig(_Strict):
    """Shrink-wrap: every ``every_epochs`` the support becomes the pixels where the blurred
    object contrast (|T - 1|, or |delta| + |beta|) exceeds ``threshold`` times its maximum over
    the slice, intersected with the support it started from."""

    every_epochs: int = Field(5, ge=1)
    start_epoch: int = Field(5, ge=0)
    sigma_px: float = Field(2.0, gt=0)
    threshold: float = Field(0.1, gt=0, lt=1)


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
        None, gt=0, description="delta_beta thickness per slice; default the mean slice "
        "spacing (dense multislice) or the pixel size (one slice)",
    )
    support_path: Path | None = Field(
        None, description=".npy bool [n_y, n_x] or [n_y, n_x, n_z]: True inside the finite "
        "support; outside it the transmission is 1 (delta = beta = 0)",
    )
    shrinkwrap: ShrinkwrapConfig | None = None
    constraint: Constraint = Constraint.none
    margin: Margin = Field(
        Margin.vacuum, description="holography: the margin around the holograms' field, "
        "held at vacuum (an isolated sample) or refined ('free', a sample larger than the field)",
    )
    non_negative: bool = Field(
        False, description="delta_beta: clip delta and beta at 0 after every update"
    )
    passive: bool | None = Field(
        None, description="the object absorbs and never amplifies: |T| <= 1 (real_imag) or "
        "beta >= 0 (delta_beta) after every update; default: on for holography (it breaks "
        "the tie between a common distance error and a defocused object), off otherwise",
    )

    @field_validator("chunks_px", "shape_px")
    @classmethod
    def _positive(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ObjectConfig:
        if self.non_negative and self.representation is not Representation.delta_beta:
            raise ValueError(
                "object.non_negative needs object.representation: delta_beta (it clips delta "
                "and beta); for real_imag use object.constraint"
            )
        return self


class RegularizerKind(str, enum.Enum):
    l1 = "l1"
    reweighted_l1 = "reweighted_l1"
    tv = "tv"


class RegularizerConfig(_Strict):
    """One term ``weight[slice] * R(x)`` added to every minibatch's loss.

    ``R`` acts on (delta, beta), or on the transmission minus 1 for real_imag objects, so it
    pulls towards vacuum, never towards an opaque object; it is a sum over object pixels.
    """

    kind: RegularizerKind
    weight: float | list[float] = Field(
        ..., description="one weight, or one per slice"
    )
    eps: float | None = Field(
        None, gt=0, description="smoothing of |.| (l1, tv) and the reweighting floor; "
        "default 1e-3 of transmission (real_imag), or the delta/beta of 1e-3 rad of phase "
        "over one slice (delta_beta: values ~1e-7 need an eps at their own scale)",
    )

    @field_validator("weight")
    @classmethod
    def _non_negative(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or min(values) < 0:
            raise ValueError("weights must be >= 0 (one, or one per slice)")
        return v


class ParameterOptimizerName(str, enum.Enum):
    adam = "adam"
    gd = "gd"
    momentum = "momentum"  # Nesterov


class OptimizerName(str, enum.Enum):
    adam = "adam"
    gd = "gd"
    momentum = "momentum"  # Nesterov
    pie = "pie"  # gradient step normalised by each pixel's illumination
    cg = "cg"  # conjugate gradient over all tiles per epoch, line search on the driver


class OptimizerConfig(_Strict):
    """The object's optimizer.

    ``name`` defaults to the model's choice: ``pie`` for ptychography, ``adam`` otherwise;
    but a ``step_size`` given without a ``name`` keeps ``adam`` (with a warning), for which
    such run files were written.
    ``step_size`` for ``adam`` is the step of each value in the object's unit (transmission, or
    delta/beta); for ``gd`` and ``momentum`` it is a fraction of ``1/L``, the step allowed by
    the data term's curvature ``L`` under the current probe (ePIE's ``alpha``). ``pie`` divides
    each pixel's gradient by its own curvature, the minibatch's illumination of that pixel,
    plus ``illumination_floor`` times the largest one (rPIE's regularisation, LSQ-ML's
    normalisation), and takes Nesterov steps of ``step_size`` times that Newton step with
    coefficient ``momentum`` (mPIE's momentum).
    """

    name: OptimizerName | None = None
    step_size: float | None = Field(
        None,
        gt=0,
        description="default: adam 0.03 for real_imag, and for delta_beta the step that "
        "shifts a slice's phase by 0.03 rad; gd 0.5 and momentum 0.1 of 1/L",
    )
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    momentum: float | None = Field(
        None, ge=0, lt=1, description="Nesterov coefficient of 'momentum' (default 0.9) and "
        "'pie' (default 0.5)"
    )
    illumination_floor: float = Field(
        0.1, gt=0, description="pie: fraction of the largest illumination added to every "
        "pixel's, which bounds the step where the light is weak"
    )


class RefineConfig(_Strict):
    """How one parameter is refined; every key is optional.

    ``start_epoch`` is 0-based and ``stop_epoch`` exclusive; ``step_size`` is in the
    parameter's own unit (px for positions, m for spacings, a fraction of max |probe| for the
    probe). A parameter may take keys of its own (``max_shift_px`` for positions); those are
    checked against the model's declaration when the run starts.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    optimizer: ParameterOptimizerName | None = None
    step_size: float | None = Field(None, gt=0)
    start_epoch: int | None = Field(None, ge=0)
    stop_epoch: int | None = Field(None, ge=1)
    every_epochs: int = Field(1, ge=1)
    momentum: float | None = Field(
        None, ge=0, lt=1, description="Nesterov coefficient of 'momentum' (default: the "
        "parameter's own, else optimizer.momentum)"
    )
    newton_fraction: float | None = Field(
        None, gt=0, le=2, description="gd/momentum with the model's curvature estimate: the "
        "fraction of the damped Gauss-Newton step taken (default: the parameter's own)"
    )

    @model_validator(mode="after")
    def _window(self) -> RefineConfig:
        if (self.start_epoch is not None and self.stop_epoch is not None
                and self.stop_epoch <= self.start_epoch):
            raise ValueError("stop_epoch (exclusive) must be greater than start_epoch")
        return self

    def options(self) -> dict[str, Any]:
        """The parameter-specific keys (everything beyond the common ones)."""
        return dict(self.model_extra or {})


class Scheduler(str, enum.Enum):
    distributed = "distributed"
    sync = "sync"


class ClusterKind(str, enum.Enum):
    local = "local"      # a LocalCluster in this process (the default)
    address = "address"  # a running scheduler (``adorym-dask cluster slurm``, ``dask scheduler``)
    slurm = "slurm"      # dask-jobqueue: workers are batch jobs, the scheduler runs here
    pbs = "pbs"
    sge = "sge"


JOBQUEUE_KINDS = ("slurm", "pbs", "sge")


class ClusterConfig(_Strict):
    """Where the tasks run.

    ``kind`` defaults to ``local`` (a LocalCluster), or ``address`` when ``address`` is given.
    For ``slurm``/``pbs``/``sge`` the workers are batch jobs started by dask-jobqueue: its
    keyword arguments come from the site's dask config (``jobqueue.<kind>`` in
    ``~/.config/dask/jobqueue.yaml``) with ``jobqueue`` of the run file merged over them
    (dicts key by key, lists extended), see :func:`adorym_dask.cluster.jobqueue_kwargs`.
    """

    kind: ClusterKind | None = Field(
        None, description="local | address | slurm | pbs | sge (default: local, or address "
        "when 'address' is given)",
    )
    n_workers: int = Field(2, ge=1, description="workers (jobqueue kinds: scaled to this many)")
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "auto"
    address: str | None = Field(None, description="connect to a running scheduler instead")
    scheduler: Scheduler = Field(
        Scheduler.distributed, description="'sync' runs every task in-process (debugging)"
    )
    dashboard_address: str | None = Field(
        "127.0.0.1:0", description="where the dashboard of a scheduler we start listens "
        "(loopback by default; ':8787' for every interface; null for none)",
    )
    jobqueue: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of dask-jobqueue's cluster class "
        "(cores, processes, memory, queue, walltime, account, job_extra_directives, ...), "
        "merged over the site's dask config jobqueue.<kind>",
    )
    worker_lifetime: str | None = Field(
        "auto", description="jobqueue kinds: workers leave before their job's walltime, "
        "staggered, and new jobs replace them ('auto': 90 % of the walltime; e.g. '50m'; "
        "null: never)",
    )
    worker_lifetime_stagger: str | None = Field(
        None, description="spread of the leaving times (default 5 % of the lifetime)"
    )

    @model_validator(mode="after")
    def _kind(self) -> "ClusterConfig":
        if self.kind is None:
            object.__setattr__(self, "kind", ClusterKind.address if self.address else ClusterKind.local)
        if self.kind is ClusterKind.address and not self.address:
            raise ValueError("cluster.kind 'address' needs cluster.address (e.g. tcp://host:8786)")
        if self.address and self.kind is not ClusterKind.address:
            raise ValueError(f"cluster.address is given but cluster.kind is '{self.kind.value}': "
                             "drop one of them (kind 'address' connects to a running scheduler)")
        if self.jobqueue and self.kind.value not in JOBQUEUE_KINDS:
            raise ValueError(f"cluster.jobqueue applies to kind slurm, pbs or sge, not "
                             f"'{self.kind.value}': set cluster.kind")
        return self


class DashboardConfig(_Strict):
    """What the run shows on the scheduler's dashboard page ``/adorym`` (distributed runs)."""

    enabled: bool = True
    slice_index: int | None = Field(
        None, description="object slice shown: the z index, or for tomography volumes the "
        "row (y) of the axial (z, x) slice; default the middle one"
    )
    max_px: int = Field(192, ge=16, le=1024, description="largest side of the pictures sent")


class RunConfig(_Strict):
    data: DataConfig
    model: Annotated[SerializeAsAny[ModelConfig], BeforeValidator(_model_config)] = Field(
        default_factory=lambda: PtychographyConfig()
    )
    probe: ProbeConfig = ProbeConfig()
    object: ObjectConfig = ObjectConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    refine: dict[str, RefineConfig | None] = Field(
        default_factory=dict,
        description="parameters to refine besides the object, by name (the output name "
        "without its unit suffix); the probe is refined unless 'probe: null'",
    )
    regularizers: list[RegularizerConfig] = Field(default_factory=list)
    epochs: int = Field(20, ge=1)
    minibatch_size: int = Field(16, ge=1, description="tiles per optimizer step")
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
    dashboard: DashboardConfig = DashboardConfig()
    progress: bool = True

    @model_validator(mode="after")
    def _regularizer_weights(self) -> RunConfig:
        n_slices = getattr(self.model, "slices", 1)
        for i, reg in enumerate(self.regularizers):
            if isinstance(reg.weight, list) and len(reg.weight) != n_slices:
                raise ValueError(
                    f"regularizers.{i}.weight has {len(reg.weight)} values but the object has "
                    f"{n_slices} slice(s); give one weight, or one per slice"
                )
        return self


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


def _error_lines(err: ValidationError, *, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        where = prefix + ".".join(str(p) for p in e["loc"]) if e["loc"] else ""
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the documented keys)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if where and msg.startswith((f"{where}.", f"{where}:")):
            where = ""  # a nested model's message already names the full key
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n  ".join(lines)


def _format_validation_error(err: ValidationError, source: str) -> str:
    return f"invalid configuration in {source}:\n  " + _error_lines(err)


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
    if cfg.object.support_path is not None:
        cfg.object.support_path = fix(cfg.object.support_path)
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
