"""Analytic oracles for adorym_dask.physics.rotation: rotations, resampling, projection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adorym_dask.physics import rotation as rot_mod
from adorym_dask.physics.rotation import lab_z_samples, project, rotate_to_lab, rotation_matrices

F64 = torch.float64
TOMOPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tomopy"


def grid(n: int, dtype=F64) -> torch.Tensor:
    """Voxel-centre coordinates of an axis of length n about its geometric centre."""
    return torch.arange(n, dtype=dtype) - (n - 1) / 2


def centre_of(shape) -> tuple[float, float, float]:
    return tuple((n - 1) / 2 for n in shape[:3])


def ry(p):
    c, s = math.cos(p), math.sin(p)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rx(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


def rz(g):
    c, s = math.cos(g), math.sin(g)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# --------------------------------------------------------------------------- 1. matrices
def test_rotation_matrices_products_and_senses():
    gen = torch.Generator().manual_seed(1)
    theta = torch.rand(5, generator=gen, dtype=F64) * 6.3
    tilts = (torch.rand(5, 3, generator=gen, dtype=F64) - 0.5) * 0.8
    r = rotation_matrices(theta, tilts)
    assert r.shape == (5, 3, 3)
    eye = torch.eye(3, dtype=F64).expand(5, 3, 3)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(5, dtype=F64), atol=1e-12, rtol=0)
    for a in range(5):
        ty, tx, tz = tilts[a].tolist()
        want = rz(tz) @ rx(tx) @ ry(theta[a].item() + ty)
        np.testing.assert_allclose(r[a].numpy(), want, atol=1e-12)
    # no tilts: exactly Ry(theta), with exact zeros/ones in the y row and column
    r0 = rotation_matrices(theta)
    np.testing.assert_allclose(r0[0].numpy(), ry(theta[0].item()), atol=1e-15)
    assert rot_mod._is_y_rotation(r0)
    assert not rot_mod._is_y_rotation(r)
    # senses, columns (y, x, z): Ry(90) sends material +x to lab +z and +z to -x
    q = math.pi / 2
    e_y, e_x, e_z = torch.eye(3, dtype=F64)
    ry90 = rotation_matrices(torch.tensor([q], dtype=F64))[0]
    torch.testing.assert_close(ry90 @ e_x, e_z, atol=1e-15, rtol=0)
    torch.testing.assert_close(ry90 @ e_z, -e_x, atol=1e-15, rtol=0)
    # Rx(90) (tilt t_x): +y -> +z, +z -> -y ; Rz(90) (tilt t_z): +y -> +x, +x -> -y
    zero = torch.zeros(1, dtype=F64)
    rx90 = rotation_matrices(zero, torch.tensor([[0.0, q, 0.0]], dtype=F64))[0]
    torch.testing.assert_close(rx90 @ e_y, e_z, atol=1e-15, rtol=0)
    torch.testing.assert_close(rx90 @ e_z, -e_y, atol=1e-15, rtol=0)
    rz90 = rotation_matrices(zero, torch.tensor([[0.0, 0.0, q]], dtype=F64))[0]
    torch.testing.assert_close(rz90 @ e_y, e_x, atol=1e-15, rtol=0)
    torch.testing.assert_close(rz90 @ e_x, -e_y, atol=1e-15, rtol=0)
    # t_y adds to theta
    torch.testing.assert_close(rotation_matrices(zero, torch.tensor([[q, 0.0, 0.0]], dtype=F64)),
                               ry90[None], atol=1e-15, rtol=0)


# --------------------------------------------------------------------------- 2. quarter turns
@pytest.mark.parametrize("fast", [True, False])
def test_quarter_turns_are_rot90(fast):
    # Lab (x, z) samples material R^T (x, z) = (x cos + z sin, -x sin + z cos). At 90 deg:
    # out[i, j, k] = v[i, x = lab z -> k, z = -lab x -> n-1-j] = rot90(v, 1, dims=(1, 2)).
    v = torch.rand(5, 7, 7, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    theta = torch.tensor([0.0, 90.0, 180.0, 270.0], dtype=F64).deg2rad()
    out = rotate_to_lab(v, rotation_matrices(theta), centre=centre_of(v.shape),
                        lab_y=grid(5), lab_x=grid(7), lab_z=grid(7), fast=fast)
    assert out.shape == (4, 5, 7, 7, 2)
    for k in range(4):
        torch.testing.assert_close(out[k], torch.rot90(v, k, dims=(1, 2)), atol=1e-5, rtol=0)
    # one voxel spelled out: material (x, z) = (+2, -1) shows at lab (x, z) = (+1, +2) at 90 deg
    assert torch.allclose(out[1, 0, 3 + 1, 3 + 2], v[0, 3 + 2, 3 - 1])


# --------------------------------------------------------------------------- 3. disk
def disk_volume(n: int, radius: float, x0: float = 0.0, z0: float = 0.0, ss: int = 8):
    """A cylinder along y (2 rows): area fraction of the disk in each (x, z) voxel, ss^2 samples."""
    sub = (torch.arange(ss, dtype=F64) + 0.5) / ss - 0.5
    c = grid(n)
    x = (c[:, None] + sub[None, :]).reshape(n, 1, ss, 1)
    z = (c[:, None] + sub[None, :]).reshape(1, n, 1, ss)
    frac = (((x - x0) ** 2 + (z - z0) ** 2) <= radius**2).to(F64).mean(dim=(2, 3))
    return frac[None, :, :, None].expand(2, n, n, 1).contiguous()


def rel_l2(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def test_disk_radon_is_chord_length():
    n, radius, x0, z0 = 64, 18.0, 6.0, -4.0
    theta = torch.tensor([0.0, 0.4, 1.1, 2.0, 2.9, 4.5], dtype=F64)
    lab_x = grid(n + 16)
    kw = dict(lab_y=grid(2), lab_x=lab_x, lab_z=lab_z_samples(n, n, dtype=F64))
    for xc, zc in ((0.0, 0.0), (x0, z0)):
        p = project(disk_volume(n, radius, xc, zc), rotation_matrices(theta),
                    centre=centre_of((2, n, n)), **kw)[:, 0, :, 0]  # [A, w]
        # a material point (x, z) reaches lab x = x cos(theta) - z sin(theta) (Ry)
        s0 = xc * torch.cos(theta) - zc * torch.sin(theta)
        s = lab_x[None, :] - s0[:, None]
        chord = 2 * torch.sqrt((radius**2 - s**2).clamp(min=0))
        # The voxelised disk has the exact area (to the ss^2 sampling) but its edge is blurred by
        # one voxel (area fractions) and by the tent of linear interpolation (<= 1 voxel), which
        # rounds the sqrt ends of the chord profile: ~1% relative L2 for R = 18; allow 2.5%.
        for a in range(len(theta)):
            assert rel_l2(p[a], chord[a]) < 0.025, (xc, a, rel_l2(p[a], chord[a]))
        # integrals are exact (area pi R^2) and the centroid sits at s0 to a small fraction of
        # a voxel (symmetric blur does not move it)
        torch.testing.assert_close(p.sum(1), torch.full_like(s0, math.pi * radius**2), rtol=2e-3,
                                   atol=0)
        centroid = (p * lab_x).sum(1) / p.sum(1)
        torch.testing.assert_close(centroid, s0, atol=0.02, rtol=0)


# --------------------------------------------------------------------------- 4. scikit-image
def test_sense_matches_skimage_radon():
    radon = pytest.importorskip("skimage.transform").radon
    n = 41  # odd: skimage's centre n // 2 equals our geometric centre (n - 1) / 2
    gen = torch.Generator().manual_seed(4)
    c = grid(n)
    zz, xx = torch.meshgrid(c, c, indexing="ij")  # image [row = z, col = x]
    image = torch.exp(-((xx - 7) ** 2 + (zz + 3) ** 2) / 20) + 0.5 * ((xx.abs() < 4) & (zz > 5))
    image = image + 0.2 * torch.rand(n, n, generator=gen, dtype=F64)
    image = image * (xx**2 + zz**2 <= (n // 2) ** 2)  # circle=True needs nothing outside it
    deg = np.array([0.0, 17.0, 63.0, 90.0, 145.0, 233.0])
    ref = torch.from_numpy(radon(image.numpy(), theta=deg, circle=True)).T  # [A, n]
    # skimage warps the image and sums over rows (= our z, the beam); its output row i is the
    # detector position lab x = i - n // 2; its theta (degrees) equals our theta.
    vol = image.T[None, :, :, None]  # [y = 1, x, z, 1]
    for fast in (True, False):
        ours = project(vol, rotation_matrices(torch.from_numpy(np.deg2rad(deg))),
                       centre=(0.0, (n - 1) / 2, (n - 1) / 2), lab_y=torch.zeros(1, dtype=F64),
                       lab_x=grid(n), lab_z=grid(n), fast=fast)[:, 0, :, 0]
        # identical bilinear interpolation at identical points: agreement to round-off
        torch.testing.assert_close(ours, ref, atol=1e-9 * ref.abs().max().item(), rtol=0)
    # the opposite sense is clearly different for this asymmetric image
    mirrored = project(vol, rotation_matrices(torch.from_numpy(-np.deg2rad(deg))),
                       centre=(0.0, (n - 1) / 2, (n - 1) / 2), lab_y=torch.zeros(1, dtype=F64),
                       lab_x=grid(n), lab_z=grid(n))[:, 0, :, 0]
    assert rel_l2(mirrored[1:], ref[1:]) > 0.1


# --------------------------------------------------------------------------- 5. adjoint, gradcheck
def test_vjp_is_adjoint():
    gen = torch.Generator().manual_seed(5)
    v = torch.rand(4, 6, 5, 2, generator=gen, dtype=F64, requires_grad=True)
    r = rotation_matrices(torch.rand(3, generator=gen, dtype=F64) * 6,
                          (torch.rand(3, 3, generator=gen, dtype=F64) - 0.5) * 0.3)
    r_y = rotation_matrices(torch.tensor([0.3, 1.7, 4.0], dtype=F64))
    for fast, rr in ((False, r), (True, r_y)):
        p = project(v, rr, centre=(1.4, 2.6, 2.1), lab_y=grid(4), lab_x=grid(9),
                    lab_z=lab_z_samples(6, 5, dtype=F64), step=0.7, fast=fast)
        u = torch.randn(p.shape, generator=gen, dtype=F64)
        (vjp,) = torch.autograd.grad(p, v, u)
        lhs, rhs = (p * u).sum().item(), (v * vjp).sum().item()
        assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)


@pytest.mark.parametrize("fast", [False, True])
def test_gradcheck(fast):
    gen = torch.Generator().manual_seed(6)
    v = torch.rand(3, 5, 4, 2, generator=gen, dtype=F64, requires_grad=True)
    theta = torch.tensor([0.35, 2.2], dtype=F64)
    tilts = ((torch.rand(2, 3, generator=gen, dtype=F64) - 0.5) * 0.4).requires_grad_(not fast)
    centre = torch.tensor([1.13, 2.27, 1.61], dtype=F64, requires_grad=True)
    jitter = torch.rand(2, 2, 1, generator=gen, dtype=F64) * 0.6 - 0.3  # off the voxel grid
    lab_y = (grid(3)[None] + jitter[0]).requires_grad_()
    lab_x = (grid(5)[None] + jitter[1]).requires_grad_()
    lab_z = lab_z_samples(5, 4, dtype=F64)

    def f(v, tilts, centre, lab_y, lab_x):
        r = rotation_matrices(theta) if fast else rotation_matrices(theta, tilts)
        return project(v, r, centre=centre, lab_y=lab_y, lab_x=lab_x, lab_z=lab_z)

    assert torch.autograd.gradcheck(f, (v, tilts, centre, lab_y, lab_x), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 6. TomoPy data
def test_tomopy_square_projections():
    if not (TOMOPY / "proj.npy").exists():
        pytest.skip(f"TomoPy projector test data not found in {TOMOPY}")
    obj = torch.from_numpy(np.load(TOMOPY / "obj.npy"))  # [slice = y, 32, 32] ones
    angles = torch.from_numpy(np.load(TOMOPY / "angle.npy"))
    proj = torch.from_numpy(np.load(TOMOPY / "proj.npy")).to(F64)  # [A, y, col]; centre 23.5
    vol = obj[..., None]
    ours = project(vol, rotation_matrices(angles), centre=centre_of(vol.shape),
                   lab_y=grid(obj.shape[0]), lab_x=torch.arange(48, dtype=F64) - 23.5,
                   lab_z=lab_z_samples(32, 32, dtype=F64))[..., 0]
    # linear interpolation ramps the square's edge over one voxel about its true position, so
    # line integrals match the exact chords up to the corners' rounding
    assert rel_l2(ours, proj) < 1e-2
    for a in (0, 8):  # 0 and 90 degrees: samples on voxel centres, exact
        assert torch.isclose(angles[a], torch.tensor([0.0, math.pi / 2], dtype=F64)[a // 8])
        torch.testing.assert_close(ours[a], proj[a], atol=1e-5 * 32, rtol=0)


# --------------------------------------------------------------------------- 7. fast path
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fast_path_equals_general(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    v = torch.rand(6, 9, 11, 2, generator=gen, dtype=dtype, requires_grad=True)
    r = rotation_matrices(torch.tensor([0.0, 0.5, 1.9, 3.3, 5.0], dtype=dtype))
    centre = torch.tensor([2.3, 4.6, 3.7], dtype=dtype, requires_grad=True)
    lab_ys = [grid(6, dtype) + 0.25, (grid(6, dtype)[None] + torch.rand(5, 1, generator=gen,
                                                                       dtype=dtype)).contiguous()]
    lab_x = (grid(12, dtype)[None] + torch.rand(5, 1, generator=gen, dtype=dtype) - 0.5)
    lab_z = lab_z_samples(9, 11, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for lab_y in lab_ys:
        ins = (v, centre, lab_y.requires_grad_(), lab_x.requires_grad_())
        outs = {}
        for fast in (True, False):
            o = rotate_to_lab(v, r, centre=centre, lab_y=lab_y, lab_x=lab_x, lab_z=lab_z, fast=fast)
            grads = torch.autograd.grad((o * o.detach()).sum(), ins)
            outs[fast] = (o, *grads)
        assert outs[True][0].dtype == dtype and outs[True][0].shape == (5, 6, 12, len(lab_z), 2)
        for a, b in zip(outs[True], outs[False]):
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, atol=tol * scale * 10, rtol=0)
        # a rotation requiring grad takes the general path; chunking over angles changes nothing
        p = project(v, r, centre=centre, lab_y=lab_y, lab_x=lab_x, lab_z=lab_z)
        monkeypatch.setattr(rot_mod, "_CHUNK_BYTES", 1)
        for rr in (r, r.clone().requires_grad_()):
            q = project(v, rr, centre=centre, lab_y=lab_y, lab_x=lab_x, lab_z=lab_z)
            torch.testing.assert_close(q, p, atol=tol * p.abs().max().item() * 10, rtol=0)
        monkeypatch.undo()
        torch.testing.assert_close(p, outs[True][0].sum(-2), atol=tol * 100 * p.abs().max().item(),
                                   rtol=0)


def test_lab_z_samples():
    for nx, nz in ((32, 32), (9, 11), (96, 96), (1, 1), (40, 7)):
        z = lab_z_samples(nx, nz, dtype=F64)
        assert torch.allclose(z, -z.flip(0)) and torch.allclose(z.diff(), torch.ones(1, dtype=F64))
        assert z[-1] >= math.hypot(nx, nz) / 2 + 1 and z[-1] < math.hypot(nx, nz) / 2 + 2
        # on voxel centres of the z axis at rotation 0: z + cz is an integer
        assert torch.equal(z + (nz - 1) / 2, torch.round(z + (nz - 1) / 2))
