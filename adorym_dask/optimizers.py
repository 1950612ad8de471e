"""Pure optimizer steps shared by the blockwise object update and the driver's parameters.

Every function maps ``(x, grad, state, step) -> (x, state)`` on real float arrays without
modifying its inputs, so a Dask task that runs it twice on the same inputs writes the same
result. Complex parameters are handled through their real view ``[..., 2]``; every array keeps
its dtype.

Step counts are per entry where entries are updated at different times: each object block
counts its own steps (a block seen by only some minibatches must not take Adam's bias-corrected
early steps late), and each tile of a per-tile parameter counts its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# cg (the object only, graphs/cg.py) keeps the last gradient and direction
STATE_NAMES = {"adam": ("m", "v"), "gd": (), "momentum": ("m",), "pie": ("m",), "cg": ("g", "d")}


@dataclass(frozen=True)
class OptimizerSpec:
    """Hyper-parameters of one optimizer (a small picklable value).

    ``step_size`` is the learning rate applied: Adam's step per element, or the factor of the
    gradient for ``gd`` and ``momentum`` (Nesterov, ``momentum`` its coefficient). ``pie`` is
    ``momentum`` on a gradient already divided by each value's curvature plus ``damping`` (see
    :func:`precondition`). ``newton_fraction`` is the fraction of a damped Gauss-Newton step
    that ``gd``/``momentum`` take where a curvature estimate is given
    (:func:`parameter_step`).
    """

    name: str = "adam"
    step_size: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    damping: float = 0.0
    newton_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in STATE_NAMES:
            raise ValueError(
                f"unknown optimizer {self.name!r}; choose one of {sorted(STATE_NAMES)}"
            )

    @property
    def state_names(self) -> tuple[str, ...]:
        return STATE_NAMES[self.name]

    def with_step(self, step_size: float | np.ndarray) -> OptimizerSpec:
        # an array step (per element, ParameterSpec.step_scale) stays an array
        step = step_size if np.ndim(step_size) else float(step_size)
        return replace(self, step_size=step)


def adam_step(
    x: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    step: int | np.ndarray,
    spec: OptimizerSpec,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Adam step (Kingma & Ba 2015) with bias correction; ``step`` counts from 1.

    Arrays of any (identical) shape; ``step`` a scalar or an array broadcasting against them.
    Returns new ``(x, m, v)`` in ``x``'s dtype.
    """
    dt = x.dtype
    m = spec.beta1 * m + (1.0 - spec.beta1) * grad
    v = spec.beta2 * v + (1.0 - spec.beta2) * grad * grad
    step = np.asarray(step, np.float64)
    m_hat = m / (1.0 - spec.beta1**step)
    v_hat = v / (1.0 - spec.beta2**step)
    x = x - spec.step_size * m_hat / (np.sqrt(v_hat) + spec.eps)
    return x.astype(dt, copy=False), m.astype(dt, copy=False), v.astype(dt, copy=False)


