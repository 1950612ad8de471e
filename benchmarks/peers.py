"""Side-by-side benchmark against two peer codes: PtyLab (mPIE) and cdtools (FancyPtycho, Adam).

One far-field ptychography dataset is simulated here with plain numpy FFTs (independent of
``adorym_dask.physics`` / ``adorym_dask.simulate``), written in the package's native HDF5 layout
and in PtyLab's HDF5 input layout, and handed to cdtools as a ``Ptycho2DDataset``. The three
codes start from the same wrong-defocus probe (``start_probe.npy``), refine the probe (1 mode),
never refine positions, and run one after another on the same 2 cores:

* **ours**: the CLI exactly as a user runs it, ``adorym-dask reconstruct run.yaml``, whose run
  file holds only the data path, the probe start file, the output and the epochs (so our
  default optimizer, minibatches and 2-worker LocalCluster). To see the object after every
  epoch, epoch 1 is run with ``--set epochs=1`` and every later one with ``--resume --set
  epochs=k`` (resume is bit-exact). Those calls start new workers each time, so every epoch
  of theirs is a cold first epoch: the times come from one more, uninterrupted run of all
  the epochs (its final object is checked equal to the resumed calls'). Time =
  ``setup_seconds`` + the cumulative ``epoch_seconds`` of that run's store; the cluster's
  start and the CLI's own start are not counted.
* **PtyLab** (``ptylab`` 0.3.7 from PyPI): ``ExperimentalData`` from its HDF5 input file,
  ``Params()`` defaults, ``DummyMonitor``, ``Reconstruction.initializeObjectProbe()`` then the
  probe replaced by ours, ``Engines.mPIE`` with its defaults (betaObject = betaProbe = 0.25,
  alphaObject = alphaProbe = 0.1, feedbackM = 0.3, frictionM = 0.7, momentum on; Params:
  Fraunhofer propagator, fftshiftSwitch False, positionOrder "random", probe and object
  updated from the start, no position correction, no constraints), ``numIterations`` = epochs,
  one ``engine.reconstruct()`` call whose per-iteration callback copies the object (the copy's
  time is subtracted). numpy FFTs (pocketfft: 1 thread).
* **cdtools** (``cdtools-py`` from PyPI, on ``torch==2.13.0`` CPU): ``FancyPtycho.from_dataset``
  with its defaults (amplitude MSE, ``obj_padding`` 200, background and per-pattern weights
  refined as by default), ``translation_offsets.requires_grad = False`` (no position
  refinement; cdtools refines them by default), ``model.probe`` set to ours, then one
  ``for loss in model.Adam_optimize(epochs, dataset)`` loop (default lr 0.005, batch 15; one
  Adam state for the whole run: calling ``Adam_optimize`` once per epoch would restart Adam),
  the object copied after each yield. ``torch.set_num_threads(2)``.

The peers run in a virtual environment of their own (``benchmarks/.peers-venv``, made with
``python3.11 -m venv`` and filled with pip only when it or the packages are missing; torch is
installed first, as ``torch==2.13.0``, so that cdtools does not pull a CUDA build), each in a
subprocess of this script in worker mode (``--run-peer``) with OMP/MKL/OpenBLAS threads = 2.

Scoring, the same for every code, on every epoch's object: the object is put in the ground
truth's pixel frame (code pixel = data pixel + the code's offset, which each code's own
position mapping gives), then the global phase is removed, the shift is found by
``adorym_dask.metrics.align_images`` over the illuminated box and applied (Fourier shift), a
linear phase ramp is removed (least-squares plane fit of the phase difference over the
illuminated mask), and ``phase_ssim`` / ``phase_rmse`` are taken over the mask
(``illumination_mask`` of the true probe at the true positions, threshold 0.1). The final
object is also scored against the twin image (conjugated and rotated by 180 degrees) and the
transpose: a code whose object scores better that way is flagged ("orientation" column), not
silently fixed.

It prints, per code: s/epoch (median), setup seconds, phase SSIM after 5/10/20 epochs, phase
RMSE after 10/20, the time to reach PtyLab's 10-epoch SSIM (setup + epochs up to the first epoch
at or above it; "not reached in N"), the load average before and after, "other procs" (the mean
number of cores that processes outside this benchmark kept busy while the code ran: timings
taken on a shared machine are only comparable when it is near 0; ``--wait-idle`` waits for a
quiet machine before each code) and the peak RSS of the code's process tree (psutil samples;
for ours: driver, nannies and workers together, and the largest single process). The SSIM of
the all-ones start object is printed too: on this image (large flat regions) it is not small,
and a noisy early reconstruction can score below it. Nothing is asserted; a code that cannot
be installed or run is reported as skipped with the reason.

The dataset: a 556 x 556 object (phase 0..1 rad from ``skimage.data.camera()``, amplitude
0.9..1 from ``moon()``), 400 integer positions on a jittered raster (about 69 % linear overlap),
10 keV, 10 nm pixels, a 128 x 128 detector 1 m away, a zone-plate-like probe (annular pupil,
central stop 0.3) defocused 103 um to a 64 px cone, 3e8 photons per pattern, Poisson noise.
The start probe is the same pupil defocused 0.8 times as far (83 um): from 0.6 times as far
PtyLab's mPIE stalls (phase SSIM 0.27 after 20 epochs on ``--quick``).

Usage
-----
::

    .venv/bin/python benchmarks/peers.py                  # full: 556 px object, 128 px, 400
    .venv/bin/python benchmarks/peers.py --quick          # 200 px object, 64 px, 100 positions
    .venv/bin/python benchmarks/peers.py --codes ours,ptylab --epochs 10 --json out.json
    .venv/bin/python benchmarks/peers.py --folder /tmp/peers --keep   # keep data and outputs

Options: ``--object-px``, ``--det-px``, ``--positions``, ``--photons``, ``--beam-fraction``,
``--start-defocus-factor``, ``--seed``, ``--epochs``, ``--target-epoch``, ``--wait-idle``,
``--peers-venv``, ``--python``, ``--no-install`` (``--help`` says more). The full run takes
about 5 minutes here (20 CLI calls for ours, each starting a cluster). Worker mode (used
internally, in the peers' venv)::

    python benchmarks/peers.py --run-peer ptylab --input DIR --epochs 20 --out result.npz
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV = HERE / ".peers-venv"
PTYLAB_VERSION = "0.3.7"
TORCH_PIN = "torch==2.13.0"
THREAD_ENV = {
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "OPENBLAS_NUM_THREADS": "2",
    "NUMEXPR_NUM_THREADS": "2",
    "MPLBACKEND": "Agg",
    "TQDM_DISABLE": "1",
}
CODES = ("ours", "ptylab", "cdtools")


# ============================================================================================
# dataset: plain numpy simulation
# ============================================================================================
@dataclass(frozen=True)
class DatasetSpec:
    """Parameters of the simulated far-field ptychography dataset.

    ``beam_fraction`` is the defocused beam's geometric diameter over the detector (probe
    window) width; the probe is the far field of an annular pupil (zone-plate-like: outer
    radius ``pupil_fraction`` of the sampling frequency, central stop ``stop_fraction`` of it)
    defocused so that the cone has that diameter. The start probe is the same pupil defocused
    ``start_defocus_factor`` times as far.
    """

    object_px: int = 556
    det_px: int = 128
    positions: int = 400
    photons: float = 3e8
    energy_ev: float = 10000.0
    pixel_size_m: float = 10e-9
    detector_distance_m: float = 1.0
    beam_fraction: float = 0.5
    pupil_fraction: float = 0.25
    stop_fraction: float = 0.3
    start_defocus_factor: float = 0.8
    jitter: float = 0.15
    seed: int = 0

    @property
    def wavelength_m(self) -> float:
        return 12.398419843320026e-7 / self.energy_ev  # h c / E, E in eV

    @property
    def defocus_m(self) -> float:
        """Defocus giving a cone of ``beam_fraction * det_px`` pixels in diameter."""
        d_px = self.beam_fraction * self.det_px
        f_max = self.pupil_fraction / self.pixel_size_m
        return d_px * self.pixel_size_m / (2.0 * self.wavelength_m * f_max)

    @property
    def detector_pixel_m(self) -> float:
        """Detector pixel for which the object pixel is ``pixel_size_m`` (far field)."""
        return self.wavelength_m * self.detector_distance_m / (self.det_px * self.pixel_size_m)


def unit_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image`` resized (anti-aliased) to ``shape`` and scaled to [0, 1]."""
    from skimage.transform import resize

    img = resize(image.astype(np.float64), shape, order=1, mode="reflect",
                 anti_aliasing=True, preserve_range=True)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros(shape)


