"""Rigid rotation of a voxel volume into the lab frame, and its projection along the beam.

Geometry (DESIGN.md "Conventions"): a volume ``[n_y, n_x, n_z, C]`` has voxel ``(i, j, k)`` at
material coordinates ``r = (y, x, z) = (i - cy, j - cx, k - cz)`` (voxel units, ``(cy, cx, cz)``
the rotation centre in index coordinates). The beam travels along lab ``+z`` and

    r_lab = Rz(t_z) Rx(t_x) Ry(theta + t_y) r

with ``Ry(p)``: ``x' = x cos p - z sin p``, ``z' = x sin p + z cos p`` (the sense of scikit-image
``radon`` for an image laid out ``[row = z, col = x]``), ``Rx(a)``: ``y' = y cos a - z sin a``,
``z' = y sin a + z cos a`` and ``Rz(g)``: ``y' = y cos g - x sin g``, ``x' = y sin g + x cos g``.
A lab point takes the volume's value at ``R^T r_lab`` by trilinear interpolation, zero outside.
Everything is differentiable in the volume, the rotations, the centre and the lab y/x samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rotation_matrices", "rotate_to_lab", "project", "lab_z_samples"]

_CHUNK_BYTES = 1 << 30  # intermediate memory per chunk of angles


def _matrices(entries: list[list[Tensor | float]], like: Tensor) -> Tensor:
    """Stack a 3x3 nested list of ``[A]`` tensors / floats into ``[A, 3, 3]``."""
    rows = [torch.stack([torch.as_tensor(e, dtype=like.dtype, device=like.device).expand_as(like)
                         for e in row], dim=-1) for row in entries]
    return torch.stack(rows, dim=-2)


def rotation_matrices(theta: Tensor, tilts: Tensor | None = None) -> Tensor:
    """Rotation matrices ``R = Rz(t_z) Rx(t_x) Ry(theta + t_y)`` acting on ``(y, x, z)`` columns.

    Parameters
    ----------
    theta : Tensor, shape [A]
        Tomographic angles in radians (rotation about y).
    tilts : Tensor, shape [A, 3], optional
        ``(t_y, t_x, t_z)`` in radians; ``None`` means no tilt (then ``R = Ry(theta)`` exactly,
        which lets `rotate_to_lab` take its fast path).

    Returns
    -------
    Tensor, shape [A, 3, 3]
        Differentiable in ``theta`` and ``tilts``.
    """
    p = theta if tilts is None else theta + tilts[:, 0]
    c, s = torch.cos(p), torch.sin(p)
    rot = _matrices([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], p)
    if tilts is None:
        return rot
    ca, sa = torch.cos(tilts[:, 1]), torch.sin(tilts[:, 1])
    cg, sg = torch.cos(tilts[:, 2]), torch.sin(tilts[:, 2])
    rx = _matrices([[ca, 0.0, -sa], [0.0, 1.0, 0.0], [sa, 0.0, ca]], ca)
    rz = _matrices([[cg, -sg, 0.0], [sg, cg, 0.0], [0.0, 0.0, 1.0]], cg)
    return rz @ rx @ rot


def lab_z_samples(n_x: int, n_z: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Tensor:
    """Lab z sample positions ``[d]`` (spacing 1, symmetric about 0) for a line integral.

    They cover ``|z| <= hypot(n_x, n_z) / 2 + 1``, the volume's (x, z) extent at any angle plus
    one voxel for interpolation, and have the parity of ``n_z`` so that at a rotation of exactly 0
    about the geometric centre they fall on voxel centres.
    """
    half = math.hypot(n_x, n_z) / 2 + 1
    extra = max(0, math.ceil(half - (n_z - 1) / 2))
    m = n_z + 2 * extra
    return torch.arange(m, dtype=dtype, device=device) - (m - 1) / 2


def _is_y_rotation(rotations: Tensor) -> bool:
    e0 = rotations.new_tensor([1.0, 0.0, 0.0])
    return bool((rotations[:, 0, :] == e0).all() and (rotations[:, :, 0] == e0).all())


def _sample(vol: Tensor, rot: Tensor, c: Tensor, ly: Tensor, lx: Tensor, lz: Tensor,
            fast: bool, reduce: bool) -> Tensor:
    """One chunk of angles: ``[A, h, w, d, C]``, or ``[A, h, w, C]`` summed over d if ``reduce``."""
    ny, nx, nz, nc = vol.shape
    a, h, w, d = rot.shape[0], ly.shape[-1], lx.shape[-1], lz.shape[0]
    lx3 = lx.expand(a, w)[:, None, :, None]  # [A, 1, w, 1]
    lz3 = lz[None, None, None, :]
    sx, sz = 2.0 / (nx - 1), 2.0 / (nz - 1)  # align_corners=True normalisation
    if fast:
        # y is untouched: interpolate rows at lab y (2 taps), then one bilinear (x, z) sample
        iy = ly + c[0]
        i0 = torch.floor(iy.detach())
        wts, rows = (1.0 - (iy - i0), iy - i0), 0.0
        for tap, wt in enumerate(wts):
            idx = i0.long() + tap
            ok = (idx >= 0) & (idx < ny)
            rows = rows + vol[idx.clamp(0, ny - 1)] * (wt * ok)[..., None, None, None]
        per_angle = ly.dim() == 2  # rows [A, h, nx, nz, C] else [h, nx, nz, C]
        inp = rows.movedim(-1, -3).reshape(a if per_angle else 1, h * nc, nx, nz)
        r = rot[:, 1:, 1:, None, None]
        gx = (r[:, 0, 0] * lx3[:, 0] + r[:, 1, 0] * lz3[:, 0] + c[1]) * sx - 1.0  # [A, w, d]
        gz = (r[:, 0, 1] * lx3[:, 0] + r[:, 1, 1] * lz3[:, 0] + c[2]) * sz - 1.0
        grid = torch.stack([gz, gx], dim=-1)
        if not per_angle:
            grid = grid.reshape(1, a * w, d, 2)
        out = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out.sum(-1, keepdim=True) if reduce else out  # [N, h*C, (A*)w, d or 1]
        if per_angle:
            out = out.reshape(a, h, nc, w, -1).permute(0, 1, 3, 4, 2)
        else:
            out = out.reshape(h, nc, a, w, -1).permute(2, 0, 3, 4, 1)
        return out.squeeze(-2) if reduce else out
    ly3 = ly.expand(a, h)[:, :, None, None]  # [A, h, 1, 1]
    r = rot[:, :, :, None, None, None]
    comps = []
    for p, scale in ((2, sz), (1, sx), (0, 2.0 / (ny - 1))):  # grid order: (z, x, y)
        comps.append((r[:, 0, p] * ly3 + r[:, 1, p] * lx3 + r[:, 2, p] * lz3 + c[p]) * scale - 1.0)
    grid = torch.stack(comps, dim=-1).reshape(1, a * h, w, d, 3)
    inp = vol.permute(3, 0, 1, 2)[None]  # [1, C, ny, nx, nz]
    out = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    out = out.sum(-1, keepdim=True) if reduce else out  # [C, A*h, w, d or 1]
    out = out.reshape(nc, a, h, w, -1).permute(1, 2, 3, 4, 0)
    return out.squeeze(-2) if reduce else out


def _run(volume: Tensor, rotations: Tensor, centre: Sequence[float] | Tensor, lab_y: Tensor,
         lab_x: Tensor, lab_z: Tensor, fast: bool, reduce: bool) -> Tensor:
    dt, dev = volume.dtype, volume.device
    c = centre.to(dt) if isinstance(centre, Tensor) else torch.stack(
        [torch.as_tensor(v, dtype=dt, device=dev) for v in centre])
    rot, ly, lx, lz = (t.to(dt) for t in (rotations, lab_y, lab_x, lab_z))
    pads = [1 if n == 1 else 0 for n in volume.shape[:3]]
    if any(pads):  # grid_sample cannot normalise a size-1 axis: embed it between zero layers
        py, px, pz = pads
        volume = F.pad(volume, (0, 0, pz, pz, px, px, py, py))
        c = c + c.new_tensor(pads)
    use_fast = fast and not rotations.requires_grad and _is_y_rotation(rotations)
    n_a, (h, w, d), nc = rot.shape[0], (ly.shape[-1], lx.shape[-1], lz.shape[0]), volume.shape[-1]
    per_angle = w * d * (2 + 2 * h * nc) if use_fast else h * w * d * (3 + 2 * nc)
    chunk = max(1, _CHUNK_BYTES // (per_angle * volume.element_size()))
    outs = []
    for a0 in range(0, n_a, chunk):
        sl = slice(a0, a0 + chunk)
        outs.append(_sample(volume, rot[sl], c, ly[sl] if ly.dim() == 2 else ly,
                            lx[sl] if lx.dim() == 2 else lx, lz, use_fast, reduce))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def rotate_to_lab(volume: Tensor, rotations: Tensor, *, centre: Sequence[float] | Tensor,
                  lab_y: Tensor, lab_x: Tensor, lab_z: Tensor, fast: bool = True) -> Tensor:
    """Sample a volume on a lab-frame grid for each rotation.

    Parameters
    ----------
    volume : Tensor, shape [ny, nx, nz, C]
        Channels last (e.g. delta, beta); float32 or float64.
    rotations : Tensor, shape [A, 3, 3]
        From `rotation_matrices`.
    centre : (float, float, float) or Tensor, shape [3]
        ``(cy, cx, cz)``: index coordinates of the rotation centre in ``volume`` (may be
        fractional or outside a slab); differentiable when a tensor.
    lab_y : Tensor, shape [h] or [A, h]
    lab_x : Tensor, shape [w] or [A, w]
    lab_z : Tensor, shape [d]
        Lab coordinates (voxel units, relative to the centre) of the output grid.
    fast : bool, default True
        Allow the fast path (rows interpolated at ``lab_y`` first, then one bilinear (x, z)
        sample), taken only when ``rotations`` does not require grad and every matrix is
        exactly a rotation about y. ``False`` forces the general trilinear path.

    Returns
    -------
    Tensor, shape [A, h, w, d, C]
        ``out[a, i, j, k] = volume(R_a^T (lab_y[i], lab_x[j], lab_z[k]))``, zero outside.
    """
    return _run(volume, rotations, centre, lab_y, lab_x, lab_z, fast, reduce=False)


def project(volume: Tensor, rotations: Tensor, *, centre: Sequence[float] | Tensor,
            lab_y: Tensor, lab_x: Tensor, lab_z: Tensor, step: float = 1.0,
            fast: bool = True) -> Tensor:
    """Line integrals along lab z: ``rotate_to_lab(...).sum(-2) * step``, shape [A, h, w, C].

    Same parameters as `rotate_to_lab`; ``step`` is the lab z sample spacing (in the unit the
    integral should carry, e.g. voxel size). Summing per chunk of angles keeps the full
    ``[A, h, w, d, C]`` array from ever being held.
    """
    return _run(volume, rotations, centre, lab_y, lab_x, lab_z, fast, reduce=True) * step
