"""Fly-scan ptychography with position errors, full size (Sec. 3.4 of the paper).

A raster of exposures 5 px apart in which the probe moves 5 px along x during each exposure
(the incoherent mean over 8 sub-positions: a continuous scan), with Gaussian errors of 3 px RMS added to the
recorded positions and Poisson noise. Three reconstructions of the same data, each from the
true single-mode probe (extra modes seeded from it) and the recorded positions:

- 5 modes with position refinement (the paper's Fig. 10(a));
- (a) 5 modes, positions held (Fig. 10(c));
- (b) 1 mode with position refinement (Fig. 10(d)).

It prints the position error (RMS length after removing the common shift, against the centre of
each exposure's path; also the median and the largest, since a tile that started far off can
settle in a neighbour's place on a raster), and the phase SSIM against the truth over the
illuminated region, with the machine's load. Nothing is asserted; ``tests/test_fly_scan.py``
runs a small version.

The step matters to the comparison: at 4 px (1056 exposures, 60 epochs) the probe's motion
blurs it too little for the extra modes to show in the image (SSIM 0.614 with 5 modes, 0.615
with 1, positions 0.233 and 0.265 px RMS); at 6 px the overlap is too small for 0.25 px
(0.48 px in 60 epochs, SSIM 0.571 against 0.523). 5 px and 90 epochs are the defaults.

Run::

    python benchmarks/fly_scan.py [--object 192] [--step 5] [--epochs 90] [--folder /tmp/fly]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def position_errors(refined: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[n]`` error lengths of ``refined - truth`` after removing the common shift."""
    d = refined - truth
    return np.linalg.norm(d - d.mean(axis=0), axis=1)


def reconstruct(sim, out: Path, *, modes: int, refine_positions: bool, epochs: int) -> dict:
    from adorym_dask.config import config_from_dict
    from adorym_dask.engine import run
    from adorym_dask.metrics import align_images, illumination_mask, in_object_frame, phase_ssim

    cfg = config_from_dict({
        "data": {"path": str(sim.path)},
        "model": {"kind": "ptychography", "probe_modes": modes},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "refine": {"positions": {}} if refine_positions else {},
        "optimizer": {"step_size": 0.01},
        "epochs": epochs, "output": str(out), "overwrite": True,
        "cluster": {"scheduler": "sync"}, "progress": False,
    })
    t0 = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - t0
    obj = result.object()
    recon = obj[:, :, 0, 0] + 1j * obj[:, :, 0, 1]
    off = result.position_offset_px.astype(int)
    truth = in_object_frame(sim.object[:, :, 0], recon.shape, off)
    mask = illumination_mask(sim.probe, sim.positions_px + off, truth.shape)
    err = position_errors(result.positions_px[0], sim.positions_px)
    return {
        "ssim": phase_ssim(align_images(recon, truth)[0], truth, mask=mask),
        "rms": float(np.sqrt((err**2).mean())), "median": float(np.median(err)),
        "max": float(err.max()), "seconds": seconds,
        "power": result.open()["probe_mode_power"].values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--object", type=int, default=192, help="object side in pixels")
    parser.add_argument("--detector", type=int, default=64)
    parser.add_argument("--step", type=float, default=5.0,
                        help="scan step and probe travel per exposure, px")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()

    from adorym_dask.simulate import simulate_ptychography

    folder = Path(args.folder or tempfile.mkdtemp(prefix="adorym-fly-"))
    folder.mkdir(parents=True, exist_ok=True)
    sim = simulate_ptychography(
        folder / "fly.h5", object_shape=(args.object, args.object),
        probe_shape=(args.detector, args.detector), scan="raster", step_px=args.step,
        fly_scan_px=args.step,
        position_error_px=3.0 / np.sqrt(2), poisson_noise=True, photons_per_pattern=1e6,
        seed=args.seed, overwrite=True,
    )
    start = position_errors(sim.recorded_positions_px, sim.positions_px)
    print(f"{len(sim.positions_px)} exposures on a {args.object}^2 object, {args.detector}^2 "
          f"detector; recorded positions {np.sqrt((start**2).mean()):.3f} px RMS off "
          f"(median {np.median(start):.2f}, max {start.max():.2f})")
    rows = [("5 modes, positions refined", 5, True), ("(a) 5 modes, positions held", 5, False),
            ("(b) 1 mode, positions refined", 1, True)]
    print(f"{'case':32s} {'SSIM':>6s} {'RMS px':>7s} {'median':>7s} {'max':>6s} {'s':>6s}  "
          "mode powers")
    for i, (name, modes, refine) in enumerate(rows):
        r = reconstruct(sim, folder / f"run{i}.zarr", modes=modes, refine_positions=refine,
                        epochs=args.epochs)
        print(f"{name:32s} {r['ssim']:6.3f} {r['rms']:7.3f} {r['median']:7.3f} {r['max']:6.2f} "
              f"{r['seconds']:6.0f}  {np.round(r['power'], 3)}", flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores)")


if __name__ == "__main__":
    main()