def make_object(n: int) -> np.ndarray:
    """``[n, n]`` complex128: phase 0..1 rad from ``camera()``, amplitude 0.9..1 from ``moon()``."""
    from skimage import data

    phase = unit_image(data.camera(), (n, n))
    amp = 0.9 + 0.1 * unit_image(data.moon(), (n, n))
    return amp * np.exp(1j * phase)


def make_probe(spec: DatasetSpec, defocus_m: float, pad: int = 4) -> np.ndarray:
    """``[det, det]`` complex128 probe with ``sum |P|^2 = spec.photons``.

    The pupil (annulus in spatial frequency) times the Fresnel defocus phase
    ``exp(-i pi lambda z f^2)`` is inverse-transformed on a grid ``pad`` times larger (so the
    defocused cone does not wrap), centred at ``(det//2, det//2)``, cropped to the window and
    tapered by ``exp(-(r / (0.45 det))^8)``.
    """
    n, dx, lam = spec.det_px, spec.pixel_size_m, spec.wavelength_m
    m = pad * n
    f = np.fft.fftfreq(m, d=dx)
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    fr = np.sqrt(f2)
    f_max = spec.pupil_fraction / dx
    pupil = (fr <= f_max) & (fr >= spec.stop_fraction * f_max)
    field = np.fft.ifft2(pupil * np.exp(-1j * np.pi * lam * defocus_m * f2))
    field = np.fft.fftshift(field)  # zero position at (m//2, m//2)
    c = m // 2 - n // 2
    p = field[c : c + n, c : c + n]
    yy, xx = np.mgrid[:n, :n] - n // 2
    p = p * np.exp(-((np.hypot(yy, xx) / (0.45 * n)) ** 8))
    return p * np.sqrt(spec.photons / np.sum(np.abs(p) ** 2))


def scan_positions(spec: DatasetSpec) -> np.ndarray:
    """``[n, 2]`` int64 top-left (y, x): a jittered raster filling the object, row-major."""
    rng = np.random.default_rng(spec.seed)
    side = int(math.ceil(math.sqrt(spec.positions)))
    extent = spec.object_px - spec.det_px
    step = extent / max(side - 1, 1)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
    pos = grid.reshape(-1, 2)[: spec.positions] * step
    pos = pos + rng.uniform(-spec.jitter, spec.jitter, pos.shape) * step
    return np.clip(np.round(pos), 0, extent).astype(np.int64)


def far_field(obj: np.ndarray, probe: np.ndarray, positions: np.ndarray,
              batch: int = 50) -> np.ndarray:
    """``[n, det, det]`` noiseless intensities ``|fftshift(fft2(P O_tile, ortho))|^2``."""
    n = probe.shape[0]
    out = np.empty((len(positions), n, n), dtype=np.float64)
    for s in range(0, len(positions), batch):
        tiles = np.stack([obj[y : y + n, x : x + n] for y, x in positions[s : s + batch]])
        psi = np.fft.fftshift(np.fft.fft2(probe[None] * tiles, norm="ortho"), axes=(-2, -1))
        out[s : s + batch] = np.abs(psi) ** 2
    return out


@dataclass
class Dataset:
    """Paths and ground truth of a simulated dataset in ``folder``."""

    folder: Path
    spec: DatasetSpec
    truth: np.ndarray          # [ny, nx] complex
    probe: np.ndarray          # [det, det] complex, true
    start_probe: np.ndarray    # [det, det] complex
    positions: np.ndarray      # [n, 2] int
    overlap: float             # linear overlap 1 - mean step / beam diameter

    @property
    def native(self) -> Path:
        return self.folder / "data.h5"

    @property
    def ptylab_h5(self) -> Path:
        return self.folder / "ptylab.hdf5"

    @property
    def peer_input(self) -> Path:
        return self.folder / "peer_input.npz"

    @property
    def start_probe_path(self) -> Path:
        return self.folder / "start_probe.npy"


