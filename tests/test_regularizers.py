"""Regularizers and constraints of the blockwise update.

Total variation couples neighbouring blocks; the update computes it on each block plus a
one-pixel halo from its neighbours' borders. Its gradient, block by block, must equal the
gradient of the whole object's TV, written here independently from the definition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from adorym_dask.graphs.update import block_borders, neighbours, update_block, with_halo
from adorym_dask.models.regularizers import (
    ObjectRules,
    Regularizer,
    apply_constraints,
    regularization_gradient,
)
from adorym_dask.optimizers import OptimizerSpec
from adorym_dask.storage.object_store import create_store
from adorym_dask.storage.support import create_support, write_support


def _whole_tv(x: np.ndarray, weights, eps: float) -> np.ndarray:
    """Gradient of sum_s w_s sum_{i,j,c} sqrt(dy^2 + dx^2 + eps^2) over the whole object
    ``[n_y, n_x, n_z, 2]``, with zero differences past the last row and column."""
    t = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    dy = torch.zeros_like(t)
    dx = torch.zeros_like(t)
    dy[:-1] = t[1:] - t[:-1]
    dx[:, :-1] = t[:, 1:] - t[:, :-1]
    w = torch.as_tensor(weights, dtype=torch.float64)[:, None]
    (torch.sqrt(dy**2 + dx**2 + eps**2) * w).sum().backward()
    return t.grad.numpy()


@pytest.mark.parametrize("shape,chunks", [((37, 50, 2), (16, 16)), ((32, 32, 1), (32, 32)),
                                          ((20, 45, 1), (7, 9))])
def test_blockwise_tv_gradient_equals_whole_object(tmp_path, shape, chunks):
    rng = np.random.default_rng(0)
    zarr.open_group(store=str(tmp_path / "r.zarr"), mode="w-")
    store = create_store("memory", tmp_path / "r.zarr", shape=shape, chunks=chunks,
                         representation="real_imag", n_state=0)
    obj = rng.normal(1.0, 0.3, (*shape, 2)).astype(np.float32)
    sources = {}
    for b in store.all_blocks():
        y0, x0, h, w = store.block_box(b)
        sources[b] = obj[y0 : y0 + h, x0 : x0 + w, ..., None].copy()
    weights = tuple(rng.uniform(0.5, 2.0, shape[2]))
    reg = Regularizer("tv", weights, eps=1e-2)
    rules = ObjectRules("real_imag", (reg,))
    got = np.zeros(obj.shape, np.float64)
    for b in store.all_blocks():
        borders = {n: block_borders(store, n, sources[n]) for n in neighbours(store, b)}
        x = sources[b][..., 0]
        ext, inner = with_halo(store, b, x, borders)
        y0, x0, h, w = store.block_box(b)
        got[y0 : y0 + h, x0 : x0 + w] = regularization_gradient(x, rules, ext, inner)
    want = _whole_tv(obj, weights, 1e-2)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_l1_pulls_towards_vacuum_not_opaque():
    """l1 on T - 1 (real/imag) and on (delta, beta): the gradient step moves towards vacuum."""
    x = np.zeros((4, 4, 1, 2), np.float32)
    x[..., 0], x[..., 1] = 0.5, 0.3  # weak transmission
    g = regularization_gradient(x, ObjectRules("real_imag", (Regularizer("l1", (1.0,)),)))
    after = x - 0.1 * g
    assert np.all(np.hypot(after[..., 0] - 1, after[..., 1]) < np.hypot(x[..., 0] - 1, x[..., 1]))
    db = np.full((4, 4, 1, 2), 0.2, np.float32)
    g = regularization_gradient(db, ObjectRules("delta_beta", (Regularizer("l1", (1.0,)),)))
    assert np.all(g > 0)  # descending lowers delta and beta towards 0
    rw = regularization_gradient(
        db * np.linspace(0.1, 1, 16).reshape(4, 4, 1, 1),
        ObjectRules("delta_beta", (Regularizer("reweighted_l1", (1.0,), eps=1e-3),)),
    )
    assert rw[0, 0, 0, 0] > rw[-1, -1, 0, 0] > 0  # weak values are pushed harder


def test_weight_per_slice():
    x = np.full((3, 3, 2, 2), 0.1, np.float32)
    g = regularization_gradient(x, ObjectRules("delta_beta", (Regularizer("l1", (0.0, 2.0)),)))
    assert np.all(g[:, :, 0] == 0) and np.all(g[:, :, 1] > 0)


def test_constraints():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (5, 6, 2, 2)).astype(np.float32)
    ri = ObjectRules("real_imag", constraint="phase_only")
    out = apply_constraints(x, ri)
    np.testing.assert_allclose(np.hypot(out[..., 0], out[..., 1]), 1.0, rtol=1e-6)
    out = apply_constraints(x, ObjectRules("real_imag", constraint="absorption_only"))
    assert np.all(out[..., 1] == 0) and np.all(out[..., 0] >= 0)
    out = apply_constraints(x, ObjectRules("delta_beta", non_negative=True))
    assert np.all(out >= 0)
    out = apply_constraints(x, ObjectRules("delta_beta", constraint="phase_only"))
    assert np.all(out[..., 1] == 0) and np.array_equal(out[..., 0], x[..., 0])
    support = np.zeros((5, 6, 2), bool)
    support[1:4, 2:5] = True
    out = apply_constraints(x, ObjectRules("real_imag", support=True), support)
    assert np.all(out[~support] == [1.0, 0.0]) and np.array_equal(out[support], x[support])


def test_update_block_adds_regularizer_and_constrains(tmp_path):
    """One update with TV and a support: the block moves against data + TV gradient, then
    everything outside the support is vacuum."""
    path = tmp_path / "r.zarr"
    zarr.open_group(store=str(path), mode="w-")
    store = create_store("memory", path, shape=(8, 8, 1), chunks=(8, 8),
                         representation="real_imag", n_state=0)
    create_support(str(path), (8, 8, 1), (8, 8))
    mask = np.zeros((8, 8, 1), bool)
    mask[2:6, 2:6] = True
    write_support(str(path), (0, 0, 8, 8), mask)
    rng = np.random.default_rng(2)
    state = rng.normal(1, 0.2, (8, 8, 1, 2, 1)).astype(np.float32)
    grad = rng.normal(0, 1, (8, 8, 1, 2)).astype(np.float32)
    rules = ObjectRules("real_imag", (Regularizer("tv", (0.5,), 1e-2),), support=True)
    new = update_block(store, (0, 0), state, grad, step=1, spec=OptimizerSpec("gd", 0.1),
                       rules=rules, borders={})
    ext, inner = with_halo(store, (0, 0), state[..., 0], {})
    want = state[..., 0] - 0.1 * (grad + regularization_gradient(state[..., 0], rules, ext, inner))
    want = apply_constraints(want, rules, mask)
    np.testing.assert_allclose(new[..., 0], want, rtol=1e-6)
    assert np.all(new[..., 0][~mask] == [1.0, 0.0])
