"""Nonlinear conjugate gradient for the object (one of the paper's optimizers, Sec. 2.4).

One iteration per epoch, over every tile (CG needs the gradient of one fixed objective):

1. gradient pass: the tile-group tasks and a per-block sum, as in a minibatch, but each block's
   task returns the block's gradient ``g`` (kept where it was computed) and its partial dot
   products with the block's previous gradient ``g_prev`` and direction ``d_prev`` (stored in
   the block's state);
2. on the driver: the global dot products, the Polak-Ribiere+ coefficient
   ``beta = max(0, g.(g - g_prev) / g_prev.g_prev)``, the slope ``f'(0) = g.d`` of the new
   direction ``d = -g + beta d_prev`` (restarted as ``-g`` when it does not descend);
3. line search on the driver: each block writes the trial ``x + alpha0 d`` (to its other
   slot: the committed state stays intact), a loss pass reads the trial object, and the
   minimum of the parabola through ``f(0)``, ``f'(0)`` and ``f(alpha0)`` gives ``alpha``
   (exact for least squares on line integrals, a quadratic);
4. each block writes ``x + alpha d`` (constraints applied), ``g`` and ``d`` from its committed
   state.

The blocks' ``g`` and ``d`` live in the object store beside ``x`` (state names ``g``, ``d``);
the driver keeps only ``alpha`` (the next trial step) and the dot products.
"""

from __future__ import annotations

import numpy as np

from adorym_dask.graphs.reduction import crop_sum
from adorym_dask.models.regularizers import ObjectRules, apply_constraints
from adorym_dask.storage.object_store import ObjectStore
from adorym_dask.storage.support import read_support

# the parabola's minimum is kept within these multiples of the trial step
MIN_GROWTH, MAX_GROWTH = 0.1, 10.0


def block_gradient(obj: ObjectStore, block: tuple[int, int], source, *grad_items
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Task: the block's summed gradient ``g [h, w, n_z, 2]`` and its partial dot products
    ``[g.g, g.g_prev, g_prev.g_prev, g.d_prev, d_prev.d_prev]`` (float64)."""
    g = crop_sum(obj.block_box(block), obj.shape[2], *grad_items).astype(np.float64)
    state = obj.load(block, source)
    g_prev, d_prev = state[..., 1].astype(np.float64), state[..., 2].astype(np.float64)
    dots = np.array([np.vdot(g, g), np.vdot(g, g_prev), np.vdot(g_prev, g_prev),
                     np.vdot(g, d_prev), np.vdot(d_prev, d_prev)])
    return g.astype(np.float32), dots


def gradient_of(item: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return item[0]


def dots_of(item: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return item[1]


def direction(dots: np.ndarray, *, first: bool) -> tuple[float, float]:
    """``(beta, slope)`` from the summed dot products: Polak-Ribiere+ (0 on the first
    iteration, or when the direction would not descend) and ``f'(0) = g.d``."""
    gg, g_gp, gp_gp, g_dp, _ = (float(v) for v in dots)
    beta = 0.0 if first or gp_gp <= 0 else max(0.0, (gg - g_gp) / gp_gp)
    slope = -gg + beta * g_dp
    if slope >= 0:  # not a descent direction: restart along -g
        beta, slope = 0.0, -gg
    return beta, slope


def direction_norm(dots: np.ndarray, beta: float) -> float:
    """``|d|`` of ``d = -g + beta d_prev``."""
    gg, _, _, g_dp, dp_dp = (float(v) for v in dots)
    return float(np.sqrt(max(gg - 2 * beta * g_dp + beta * beta * dp_dp, 0.0)))


def line_minimum(f0: float, slope: float, alpha0: float, f1: float) -> float:
    """The minimum of the parabola through ``f(0) = f0``, ``f'(0) = slope`` and
    ``f(alpha0) = f1``, within ``[MIN_GROWTH, MAX_GROWTH] * alpha0`` (``MAX_GROWTH * alpha0``
    where the parabola opens downwards)."""
    curv = f1 - f0 - slope * alpha0
    if curv <= 0:
        return MAX_GROWTH * alpha0
    alpha = -slope * alpha0 * alpha0 / (2 * curv)
    return float(np.clip(alpha, MIN_GROWTH * alpha0, MAX_GROWTH * alpha0))


def block_step(obj: ObjectStore, block: tuple[int, int], source, gradient: np.ndarray,
               *, beta: float, alpha: float, rules: ObjectRules | None = None,
               constrain: bool = True):
    """Task: write ``[x + alpha d, g, d]`` with ``d = -g + beta d_prev`` (constraints applied
    when ``constrain``) to the block's other slot; returns the new source."""
    state = obj.load(block, source)
    d = (-gradient + beta * state[..., 2]).astype(np.float32)
    x = (state[..., 0] + alpha * d).astype(np.float32)
    if constrain and rules is not None and rules.active:
        support = read_support(obj.path, obj.block_box(block)) if rules.support else None
        x = apply_constraints(x, rules, support)
    return obj.save(block, source, np.stack([x, gradient.astype(np.float32), d], axis=-1))