def write_native(path: Path, intensities: np.ndarray, positions: np.ndarray,
                 spec: DatasetSpec) -> None:
    """The package's native HDF5 layout (README, "Measurement files")."""
    import h5py

    n, dy, dx = intensities.shape
    with h5py.File(path, "w") as f:
        f.create_dataset("intensities", data=intensities[None].astype(np.float32),
                         chunks=(1, min(n, 16), dy, dx))
        f.create_dataset("positions_px", data=positions.astype(np.float64))
        f.attrs["energy_ev"] = float(spec.energy_ev)
        f.attrs["pixel_size_m"] = float(spec.pixel_size_m)
        f.attrs["detector_distance_m"] = float(spec.detector_distance_m)


def write_ptylab(path: Path, intensities: np.ndarray, positions: np.ndarray,
                 spec: DatasetSpec) -> None:
    """PtyLab's CPM HDF5 input: ptychogram, encoder [m] (row, col), wavelength, dxd, zo.

    PtyLab places a frame at ``round(encoder / dxo) + No//2 - Np//2`` and does not centre the
    encoder itself (it does only when it transposes it), so the encoder is centred here on an
    integer pixel: a pure shift of the object frame.
    """
    import h5py

    centre = np.round(positions.mean(axis=0))
    encoder = (positions - centre) * spec.pixel_size_m
    with h5py.File(path, "w") as f:
        f.create_dataset("ptychogram", data=intensities.astype(np.float32))
        f.create_dataset("encoder", data=encoder.astype(np.float64))
        f.create_dataset("wavelength", data=spec.wavelength_m)
        f.create_dataset("dxd", data=spec.detector_pixel_m)
        f.create_dataset("zo", data=spec.detector_distance_m)
        f.create_dataset("entrancePupilDiameter", data=spec.beam_fraction * spec.det_px
                         * spec.pixel_size_m)
        f.create_dataset("orientation", data=0)


def make_dataset(folder: Path, spec: DatasetSpec) -> Dataset:
    """Simulate (Poisson noise) and write every input the three codes read."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = make_object(spec.object_px)
    probe = make_probe(spec, spec.defocus_m)
    start = make_probe(spec, spec.defocus_m * spec.start_defocus_factor)
    pos = scan_positions(spec)
    clean = far_field(truth, probe, pos)
    rng = np.random.default_rng(spec.seed + 1)
    intens = rng.poisson(clean).astype(np.float32)
    # a user scales the start probe to the measured photons per pattern
    start = start * np.sqrt(intens.sum(axis=(1, 2)).mean() / np.sum(np.abs(start) ** 2))
    ds = Dataset(folder, spec, truth, probe, start.astype(np.complex64), pos,
                 overlap=1.0 - mean_step(pos) / (spec.beam_fraction * spec.det_px))
    write_native(ds.native, intens, pos, spec)
    write_ptylab(ds.ptylab_h5, intens, pos, spec)
    np.save(ds.start_probe_path, ds.start_probe[None])  # [modes, py, px]
    np.savez(ds.peer_input, intensities=intens, positions_px=pos, start_probe=ds.start_probe,
             truth_shape=np.array(truth.shape), wavelength_m=spec.wavelength_m,
             pixel_size_m=spec.pixel_size_m, detector_distance_m=spec.detector_distance_m,
             detector_pixel_m=spec.detector_pixel_m)
    np.save(folder / "truth.npy", truth.astype(np.complex64))
    np.save(folder / "true_probe.npy", probe.astype(np.complex64))
    return ds


def mean_step(pos: np.ndarray) -> float:
    """Mean distance from each position to its nearest neighbour, in pixels."""
    p = pos.astype(np.float64)
    d = np.hypot(*(p[:, None, :] - p[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    return float(d.min(axis=1).mean())


# ============================================================================================
# frames, shared by the workers (no adorym_dask import: they run in the peers' venv)
# ============================================================================================
def frame_crop(image: np.ndarray, offset: np.ndarray, shape: tuple[int, int],
               fill: complex = 1.0) -> np.ndarray:
    """The truth-frame view of a code's ``image``, where code pixel = data pixel + ``offset``.

    Same as ``adorym_dask.metrics.in_object_frame(image, shape, -offset)``.
    """
    off = np.round(np.asarray(offset)).astype(int)
    out = np.full(shape, fill, dtype=np.complex64)
    src, dst = [], []
    for a in range(2):
        lo = max(0, off[a])
        hi = min(image.shape[a], off[a] + shape[a])
        src.append(slice(lo, hi))
        dst.append(slice(lo - off[a], hi - off[a]))
    out[tuple(dst)] = image[tuple(src)]
    return out


def constant_offset(code_px: np.ndarray, data_px: np.ndarray, what: str) -> np.ndarray:
    """The single integer offset ``code_px - data_px``, or an error naming ``what``."""
    d = np.asarray(code_px, dtype=np.float64) - np.asarray(data_px, dtype=np.float64)
    if np.ptp(d[:, 0]) > 1e-6 or np.ptp(d[:, 1]) > 1e-6:
        raise RuntimeError(f"{what}: positions are not a pure shift of the input ones "
                           f"(spread {np.ptp(d, axis=0)} px): flipped or scaled geometry")
    return np.round(d[0]).astype(int)


def peak_rss_self_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ============================================================================================
# workers (run in the peers' venv)
# ============================================================================================
def worker_ptylab(inp: dict, folder: Path, epochs: int) -> dict:
    """mPIE with PtyLab's defaults from our start probe; per-epoch truth-frame objects."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    np.random.seed(0)  # PtyLab shuffles positions and triggers momentum with np.random
    t0 = time.perf_counter()
    import PtyLab
    from PtyLab import Engines, ExperimentalData, Params, Reconstruction
    from PtyLab.Monitor.Monitor import DummyMonitor

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = ExperimentalData(str(folder / "ptylab.hdf5"), "CPM")
    params = Params()
    monitor = DummyMonitor()
    rec = Reconstruction(data, params)
    rec.initializeObjectProbe()
    start = inp["start_probe"].astype(np.complex64)
    rec.probe = np.broadcast_to(start, rec.probe.shape).astype(np.complex64).copy()
    engine = Engines.mPIE(rec, data, params, monitor)
    engine.numIterations = int(epochs)
    offset = constant_offset(rec.positions, inp["positions_px"], "PtyLab")
    if not np.isclose(rec.dxo, float(inp["pixel_size_m"]), rtol=1e-9):
        raise RuntimeError(f"PtyLab object pixel {rec.dxo} != {float(inp['pixel_size_m'])}")
    setup = time.perf_counter() - t0
    shape = tuple(int(v) for v in inp["truth_shape"])
    snaps, stamps, costs = [], [], []

    def after_iteration(loop: int, r: Any) -> None:
        t = time.perf_counter()
        snaps.append(frame_crop(np.asarray(r.object)[0, 0, 0, 0], offset, shape))
        stamps.append(t)
        costs.append(time.perf_counter() - t)

    t_start = time.perf_counter()
    engine.reconstruct(vis_after_each_iteration=after_iteration)
    epoch_s = np.diff(np.array([t_start] + stamps)) - np.array([0.0] + costs[:-1])
    return {
        "objects": np.stack(snaps), "epoch_seconds": epoch_s, "setup_seconds": setup,
        "import_seconds": t_import, "offset": offset, "object_shape": np.array(rec.object.shape),
        "loss": np.asarray(rec.error, dtype=np.float64), "version": PtyLab.__dict__.get(
            "__version__", _dist_version("ptylab")),
        "probe": np.asarray(rec.probe)[0, 0, 0, 0],
    }