def nesterov_step(
    x: np.ndarray, grad: np.ndarray, m: np.ndarray, spec: OptimizerSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Nesterov momentum in PyTorch's form: ``m = mu m + g; x -= lr (g + mu m)``."""
    dt = x.dtype
    m = spec.momentum * m + grad
    x = x - spec.step_size * (grad + spec.momentum * m)
    return x.astype(dt, copy=False), m.astype(dt, copy=False)


def apply_step(
    x: np.ndarray,
    grad: np.ndarray,
    state: dict[str, np.ndarray],
    step: int | np.ndarray,
    spec: OptimizerSpec,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Dispatch on ``spec.name``; ``state`` maps the names in ``spec.state_names`` to arrays."""
    if spec.name == "adam":
        x, m, v = adam_step(x, grad, state["m"], state["v"], step, spec)
        return x, {"m": m, "v": v}
    if spec.name in ("momentum", "pie"):
        x, m = nesterov_step(x, grad, state["m"], spec)
        return x, {"m": m}
    return (x - spec.step_size * grad).astype(x.dtype, copy=False), {}


def precondition(grad: np.ndarray, curvature: np.ndarray, damping: float) -> np.ndarray:
    """``grad / (curvature + damping)``: a diagonal Gauss-Newton step, bounded where the
    curvature (the illumination) is weak by ``damping`` (> 0). ``curvature`` broadcasts
    against ``grad``."""
    return (grad / (curvature + damping)).astype(grad.dtype, copy=False)


def real_view(a: np.ndarray) -> np.ndarray:
    """A complex array ``[...]`` as real ``[..., 2]`` (a copy); real arrays unchanged."""
    if np.iscomplexobj(a):
        a = np.ascontiguousarray(a)
        return a.view(a.real.dtype).reshape(*a.shape, 2).copy()
    return np.array(a)


def from_real(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of :func:`real_view` for ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        return np.ascontiguousarray(a, dtype=np.zeros((), dtype).real.dtype).view(dtype)[..., 0]
    return np.asarray(a, dtype)


def as_real(a: np.ndarray) -> np.ndarray:
    """Complex ``[...]`` -> float32 ``[..., 2]`` (real, imag), for storage."""
    return np.stack([a.real, a.imag], axis=-1).astype(np.float32)


@dataclass(frozen=True)
class ParameterState:
    """A parameter's value (its own dtype), optimizer arrays and step counts.

    Attributes
    ----------
    value : ndarray
        The current value, e.g. the probe ``[M, py, px]`` complex64 or positions
        ``[n_angles, n_tiles, 2]`` float64.
    state : dict
        Optimizer arrays on the real view of ``value`` (``[..., 2]`` for complex values), and
        for ``gd``/``momentum`` the largest gradient seen, ``gmax`` (0-d).
    step : ndarray
        int64 step counts: 0-d for a global parameter, ``[n_angles, n_tiles]`` per tile,
        ``[n_angles]`` per angle.
    """

    value: np.ndarray
    state: dict
    step: np.ndarray

    @classmethod
    def start(cls, value: np.ndarray, spec: OptimizerSpec, count_shape=()) -> ParameterState:
        real = real_view(value)
        zeros = {k: np.zeros_like(real) for k in spec.state_names}
        return cls(np.array(value), zeros, np.zeros(count_shape, np.int64))

    def reset(self, spec: OptimizerSpec) -> ParameterState:
        """The same value with fresh optimizer state (after a change of optimizer)."""
        return ParameterState.start(self.value, spec, self.step.shape)


# Damping of a Gauss-Newton step, relative to the median curvature of the entries stepped
# together: an entry that the data barely constrain (a tile over a flat region of the object)
# takes a small step instead of an arbitrary one.
GN_DAMPING = 0.1


def parameter_step(
    ps: ParameterState,
    grad: np.ndarray,
    spec: OptimizerSpec,
    index: tuple = (),
    *,
    curvature: np.ndarray | None = None,
) -> ParameterState:
    """One optimizer step of the entries ``index`` of a parameter (pure).

    Parameters
    ----------
    ps : ParameterState
        The parameter.
    grad : ndarray
        Gradient of ``value[index]`` (same dtype kind as the value).
    spec : OptimizerSpec
        For ``gd`` and ``momentum``, ``spec.step_size`` is the largest step of any element, in
        the value's unit: the learning rate is ``step_size / gmax`` with ``gmax`` the largest
        ``|grad|`` seen so far (kept in the state), so a step is never larger than
        ``step_size``, and steps shrink with the gradient as the parameter converges.
    index : tuple
        Leading-axis index of the entries the gradient belongs to (``()``: all); the step
        counts of those entries advance.
    curvature : ndarray, optional
        A (Gauss-Newton) curvature estimate in ``grad``'s shape. With it, ``gd`` and
        ``momentum`` step along the damped Newton direction ``grad / (curvature + lambda)``
        (``lambda`` = :data:`GN_DAMPING` times the median curvature), ``spec.newton_fraction``
        of it, each move capped at ``step_size`` in the value's unit (a trust region); Adam
        ignores it.
    """
    state = {k: np.array(v) for k, v in ps.state.items()}
    newton = curvature is not None and spec.name in ("gd", "momentum")
    if newton:
        damping = GN_DAMPING * float(np.median(curvature)) + np.finfo(np.float64).tiny
        grad = grad / (curvature + damping)
    elif spec.name in ("gd", "momentum"):
        peak = max(float(np.abs(grad).max()), float(state.get("gmax", 0.0)))
        state["gmax"] = np.asarray(peak)
        spec = spec.with_step(spec.step_size / peak if peak > 0 else 0.0)
    real = real_view(ps.value)
    g = real_view(grad).astype(real.dtype, copy=False)
    step = ps.step.copy()
    step[index] += 1
    counts = step[index]
    counts = counts.reshape(counts.shape + (1,) * (real[index].ndim - counts.ndim))
    sub = {k: state[k][index] for k in spec.state_names}
    if newton:
        cap = spec.step_size
        x0 = real[index]
        x, sub = apply_step(x0, g, sub, counts, spec.with_step(spec.newton_fraction))
        x = x0 + np.clip(x - x0, -cap, cap)
    else:
        x, sub = apply_step(real[index], g, sub, counts, spec)
    real[index] = x
    for k in spec.state_names:
        state[k][index] = sub[k]
    return ParameterState(from_real(real, ps.value.dtype), state, step)
