"""Regularizers (l1, reweighted l1, total variation) and object constraints, blockwise.

Every regularizer acts on the object's *contrast*: ``(delta, beta)`` for delta/beta objects and
the transmission minus one, ``T - 1``, for real/imag objects, so it pulls towards vacuum and
never towards an opaque object (``T = 0``). Each is a sum over object pixels with one weight per
slice, added to every minibatch's loss; its gradient is added to the data gradient of each
block that the minibatch updates.

Total variation couples neighbouring pixels, and so neighbouring blocks. It is computed in the
update task of each block on the block plus a one-pixel halo read from its neighbours' borders
(their state before this minibatch, the same state the data gradient saw; double buffering
keeps it readable while they are being updated). With the definition below, the halo holds
every term that involves a pixel of the block, so the blockwise gradient equals the gradient of
the whole object's TV exactly (``tests/test_regularizers.py``)::

    TV(x) = sum_{i, j} sqrt((x[i+1, j] - x[i, j])^2 + (x[i, j+1] - x[i, j])^2 + eps^2)

per slice and channel, with ``x[n, j] = x[n-1, j]`` and ``x[i, n] = x[i, n-1]`` past the far
edges (zero differences there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

START = {"real_imag": (1.0, 0.0), "delta_beta": (0.0, 0.0)}


@dataclass(frozen=True)
class Regularizer:
    """One regularizer term: ``kind`` (l1, reweighted_l1, tv), ``weights [n_z]``, ``eps``."""

    kind: str
    weights: tuple[float, ...]
    eps: float = 1e-3


@dataclass(frozen=True)
class ObjectRules:
    """Everything the blockwise update applies besides the optimizer step (picklable).

    Attributes
    ----------
    representation : str
        ``real_imag`` or ``delta_beta``.
    regularizers : tuple of Regularizer
    constraint : str
        ``none``, ``phase_only`` or ``absorption_only``.
    non_negative : bool
        Clip delta and beta at zero.
    passive : bool
        The object does not amplify: ``|T| <= 1`` (real/imag) or ``beta >= 0``.
    support : bool
        The run store holds a ``support`` mask to apply.
    """

    representation: str
    regularizers: tuple[Regularizer, ...] = ()
    constraint: str = "none"
    non_negative: bool = False
    support: bool = False
    passive: bool = False

    @property
    def needs_halo(self) -> bool:
        return any(r.kind == "tv" for r in self.regularizers)

    @property
    def active(self) -> bool:
        return (bool(self.regularizers) or self.constraint != "none" or self.non_negative
                or self.support or self.passive)


def contrast(x: Tensor, representation: str) -> Tensor:
    """``[..., 2]`` object values -> the contrast the regularizers act on."""
    if representation == "real_imag":
        return torch.stack([x[..., 0] - 1.0, x[..., 1]], dim=-1)
    return x


def _smooth_abs(c: Tensor, eps: float, representation: str) -> Tensor:
    """``[h, w, n_z]``: |T - 1| (complex modulus) or |delta| + |beta|, smoothed by eps."""
    if representation == "real_imag":
        return torch.sqrt(c[..., 0] ** 2 + c[..., 1] ** 2 + eps**2)
    return torch.sqrt(c**2 + eps**2).sum(dim=-1)


def l1(x: Tensor, reg: Regularizer, representation: str) -> Tensor:
    """``sum_s w_s sum |contrast|`` of a ``[h, w, n_z, 2]`` block."""
    w = torch.as_tensor(reg.weights, dtype=x.dtype)
    return (_smooth_abs(contrast(x, representation), reg.eps, representation) * w).sum()


def reweighted_l1(x: Tensor, reg: Regularizer, representation: str) -> Tensor:
    """l1 with weights ``1 / (|contrast| + eps)`` from the current value (held fixed), which
    penalises weak values more than strong ones (Candes, Wakin & Boyd 2008)."""
    a = _smooth_abs(contrast(x, representation), reg.eps, representation)
    w = torch.as_tensor(reg.weights, dtype=x.dtype) / (a.detach() + reg.eps)
    return (a * w).sum()


def tv(ext: Tensor, reg: Regularizer) -> Tensor:
    """Isotropic TV of ``ext [H, W, n_z, 2]`` over the anchors ``[:H-1, :W-1]`` (see module
    docstring; the caller pads the far edges by replication)."""
    dy = ext[1:, :-1] - ext[:-1, :-1]
    dx = ext[:-1, 1:] - ext[:-1, :-1]
    terms = torch.sqrt(dy**2 + dx**2 + reg.eps**2)
    w = torch.as_tensor(reg.weights, dtype=ext.dtype)[:, None]
    return (terms * w).sum()


def pad_far_edges(ext: np.ndarray, bottom: bool, right: bool) -> np.ndarray:
    """Append a copy of the last row / column (zero differences past the object's far edge)."""
    if bottom:
        ext = np.concatenate([ext, ext[-1:]], axis=0)
    if right:
        ext = np.concatenate([ext, ext[:, -1:]], axis=1)
    return ext


def regularization_gradient(
    block: np.ndarray,
    rules: ObjectRules,
    ext: np.ndarray | None = None,
    inner: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Gradient ``[h, w, n_z, 2]`` of every regularizer with respect to a block.

    Parameters
    ----------
    block : ndarray
        ``[h, w, n_z, 2]`` the block's values.
    rules : ObjectRules
        The regularizers.
    ext : ndarray, optional
        ``[H, W, n_z, 2]`` the block with its one-pixel halo (and far-edge padding), needed by
        TV; ``inner`` is the block's corner inside it.
    """
    x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float64)).requires_grad_(True)
    total = x.sum() * 0.0
    for reg in rules.regularizers:
        if reg.kind == "l1":
            total = total + l1(x, reg, rules.representation)
        elif reg.kind == "reweighted_l1":
            total = total + reweighted_l1(x, reg, rules.representation)
    total.backward()
    grad = x.grad.numpy()
    tv_regs = [r for r in rules.regularizers if r.kind == "tv"]
    if tv_regs:
        if ext is None:
            raise ValueError("total variation needs the block's halo (ext)")
        e = torch.from_numpy(np.ascontiguousarray(ext, dtype=np.float64)).requires_grad_(True)
        sum(tv(e, reg) for reg in tv_regs).backward()
        h, w = block.shape[:2]
        grad = grad + e.grad.numpy()[inner[0] : inner[0] + h, inner[1] : inner[1] + w]
    return grad.astype(block.dtype)


def apply_constraints(
    x: np.ndarray, rules: ObjectRules, support: np.ndarray | None = None
) -> np.ndarray:
    """Project a block ``[h, w, n_z, 2]`` onto the constraints (a new array).

    - ``non_negative``: delta, beta >= 0.
    - ``passive``: |T| <= 1 (real/imag) or beta >= 0: the object absorbs, never amplifies.
    - ``phase_only``: |T| = 1 (real/imag) or beta = 0; ``absorption_only``: T real and >= 0
      (real/imag) or delta = 0.
    - ``support [h, w, n_z]`` bool: outside it the object is vacuum (T = 1, or delta = beta = 0).
    """
    x = np.array(x)
    if rules.non_negative:
        np.maximum(x, 0.0, out=x)
    if rules.passive:
        if rules.representation == "real_imag":
            mag = np.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2)
            over = np.maximum(mag, 1.0)
            x[..., 0] /= over
            x[..., 1] /= over
        else:
            np.maximum(x[..., 1], 0.0, out=x[..., 1])
    if rules.constraint == "phase_only":
        if rules.representation == "real_imag":
            mag = np.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2)
            ok = mag > 0
            x[..., 0] = np.where(ok, x[..., 0] / np.where(ok, mag, 1), 1.0)
            x[..., 1] = np.where(ok, x[..., 1] / np.where(ok, mag, 1), 0.0)
        else:
            x[..., 1] = 0.0
    elif rules.constraint == "absorption_only":
        if rules.representation == "real_imag":
            x[..., 0] = np.maximum(x[..., 0], 0.0)
            x[..., 1] = 0.0
        else:
            x[..., 0] = 0.0
    if support is not None:
        start = START[rules.representation]
        outside = ~support.astype(bool)
        x[..., 0][outside] = start[0]
        x[..., 1][outside] = start[1]
    return x