def worker_cdtools(inp: dict, folder: Path, epochs: int) -> dict:
    """FancyPtycho + Adam (cdtools defaults) from our start probe, positions held."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    import cdtools
    from cdtools.tools.interactions import translations_to_pixel

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    dx = float(inp["pixel_size_m"])
    pos = inp["positions_px"].astype(np.float64)
    # cdtools translations are (x, y, z) in metres; with the detector basis below the object
    # basis is [[0, dx], [dx, 0], [0, 0]]: pixel (i, j) = (y / dx, x / dx).
    translations = np.stack([pos[:, 1] * dx, pos[:, 0] * dx, np.zeros(len(pos))],
                            axis=1).astype(np.float32)
    p = float(inp["detector_pixel_m"])
    geometry = {"distance": float(inp["detector_distance_m"]),
                "basis": np.array([[0.0, p], [p, 0.0], [0.0, 0.0]], dtype=np.float32)}
    dataset = cdtools.datasets.Ptycho2DDataset(
        translations, torch.as_tensor(inp["intensities"], dtype=torch.float32),
        wavelength=float(inp["wavelength_m"]), detector_geometry=geometry)
    model = cdtools.models.FancyPtycho.from_dataset(dataset)
    model.translation_offsets.requires_grad = False
    start = torch.as_tensor(inp["start_probe"].astype(np.complex64))
    norm = torch.max(torch.abs(start))
    model.probe_norm = norm.to(model.probe_norm.dtype)
    with torch.no_grad():
        model.probe.data = (start / norm)[None].to(model.probe.dtype)
    basis = model.obj_basis.detach().numpy()
    if not np.allclose(basis, [[0, dx], [dx, 0], [0, 0]], rtol=1e-4, atol=dx * 1e-4):
        raise RuntimeError(f"cdtools object basis {basis.tolist()} is not [[0,dx],[dx,0],[0,0]]")
    pix = translations_to_pixel(model.obj_basis, torch.as_tensor(translations),
                                surface_normal=model.surface_normal) - model.min_translation
    # cdtools floors each position and shifts the probe by the rest: float32 round-off that
    # gave 12.99999 would put a tile one pixel off with a probe wrapped by ~1 px (checked here)
    frac = float(np.abs(pix.numpy() - np.round(pix.numpy())).max())
    offset = constant_offset(np.floor(pix.numpy()), pos, "cdtools")
    if frac > 1e-3:
        raise RuntimeError(f"cdtools positions are {frac} px off integers")
    setup = time.perf_counter() - t0
    shape = tuple(int(v) for v in inp["truth_shape"])
    snaps, epoch_s, losses = [], [], []
    t = time.perf_counter()
    for loss in model.Adam_optimize(int(epochs), dataset):
        now = time.perf_counter()
        epoch_s.append(now - t)
        losses.append(float(loss))
        snaps.append(frame_crop(model.obj.detach().numpy(), offset, shape))
        t = time.perf_counter()
    return {
        "objects": np.stack(snaps), "epoch_seconds": np.array(epoch_s), "setup_seconds": setup,
        "import_seconds": t_import, "offset": offset,
        "object_shape": np.array(model.obj.shape), "loss": np.array(losses),
        "version": getattr(cdtools, "__version__", _dist_version("cdtools-py")),
        "probe": (model.probe.detach()[0] * model.probe_norm).numpy(),
    }


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def run_worker(code: str, folder: Path, epochs: int, out: Path) -> int:
    """Worker entry: run ``code`` on ``folder``'s inputs and write ``out`` (npz)."""
    with np.load(folder / "peer_input.npz") as f:
        inp = {k: f[k] for k in f.files}
    fn = {"ptylab": worker_ptylab, "cdtools": worker_cdtools}[code]
    res = fn(inp, folder, epochs)
    res["peak_rss_self_mb"] = peak_rss_self_mb()
    np.savez(out, **{k: np.asarray(v) for k, v in res.items()})
    return 0


# ============================================================================================
# peers' environment
# ============================================================================================
def _pip(venv: Path, *args: str, log: list[str]) -> bool:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log.append(f"$ {' '.join(cmd)} -> rc {r.returncode}")
    if r.returncode != 0:
        log.append((r.stdout + r.stderr)[-2000:])
    return r.returncode == 0


def _importable(venv: Path, module: str) -> bool:
    py = venv / "bin" / "python"
    return py.exists() and subprocess.run([str(py), "-c", f"import {module}"],
                                          capture_output=True).returncode == 0


