"""Fly-scan ptychography with position errors, after Sec. 3.4 of the paper (small size).

During each exposure the probe moves 4 px along the fast axis (x) of a 4 px raster: every
pattern is the incoherent mean over 8 sub-positions of that path (``fly_scan_px``), which a
mixed-state probe (5 modes) can represent and a single mode cannot. The recorded positions
carry Gaussian errors of 3 px RMS (2.12 px per axis). The true position of an exposure is the
centre of its path. The reconstruction starts from the true single-mode probe (extra modes
seeded from it with noise, then orthogonalised) and refines the probe from epoch 1 and the
positions from epoch 2 (their defaults), 30 epochs.

Measured on 2 cores (128 x 128 object, 64 x 64 detector, 272 positions, Poisson noise at 1e6
photons per pattern, object Adam step 0.01): positions 2.99 -> 0.30 px RMS (common shift
removed), phase SSIM 0.525 with 5 modes and position refinement, 0.320 with 5 modes and the
recorded positions, 0.514 with 1 mode and position refinement (its positions 0.26 px RMS). The CI test runs the first case
(34 s); the comparison of all three is ``-m slow`` (about 90 s); the full-size version is
``benchmarks/fly_scan.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adorym_dask.config import config_from_dict
from adorym_dask.engine import run
from adorym_dask.metrics import align_images, illumination_mask, in_object_frame, phase_ssim
from adorym_dask.simulate import simulate_ptychography

ERROR_RMS_PX = 3.0


def position_rms(refined: np.ndarray, truth: np.ndarray) -> float:
    """RMS length of ``refined - truth`` ``[n, 2]`` after removing their mean (common shift)."""
    d = refined - truth
    d = d - d.mean(axis=0)
    return float(np.sqrt((d**2).sum(axis=1).mean()))


@pytest.fixture(scope="module")
def fly(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fly")
    return simulate_ptychography(
        tmp / "fly.h5", object_shape=(128, 128), probe_shape=(64, 64), scan="raster",
        step_px=4.0, fly_scan_px=4.0, position_error_px=ERROR_RMS_PX / np.sqrt(2),
        poisson_noise=True, photons_per_pattern=1e6, seed=3,
    )


def _run(fly, out: Path, *, modes: int, refine_positions: bool):
    tree = {
        "data": {"path": str(fly.path)},
        "model": {"kind": "ptychography", "probe_modes": modes},
        "probe": {"init": "file", "path": str(fly.probe_path)},
        "refine": {"positions": {}} if refine_positions else {},
        "epochs": 30,
        "output": str(out),
        "cluster": {"scheduler": "sync"},
        "progress": False,
    }
    result = run(config_from_dict(tree))
    obj = result.object()
    recon = obj[:, :, 0, 0] + 1j * obj[:, :, 0, 1]
    off = result.position_offset_px.astype(int)
    truth = in_object_frame(fly.object[:, :, 0], recon.shape, off)
    mask = illumination_mask(fly.probe, fly.positions_px + off, truth.shape)
    ssim = phase_ssim(align_images(recon, truth)[0], truth, mask=mask)
    rms = position_rms(result.positions_px[0], fly.positions_px)
    print(f"\n[fly scan, {modes} mode(s), positions {'refined' if refine_positions else 'fixed'}]"
          f" phase SSIM {ssim:.3f}, position error {rms:.3f} px RMS")
    return result, ssim, rms


def test_five_modes_and_position_refinement(fly, tmp_path):
    start = position_rms(fly.recorded_positions_px, fly.positions_px)
    assert start == pytest.approx(ERROR_RMS_PX, rel=0.05)
    result, ssim, rms = _run(fly, tmp_path / "r.zarr", modes=5, refine_positions=True)
    assert rms <= 0.5, rms
    assert ssim >= 0.65, ssim  # measured 0.77 with the default (pie) object update
    power = result.open()["probe_mode_power"].values
    assert np.all(np.diff(power) <= 0) and power.sum() == pytest.approx(1.0)
    assert power[1] > 0.005  # the motion blur is carried by the extra modes


@pytest.mark.slow
def test_modes_and_positions_both_matter(fly, tmp_path):
    """Phase SSIM of 5 modes with position refinement beats (a) 5 modes with the recorded
    positions and (b) 1 mode with position refinement."""
    _, both, _ = _run(fly, tmp_path / "both.zarr", modes=5, refine_positions=True)
    _, no_positions, _ = _run(fly, tmp_path / "a.zarr", modes=5, refine_positions=False)
    _, one_mode, _ = _run(fly, tmp_path / "b.zarr", modes=1, refine_positions=True)
    assert both > no_positions and both > one_mode, (both, no_positions, one_mode)
