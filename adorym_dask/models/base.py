"""The forward-model interface every technique implements, and its parameter declarations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from adorym_dask.config import RunConfig
    from adorym_dask.storage.measurements import Measurements

Scope = Literal["global", "tile", "angle"]


@dataclass(frozen=True)
class ParameterSpec:
    """A refinable experimental parameter that a model declares.

    Attributes
    ----------
    name : str
        The key under ``refine:`` (the output name without its unit suffix).
    output : str
        Variable name in the run store (``positions_px``, ``slice_spacings_m``, ...).
    dims : tuple of str
        Dimension names of the stored value (a complex value gains a trailing ``channel``).
    scope : {"global", "tile", "angle"}
        ``global`` values are shipped whole to every task; ``tile`` values have leading axes
        ``[n_angles, n_tiles]`` and ``angle`` values ``[n_angles]``: a task gets the rows of its
        own tiles (or angle) and returns their gradient, which the driver scatters back by
        index, so only the entries a minibatch saw take an optimizer step.
    dtype : str
        NumPy dtype the value keeps (``complex64``, ``float32``, ``float64``, ...).
    unit : str
        Unit of the value and of ``refine.<name>.step_size``.
    default_step : float
        Default step size, in ``unit`` (or, with ``relative_step``, as a fraction of max |value|).
    default_optimizer : str
        Optimizer when ``refine.<name>.optimizer`` is not given.
    default_steps : mapping
        Default step by optimizer name where it differs from ``default_step``.
    relative_step : bool
        Step sizes are fractions of the start value's max |value| (the probe).
    default_start_epoch : int
        First epoch (0-based) that updates it when ``refine`` does not say.
    refined_by_default : bool
        Refined unless ``refine: {<name>: null}`` (the probe).
    default_momentum : float or None
        Nesterov coefficient of the ``momentum`` optimizer when ``refine.<name>.momentum`` is
        not given (None: ``optimizer.momentum``).
    default_newton_fraction : float
        Fraction of a damped Gauss-Newton step taken when the model estimates the curvature
        (see :func:`~adorym_dask.optimizers.parameter_step`).
    options : mapping
        Extra keys accepted under ``refine.<name>`` and their defaults (``max_shift_px``).
    refinable : bool
        False for a parameter the model takes but cannot refine (holography's tile corners,
        whose alignment is ``affine``): no gradient reaches it, and ``refine`` refuses it.
    step_scale : nested tuple or None
        Per-element factor of the step, broadcasting against the value: entries in different
        units take steps of comparable effect (an affine map's linear part steps
        ``step / half-width``, its translation ``step`` px).
    """

    name: str
    output: str
    dims: tuple[str, ...]
    scope: Scope
    dtype: str
    unit: str
    default_step: float
    default_optimizer: str = "adam"
    default_steps: Mapping[str, float] = field(default_factory=dict)
    relative_step: bool = False
    default_start_epoch: int = 0
    refined_by_default: bool = False
    default_momentum: float | None = None
    default_newton_fraction: float = 1.0
    options: Mapping[str, float] = field(default_factory=dict)
    step_scale: tuple | None = None
    refinable: bool = True

    @property
    def is_complex(self) -> bool:
        return np.dtype(self.dtype).kind == "c"


@dataclass(frozen=True)
class Batch:
    """Where a group of tiles sits: handed to :meth:`ForwardModel.predict`.

    Attributes
    ----------
    origin : (int, int)
        Object pixel ``(y, x)`` of the box's corner.
    angle : int
        Angle index of every tile.
    tiles : ndarray
        ``[G]`` tile indices.
    """

    origin: tuple[int, int]
    angle: int
    tiles: np.ndarray


@runtime_checkable
class ForwardModel(Protocol):
    """Predict measured intensities for a group of tiles from an object box.

    Instances are small, immutable and picklable: they are shipped inside every Dask task.
    Every experimental parameter enters :meth:`predict` through ``params``, so its gradient
    comes from autograd like the object's.
    """

    def parameter_specs(self) -> dict[str, ParameterSpec]:
        """Every parameter the model takes, by ``refine`` name (refined or not)."""
        ...

    def initial_parameters(self, cfg: RunConfig, meas: Measurements) -> dict[str, np.ndarray]:
        """Start values, by name; ``tile`` values ``[n_angles, n_tiles, ...]``."""
        ...

    def predict(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Return predicted intensities ``[G, det_y, det_x]``.

        Parameters
        ----------
        obj_box : Tensor
            ``[h, w, n_z, 2]`` float object values of the box the tiles see.
        params : dict of Tensor
            Global parameters whole, ``tile`` parameters as the group's rows ``[G, ...]``,
            ``angle`` parameters as the group's angle's row. Positions are ``[G, 2]`` (y, x)
            tile corners in object pixels (not relative to the box).
        batch : Batch
            The box origin, angle and tile indices.
        """
        ...

    def loss(self, pred: Tensor, meas: Tensor) -> Tensor:
        """Per-tile data mismatch ``[G]``."""
        ...