def ensure_peers_env(venv: Path, python: str, install: bool) -> tuple[dict[str, str], list[str]]:
    """Make ``venv`` with PtyLab and cdtools if missing; ``{code: why skipped}`` and a log."""
    log: list[str] = []
    skipped: dict[str, str] = {}
    if not (venv / "bin" / "python").exists():
        if not install:
            return {c: f"no venv at {venv} (--no-install)" for c in ("ptylab", "cdtools")}, log
        r = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True)
        log.append(f"$ {python} -m venv {venv} -> rc {r.returncode}")
        if r.returncode != 0:
            why = f"could not create venv with {python}: {(r.stdout + r.stderr).strip()[-300:]}"
            return {c: why for c in ("ptylab", "cdtools")}, log
    need_ptylab = not _importable(venv, "PtyLab")
    need_cdtools = not _importable(venv, "cdtools")
    if (need_ptylab or need_cdtools) and install:
        # torch first, pinned: the CPU wheel; left to pip, cdtools would pull a CUDA build
        if not _importable(venv, "torch") and not _pip(venv, TORCH_PIN, log=log):
            skipped["cdtools"] = f"pip install {TORCH_PIN} failed (see log)"
        if need_ptylab and not _pip(venv, f"ptylab=={PTYLAB_VERSION}", log=log):
            log.append(f"ptylab=={PTYLAB_VERSION} unavailable, trying the latest")
            _pip(venv, "ptylab", log=log)
        if need_cdtools and "cdtools" not in skipped:
            _pip(venv, "cdtools-py", TORCH_PIN, log=log)  # keep the pin while resolving
    for code, module in (("ptylab", "PtyLab"), ("cdtools", "cdtools")):
        if code not in skipped and not _importable(venv, module):
            r = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"],
                               capture_output=True, text=True)
            tail = (r.stderr.strip().splitlines() or ["not installed"])[-1]
            skipped[code] = f"import {module} fails in {venv}: {tail}" + (
                "" if install else " (--no-install)")
    return skipped, log


# ============================================================================================
# running the codes
# ============================================================================================
class TreeRSS:
    """Peak resident memory of a process and its descendants, sampled with psutil."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak_sum_mb = 0.0
        self.peak_one_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            import psutil

            root = psutil.Process(self.pid)
        except Exception:  # noqa: BLE001 - psutil missing or the process already gone
            return
        while not self._stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss / 2**20)
                    except Exception:  # noqa: BLE001 - a child that just ended
                        pass
                if rss:
                    self.peak_sum_mb = max(self.peak_sum_mb, sum(rss))
                    self.peak_one_mb = max(self.peak_one_mb, max(rss))
            except Exception:  # noqa: BLE001 - root ended
                return
            self._stop.wait(self.every_s)


class OtherLoad:
    """Mean number of cores that processes other than this one and its children kept busy.

    System busy CPU seconds (``psutil.cpu_times``) over the block, less this process's and its
    waited-for descendants' CPU seconds (``resource.getrusage``), over the wall time: 0 on an
    otherwise idle machine, about 1 while another single-threaded job runs alongside.
    """

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        if self._start is not None and end is not None:
            wall = end[0] - self._start[0]
            other = (end[1] - self._start[1]) - (end[2] - self._start[2])
            self.cores = max(other, 0.0) / wall if wall > 0 else None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import resource

        try:
            import psutil
        except ImportError:
            return None
        ct = psutil.cpu_times()
        idle = ct.idle + getattr(ct, "iowait", 0.0)
        guests = getattr(ct, "guest", 0.0) + getattr(ct, "guest_nice", 0.0)
        busy = sum(ct) - idle - guests
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            own += ru.ru_utime + ru.ru_stime
        return time.perf_counter(), busy, own


def wait_idle(limit_s: float, threshold: float = 0.25, probe_s: float = 3.0) -> float | None:
    """Wait up to ``limit_s`` until other processes use under ``threshold`` cores (measured
    over ``probe_s``); the last measurement."""
    deadline = time.perf_counter() + limit_s
    while True:
        with OtherLoad() as other:
            time.sleep(probe_s)
        if other.cores is None or other.cores < threshold or time.perf_counter() > deadline:
            return other.cores
        time.sleep(5.0)


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> tuple[int, float, float]:
    """Run ``cmd`` with output to ``log``; ``(rc, peak tree RSS MB, peak process RSS MB)``."""
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        with TreeRSS(proc.pid) as rss:
            rc = proc.wait()
    return rc, rss.peak_sum_mb, rss.peak_one_mb


def log_tail(log: Path, n: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class CodeRun:
    """What a code produced: per-epoch truth-frame objects and times."""

    code: str
    objects: np.ndarray | None = None      # [epochs, ny, nx] complex64, truth frame
    epoch_seconds: np.ndarray | None = None
    setup_seconds: float = 0.0
    peak_rss_mb: float | None = None       # whole process tree (psutil samples)
    peak_rss_one_mb: float | None = None   # largest single process
    load_before: tuple[float, ...] = ()
    load_after: tuple[float, ...] = ()
    wall_seconds: float = 0.0
    other_cores: float | None = None       # cores other processes kept busy meanwhile
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    version: str = ""


def run_ours(ds: Dataset, epochs: int, work: Path) -> CodeRun:
    """``adorym-dask reconstruct`` one epoch per call (``--resume``), defaults otherwise."""
    import xarray as xr

    from adorym_dask.metrics import in_object_frame

    run = CodeRun("ours")
    cli = Path(sys.executable).with_name("adorym-dask")
    if not cli.exists():
        run.skipped = f"{cli} not found"
        return run
    out = work / "ours.zarr"
    shutil.rmtree(out, ignore_errors=True)
    cfg = work / "run.yaml"
    cfg.write_text(
        f"data: {{path: {ds.native}}}\n"
        f"probe: {{init: file, path: {ds.start_probe_path}}}\n"
        f"output: {out}\n"
        f"epochs: {epochs}\n"
    )
    log = work / "ours.log"
    log.write_text("")
    snaps, peak, peak1, setup_first = [], 0.0, 0.0, None
    shape = ds.truth.shape
    t0 = time.perf_counter()
    for k in range(1, epochs + 1):
        cmd = [str(cli), "reconstruct", str(cfg), "--set", f"epochs={k}"]
        if k > 1:
            cmd.append("--resume")
        rc, p, p1 = run_logged(cmd, log)
        peak, peak1 = max(peak, p), max(peak1, p1)
        if rc != 0:
            run.skipped = f"adorym-dask exited {rc} at epoch {k}: {log_tail(log, 5)}"
            return run
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr: _checkpoint.npz is not a zarr node
            store = xr.open_zarr(out, consolidated=False)
        with store:
            o = store["object"].values
            off = np.asarray(store.attrs["position_offset_px"], dtype=np.float64)
            if setup_first is None:
                setup_first = float(store["setup_seconds"].values)
            epoch_s = np.asarray(store["epoch_seconds"].values, dtype=np.float64)
            vers = store.attrs.get("versions", {})
            run.version = f"{vers.get('adorym-dask', '?')} (git {str(vers.get('git'))[:10]}"
            run.version += f"{dirty_tree()})"
        obj = (o[:, :, 0, 0] + 1j * o[:, :, 0, 1]).astype(np.complex64)
        snap = frame_crop(obj, off, shape)
        if k == 1 and not np.array_equal(snap, in_object_frame(obj, shape, -off).astype(
                np.complex64)):
            run.notes.append("frame_crop differs from in_object_frame")
        snaps.append(snap)
    run.wall_seconds = time.perf_counter() - t0
    run.objects = np.stack(snaps)
    per_call = epoch_s[:epochs]
    # The times: one uninterrupted run of all the epochs, as a user runs it (each resumed call
    # above starts new worker processes, so every one of its epochs is a cold first epoch).
    # Resume is bit-exact, so this run's images are the ones scored above.
    timed = work / "ours_timed.zarr"
    shutil.rmtree(timed, ignore_errors=True)
    rc, p, p1 = run_logged([str(cli), "reconstruct", str(cfg), "--set", f"output={timed}"], log)
    peak, peak1 = max(peak, p), max(peak1, p1)
    if rc != 0:
        run.skipped = f"adorym-dask exited {rc} in the timed run: {log_tail(log, 5)}"
        return run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = xr.open_zarr(timed, consolidated=False)
    with store:
        run.epoch_seconds = np.asarray(store["epoch_seconds"].values, np.float64)[:epochs]
        run.setup_seconds = float(store["setup_seconds"].values)
        final = store["object"].values
    if not np.array_equal(frame_crop((final[:, :, 0, 0] + 1j * final[:, :, 0, 1]).astype(
            np.complex64), off, shape), snaps[-1]):
        run.notes.append("the uninterrupted run's object differs from the resumed one's")
    run.notes.append(f"s/epoch of the one-epoch-per-call runs (cold workers each time): "
                     f"{np.median(per_call):.2f}")
    run.peak_rss_mb, run.peak_rss_one_mb = peak, peak1
    run.notes.append(f"setup_seconds {run.setup_seconds:.2f} s (the uninterrupted run; the "
                     f"first one-epoch call's {setup_first:.2f} s); offset {off.tolist()}")
    return run


def dirty_tree() -> str:
    """", N files modified" when the package's source differs from its commit (read-only)."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--", "adorym_dask"], cwd=REPO,
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    n = len([ln for ln in r.stdout.splitlines() if ln.strip()])
    return f", {n} files modified" if n else ""


