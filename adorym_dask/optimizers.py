"""Pure optimizer steps shared by the blockwise object update and the driver's parameters.

Every function maps ``(x, grad, state, step) -> (x, state)`` on real float arrays without
modifying its inputs, so a Dask task that runs it twice on the same inputs writes the same
result. Complex parameters are handled through their real view ``[..., 2]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATE_NAMES = {"adam": ("m", "v"), "gd": ()}


@dataclass(frozen=True)
class OptimizerSpec:
    """Hyper-parameters of one optimizer (a small picklable value)."""

    name: str = "adam"
    step_size: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def state_names(self) -> tuple[str, ...]:
        return STATE_NAMES[self.name]


def adam_step(
    x: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, spec: OptimizerSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Adam step (Kingma & Ba 2015) with bias correction; ``step`` counts from 1.

    Arrays of any (identical) shape; returns new ``(x, m, v)``.
    """
    m = spec.beta1 * m + (1.0 - spec.beta1) * grad
    v = spec.beta2 * v + (1.0 - spec.beta2) * grad * grad
    m_hat = m / (1.0 - spec.beta1**step)
    v_hat = v / (1.0 - spec.beta2**step)
    x = x - spec.step_size * m_hat / (np.sqrt(v_hat) + spec.eps)
    return x.astype(np.float32, copy=False), m.astype(np.float32), v.astype(np.float32)


def apply_step(
    x: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int, spec: OptimizerSpec
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Dispatch on ``spec.name``; ``state`` maps the names in ``spec.state_names`` to arrays."""
    if spec.name == "adam":
        x, m, v = adam_step(x, grad, state["m"], state["v"], step, spec)
        return x, {"m": m, "v": v}
    if spec.name == "gd":
        return (x - spec.step_size * grad).astype(np.float32), {}
    raise ValueError(f"unknown optimizer {spec.name!r}; choose one of {sorted(STATE_NAMES)}")


def as_real(a: np.ndarray) -> np.ndarray:
    """Complex ``[...]`` -> float32 ``[..., 2]`` (real, imag)."""
    return np.stack([a.real, a.imag], axis=-1).astype(np.float32)


def as_complex(a: np.ndarray) -> np.ndarray:
    """Float ``[..., 2]`` -> complex64 ``[...]``."""
    return (a[..., 0] + 1j * a[..., 1]).astype(np.complex64)


@dataclass(frozen=True)
class ParameterState:
    """A small complex parameter (e.g. the probe) with its optimizer state and step count."""

    value: np.ndarray
    state: dict
    step: int = 0

    @classmethod
    def start(cls, value: np.ndarray, spec: OptimizerSpec) -> ParameterState:
        zeros = {k: np.zeros((*value.shape, 2), np.float32) for k in spec.state_names}
        return cls(np.asarray(value, np.complex64), zeros, 0)


def parameter_step(
    ps: ParameterState, grad: np.ndarray | None, spec: OptimizerSpec
) -> ParameterState:
    """One optimizer step of a complex parameter (pure; ``grad`` None leaves it unchanged)."""
    if grad is None:
        return ps
    x, state = apply_step(as_real(ps.value), as_real(grad), ps.state, ps.step + 1, spec)
    return ParameterState(as_complex(x), state, ps.step + 1)