def run_peer(code: str, ds: Dataset, epochs: int, work: Path, venv: Path) -> CodeRun:
    """The worker mode of this script in the peers' venv, 2 threads."""
    run = CodeRun(code)
    out = work / f"{code}.npz"
    out.unlink(missing_ok=True)
    log = work / f"{code}.log"
    log.write_text("")
    env = dict(os.environ, **THREAD_ENV)
    env.pop("PYTHONPATH", None)
    cmd = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--run-peer", code,
           "--input", str(ds.folder), "--epochs", str(epochs), "--out", str(out)]
    t0 = time.perf_counter()
    rc, peak, peak1 = run_logged(cmd, log, env=env, cwd=work)
    run.wall_seconds = time.perf_counter() - t0
    if rc != 0 or not out.exists():
        run.skipped = f"worker exited {rc}: {log_tail(log, 8)}"
        return run
    with np.load(out) as f:
        run.objects = f["objects"]
        run.epoch_seconds = f["epoch_seconds"]
        run.setup_seconds = float(f["setup_seconds"])
        run.version = str(f["version"])
        run.notes.append(f"offset {f['offset'].tolist()}, object {f['object_shape'].tolist()}, "
                         f"import {float(f['import_seconds']):.1f} s (not counted), "
                         f"ru_maxrss {float(f['peak_rss_self_mb']):.0f} MB")
    run.peak_rss_mb, run.peak_rss_one_mb = peak, peak1
    return run


# ============================================================================================
# scoring
# ============================================================================================
def remove_ramp(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``recon`` times ``exp(-i (a + b y + c x))``, the plane fitted to its phase error.

    The slopes are first taken from neighbour products over the mask (immune to wrapping),
    then a least-squares plane is fitted to the remaining wrapped phase difference.
    """
    z = recon * np.conj(truth)
    my = mask[1:, :] & mask[:-1, :]
    mx = mask[:, 1:] & mask[:, :-1]
    by = float(np.angle(np.sum((z[1:, :] * np.conj(z[:-1, :]))[my])))
    bx = float(np.angle(np.sum((z[:, 1:] * np.conj(z[:, :-1]))[mx])))
    yy, xx = np.mgrid[: recon.shape[0], : recon.shape[1]].astype(np.float64)
    z = z * np.exp(-1j * (by * yy + bx * xx))
    d = np.angle(z[mask] * np.exp(-1j * np.angle(np.sum(z[mask]))))
    a = np.stack([np.ones(d.size), yy[mask], xx[mask]], axis=1)
    coef, *_ = np.linalg.lstsq(a, d, rcond=None)
    c0 = float(np.angle(np.sum(z[mask])))
    plane = c0 + coef[0] + (by + coef[1]) * yy + (bx + coef[2]) * xx
    return (recon * np.exp(-1j * plane)).astype(np.complex64)


def bbox(mask: np.ndarray) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def prepare(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list]:
    """Global phase, shift (registered over the mask's box) and linear ramp removed."""
    from scipy import ndimage

    from adorym_dask.metrics import align_images, remove_global_phase

    r = remove_global_phase(recon, truth, mask=mask)
    sy, sx = bbox(mask)
    _, shift = align_images(r[sy, sx], truth[sy, sx])
    r = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(r), shift)).astype(np.complex64)
    r = remove_ramp(r, truth, mask)
    return remove_global_phase(r, truth, mask=mask), [float(v) for v in shift]


def score(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """Phase SSIM and RMSE (rad) after :func:`prepare`."""
    from adorym_dask.metrics import phase_rmse, phase_ssim

    r, shift = prepare(recon, truth, mask)
    return {"ssim": phase_ssim(r, truth, mask=mask), "rmse": phase_rmse(r, truth, mask=mask),
            "shift_px": shift}


def orientation_check(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> str:
    """"ok", or which mirrored/conjugated variant of ``recon`` matches the truth better."""
    variants = {
        "as is": recon,
        "conj+rot180": np.conj(recon[::-1, ::-1]),
        "transpose": recon.T,
        "conj": np.conj(recon),
    }
    ssim = {}
    for name, v in variants.items():
        try:
            ssim[name] = score(np.ascontiguousarray(v), truth, mask)["ssim"]
        except Exception:  # noqa: BLE001 - a variant that cannot be registered
            ssim[name] = -1.0
    best = max(ssim, key=ssim.get)
    if best == "as is" or ssim[best] - ssim["as is"] < 0.05:
        return "ok"
    return f"{best} matches better (SSIM {ssim[best]:.3f} vs {ssim['as is']:.3f})"


@dataclass
class Row:
    """One line of the table."""

    code: str
    version: str = ""
    s_per_epoch: float | None = None
    setup_s: float | None = None
    ssim: dict[int, float] = field(default_factory=dict)
    rmse: dict[int, float] = field(default_factory=dict)
    ssim_all: list[float] = field(default_factory=list)
    time_to_target_s: float | None = None
    epoch_to_target: int | None = None
    load_before: tuple[float, ...] = ()
    load_after: tuple[float, ...] = ()
    peak_rss_mb: float | None = None
    peak_rss_one_mb: float | None = None
    wall_s: float = 0.0
    other_cores: float | None = None
    orientation: str = ""
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


def score_run(run: CodeRun, truth: np.ndarray, mask: np.ndarray, marks: list[int]) -> Row:
    row = Row(run.code, version=run.version, load_before=run.load_before,
              load_after=run.load_after, peak_rss_mb=run.peak_rss_mb,
              peak_rss_one_mb=run.peak_rss_one_mb, wall_s=run.wall_seconds,
              other_cores=run.other_cores,
              skipped=run.skipped, notes=list(run.notes))
    if run.skipped or run.objects is None:
        return row
    row.s_per_epoch = float(np.median(run.epoch_seconds))
    row.setup_s = run.setup_seconds
    for k, obj in enumerate(run.objects, start=1):
        s = score(obj, truth, mask)
        row.ssim_all.append(s["ssim"])
        if k in marks:
            row.ssim[k], row.rmse[k] = s["ssim"], s["rmse"]
    row.orientation = orientation_check(run.objects[-1], truth, mask)
    row.notes.append(f"final shift {score(run.objects[-1], truth, mask)['shift_px']} px")
    return row


def time_to_reach(row: Row, run: CodeRun, target: float) -> None:
    """First epoch whose SSIM >= ``target``; time = setup + cumulative epoch seconds."""
    if row.skipped or not row.ssim_all:
        return
    for k, s in enumerate(row.ssim_all, start=1):
        if s >= target:
            row.epoch_to_target = k
            row.time_to_target_s = row.setup_s + float(np.sum(run.epoch_seconds[:k]))
            return


# ============================================================================================
# report
# ============================================================================================
def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row], marks: list[int], target_epoch: int, target: float | None,
          epochs: int) -> str:
    head = (["code", "s/epoch", "setup s"] + [f"SSIM@{k}" for k in marks]
            + [f"RMSE@{k}" for k in marks if k >= target_epoch]
            + [f"t to PtyLab SSIM@{target_epoch}" + (f" ({target:.3f})" if target else ""),
               "load before", "load after", "other procs", "peak RSS MB"])
    lines = []
    for r in rows:
        if r.skipped:
            lines.append([r.code, f"skipped: {r.skipped.splitlines()[0][:150]}"])
            continue
        if target is None:
            reach = "n/a (no PtyLab)"
        elif r.time_to_target_s is None:
            reach = f"not reached in {epochs}"
        else:
            reach = f"{r.time_to_target_s:.1f} s (epoch {r.epoch_to_target})"
        rss = fmt(r.peak_rss_mb, ".0f") + (
            f" (max proc {r.peak_rss_one_mb:.0f})" if r.peak_rss_one_mb else "")
        lines.append([r.code, fmt(r.s_per_epoch, ".2f"), fmt(r.setup_s, ".1f")]
                     + [fmt(r.ssim.get(k)) for k in marks]
                     + [fmt(r.rmse.get(k)) for k in marks if k >= target_epoch]
                     + [reach, " ".join(f"{v:.2f}" for v in r.load_before),
                        " ".join(f"{v:.2f}" for v in r.load_after),
                        fmt(r.other_cores, ".2f") + " cores", rss])
    widths = [max(len(head[i]), *(len(ln[i]) for ln in lines if len(ln) > 2)) if any(
        len(ln) > 2 for ln in lines) else len(head[i]) for i in range(len(head))]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("-+-".join("-" * w for w in widths))
    for ln in lines:
        if len(ln) == 2:
            out.append(f"{ln[0].ljust(widths[0])} | {ln[1]}")
        else:
            out.append(" | ".join(c.ljust(w) for c, w in zip(ln, widths)))
    return "\n".join(out)


# ============================================================================================
# main
# ============================================================================================
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="200 px object, 64 px detector, 100 positions")
    p.add_argument("--object-px", type=int, default=None)
    p.add_argument("--det-px", type=int, default=None)
    p.add_argument("--positions", type=int, default=None)
    p.add_argument("--photons", type=float, default=DatasetSpec.photons,
                   help="photons per pattern (sum |probe|^2)")
    p.add_argument("--beam-fraction", type=float, default=DatasetSpec.beam_fraction,
                   help="defocused beam diameter / detector width")
    p.add_argument("--start-defocus-factor", type=float,
                   default=DatasetSpec.start_defocus_factor,
                   help="start probe defocus / true defocus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--target-epoch", type=int, default=10,
                   help="the PtyLab epoch whose SSIM the others must reach")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each code, wait up to S seconds for other processes to use "
                        "under 0.25 cores")
    p.add_argument("--codes", default=",".join(CODES),
                   help="comma-separated subset of ours,ptylab,cdtools")
    p.add_argument("--folder", type=Path, default=None,
                   help="work folder (default: a temporary one, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--peers-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--python", default="python3.11", help="interpreter for the peers' venv")
    p.add_argument("--no-install", action="store_true",
                   help="never create the venv or pip install; skip what is missing")
    # worker mode
    p.add_argument("--run-peer", choices=("ptylab", "cdtools"), help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def spec_from_args(a: argparse.Namespace) -> DatasetSpec:
    quick = {"object_px": 200, "det_px": 64, "positions": 100} if a.quick else {}
    kw = dict(quick)
    for name in ("object_px", "det_px", "positions"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    return DatasetSpec(photons=a.photons, beam_fraction=a.beam_fraction,
                       start_defocus_factor=a.start_defocus_factor, seed=a.seed, **kw)


def machine() -> str:
    import platform

    return f"{platform.node()} {platform.processor() or platform.machine()}, " \
           f"{os.cpu_count()} CPUs, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.run_peer:
        return run_worker(a.run_peer, a.input, a.epochs, a.out)
    codes = [c.strip() for c in a.codes.split(",") if c.strip()]
    unknown = set(codes) - set(CODES)
    if unknown:
        raise SystemExit(f"--codes: unknown {sorted(unknown)}; choose from {CODES}")
    spec = spec_from_args(a)
    marks = sorted({k for k in (5, 10, 20, a.target_epoch, a.epochs) if k <= a.epochs})
    temp = a.folder is None
    work = Path(tempfile.mkdtemp(prefix="peers-")) if temp else a.folder.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; work folder {work}")

    skipped: dict[str, str] = {}
    if {"ptylab", "cdtools"} & set(codes):
        t0 = time.perf_counter()
        skipped, install_log = ensure_peers_env(a.peers_venv.resolve(), a.python,
                                                not a.no_install)
        for line in install_log:
            print(line.splitlines()[0] if line else line)
        print(f"peers' venv {a.peers_venv} ready in {time.perf_counter() - t0:.0f} s"
              + (f"; skipped: {skipped}" if skipped else ""))

    t0 = time.perf_counter()
    ds = make_dataset(work / "data", spec)
    print(f"dataset: object {spec.object_px}^2, detector {spec.det_px}^2, "
          f"{len(ds.positions)} positions (jittered raster, overlap {ds.overlap:.0%} of a "
          f"{spec.beam_fraction * spec.det_px:.0f} px beam), {spec.photons:.2g} photons, "
          f"defocus {spec.defocus_m * 1e6:.1f} um (start probe "
          f"{spec.defocus_m * spec.start_defocus_factor * 1e6:.1f} um), "
          f"made in {time.perf_counter() - t0:.1f} s")

    from adorym_dask.metrics import illumination_mask

    mask = illumination_mask(ds.probe, ds.positions, ds.truth.shape)
    start_score = score(np.ones_like(ds.truth, dtype=np.complex64), ds.truth, mask)
    runs: dict[str, CodeRun] = {}
    order = [c for c in ("ptylab", "cdtools", "ours") if c in codes]
    for code in order:
        if code in skipped:
            runs[code] = CodeRun(code, skipped=skipped[code])
            print(f"{code}: skipped: {skipped[code]}")
            continue
        if a.wait_idle > 0:
            idle = wait_idle(a.wait_idle)
            print(f"{code}: other processes use {fmt(idle, '.2f')} cores", flush=True)
        before = os.getloadavg()
        print(f"{code}: running {a.epochs} epochs (load {before[0]:.2f}) ...", flush=True)
        with OtherLoad() as other:
            try:
                if code == "ours":
                    run = run_ours(ds, a.epochs, work)
                else:
                    run = run_peer(code, ds, a.epochs, work, a.peers_venv.resolve())
            except Exception as err:  # noqa: BLE001 - report, go on with the others
                run = CodeRun(code, skipped=f"{type(err).__name__}: {err}")
        run.load_before, run.load_after = before, os.getloadavg()
        run.other_cores = other.cores
        runs[code] = run
        print(f"{code}: {'skipped: ' + run.skipped if run.skipped else 'done'} "
              f"({run.wall_seconds:.0f} s wall)", flush=True)

    rows = {c: score_run(runs[c], ds.truth, mask, marks) for c in order}
    target = None
    pt = rows.get("ptylab")
    if pt is not None and not pt.skipped and a.target_epoch in pt.ssim:
        target = pt.ssim[a.target_epoch]
        for c in order:
            time_to_reach(rows[c], runs[c], target)
    shown = [rows[c] for c in CODES if c in rows]
    print()
    print(table(shown, marks, a.target_epoch, target, a.epochs))
    print(f"(start object, all ones: SSIM {start_score['ssim']:.3f}, RMSE "
          f"{start_score['rmse']:.3f} rad; illuminated mask {int(mask.sum())} px)")
    for r in shown:
        if not r.skipped:
            print(f"{r.code} {r.version}: orientation {r.orientation}; SSIM per epoch "
                  + " ".join(f"{s:.3f}" for s in r.ssim_all) + "; wall "
                  + f"{r.wall_s:.0f} s; " + "; ".join(r.notes))
    if a.json:
        payload = {
            "machine": machine(), "dataset": asdict(spec) | {
                "overlap": ds.overlap, "defocus_m": spec.defocus_m,
                "n_positions": len(ds.positions)},
            "epochs": a.epochs, "target_epoch": a.target_epoch, "target_ssim": target,
            "start_object_score": start_score,
            "rows": [asdict(r) | {"ssim": {str(k): v for k, v in r.ssim.items()},
                                  "rmse": {str(k): v for k, v in r.rmse.items()}}
                     for r in shown],
        }
        a.json.write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {a.json}")
    if temp and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
