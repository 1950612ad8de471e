"""The engine end to end: gradients against a whole-object oracle, optimizer against torch,
distributed == sync, reconstruction quality on simulated data with ground truth."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from adorym_dask.config import config_from_dict
from adorym_dask.engine import Reconstruction, run
from adorym_dask.graphs.minibatch import epoch_minibatches
from adorym_dask.graphs.reduction import add_in_order, crop_sum
from adorym_dask.graphs.tasks import tile_group_gradient
from adorym_dask.metrics import (
    aligned_phase_correlation,
    illumination_mask,
    in_object_frame,
    phase_ssim,
)
from adorym_dask.models.base import Batch
from adorym_dask.optimizers import OptimizerSpec, adam_step
from adorym_dask.refinement import group_rows, shared_values
from adorym_dask.simulate import simulate_ptychography


def _sim(tmp: Path, *, shape=(96, 96), det=(32, 32), n=40, modes=1, slices=1, seed=0, **kw):
    return simulate_ptychography(
        tmp / "sim.h5", object_shape=shape, probe_shape=det, n_positions=n, probe_modes=modes,
        slices=slices, seed=seed, **kw,
    )


def _cfg(sim, out: Path, **over):
    tree = {
        "data": {"path": str(sim.path)},
        "model": {"kind": "ptychography", "probe_modes": sim.probe.shape[0],
                  "slices": sim.object.shape[2]},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "object": {"shape_px": list(sim.object.shape[:2]), "chunks_px": [48, 48]},
        "epochs": 2,
        "output": str(out),
        "cluster": {"scheduler": "sync"},
        "progress": False,
    }
    for key, value in over.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return config_from_dict(tree)


def test_task_gradients_sum_to_whole_object_autograd(tmp_path):
    """Per-group gradient pieces, cropped and summed per block, equal one autograd pass over the
    whole object and every tile of the minibatch (the oracle)."""
    sim = _sim(tmp_path, modes=2)
    rec = Reconstruction(_cfg(sim, tmp_path / "r.zarr", tile_group_size=4, minibatch_size=16))
    rec._initialize_blocks("sync")
    groups = epoch_minibatches(rec.groups, 16, np.random.default_rng(0))[0]
    n = sum(len(g.tiles) for g in groups)
    st = rec.store
    # a textured object: over the flat start object the position gradient is exactly zero
    # (a shifted probe times a constant has the same far-field intensities), only round-off
    rng = np.random.default_rng(5)
    for block, src in rec.sources.items():
        state = st.load(block, src)
        phase = rng.uniform(-0.5, 0.5, state.shape[:3]).astype(np.float32)
        state[..., 0, 0], state[..., 1, 0] = np.cos(phase), np.sin(phase)
        st.write_slot(block, src.slot, state)
    shared = shared_values(rec.params, rec.specs)
    pieces = [
        tile_group_gradient(g, st, {b: rec.sources[b] for b in st.blocks_overlapping(g.box)},
                            rec.meas.source, shared, group_rows(rec.params, rec.specs, g),
                            rec.model, scale=1 / n, refine=("probe", "positions"))
        for g in groups
    ]
    whole = (0, 0, *st.shape[:2])
    grad = crop_sum(whole, st.shape[2], *pieces)
    pgrad = add_in_order(*(p.grads["probe"] for p in pieces))

    obj = torch.from_numpy(st.read_object(rec.sources)).requires_grad_(True)
    probe = torch.from_numpy(rec.probe).requires_grad_(True)
    tiles = np.concatenate([g.tiles for g in groups])
    pos = torch.from_numpy(rec.params["positions"].value[0, tiles]).requires_grad_(True)
    with h5py.File(sim.path) as f:
        meas = torch.from_numpy(np.stack([np.asarray(f["intensities"][0, t]) for t in tiles]))
    batch = Batch(origin=(0, 0), angle=0, tiles=tiles)
    pred = rec.model.predict(obj, {"probe": probe, "positions": pos}, batch)
    loss = rec.model.loss(pred, meas).mean()
    loss.backward()
    scale = np.abs(obj.grad.numpy()).max()
    np.testing.assert_allclose(grad, obj.grad.numpy(), atol=1e-5 * scale)
    np.testing.assert_allclose(pgrad, probe.grad.numpy(), atol=1e-5 * np.abs(pgrad).max())
    pos_grad = np.concatenate([p.grads["positions"] for p in pieces])
    np.testing.assert_allclose(pos_grad, pos.grad.numpy(), atol=1e-5 * np.abs(pos_grad).max())
    assert sum(p.loss for p in pieces) == pytest.approx(float(loss.detach()), rel=1e-5)


def test_adam_step_matches_torch_adam():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((5, 4)).astype(np.float32)
    spec = OptimizerSpec("adam", 0.05)
    xt = torch.tensor(x0, requires_grad=True)
    opt = torch.optim.Adam([xt], lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    x, m, v = x0, np.zeros_like(x0), np.zeros_like(x0)
    for step in range(1, 6):
        g = rng.standard_normal((5, 4)).astype(np.float32)
        x, m, v = adam_step(x, g, m, v, step, spec)
        opt.zero_grad()
        xt.grad = torch.from_numpy(g)
        opt.step()
    np.testing.assert_allclose(x, xt.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_distributed_equals_sync(tmp_path):
    """A 2-process LocalCluster run equals the scheduler='sync' run to 1e-5 relative."""
    from distributed import Client, LocalCluster

    sim = _sim(tmp_path, modes=2)
    common = dict(refine={"probe": {"start_epoch": 1}, "positions": {"start_epoch": 1}},
                  epochs=3)
    sync = run(_cfg(sim, tmp_path / "sync.zarr", **common))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dist = run(_cfg(sim, tmp_path / "dist.zarr", **common), client)
        assert len(client.scheduler_info()["workers"]) == 2
    a, b = sync.object(), dist.object()
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    assert np.abs(sync.probe - dist.probe).max() <= 1e-5 * np.abs(sync.probe).max()
    np.testing.assert_allclose(sync.positions_px, dist.positions_px, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sync.loss, dist.loss, rtol=1e-5)


def test_deterministic_for_a_seed(tmp_path):
    sim = _sim(tmp_path)
    r1 = run(_cfg(sim, tmp_path / "a.zarr", seed=3))
    r2 = run(_cfg(sim, tmp_path / "b.zarr", seed=3))
    np.testing.assert_array_equal(r1.object(), r2.object())


def _phase_ssim(result, sim) -> float:
    obj = result.object()
    recon = obj[:, :, 0, 0] + 1j * obj[:, :, 0, 1]
    mask = illumination_mask(sim.probe, sim.positions_px, sim.object.shape[:2])
    return phase_ssim(recon, sim.object[:, :, 0], mask=mask)


def test_small_reconstruction_reaches_ssim(tmp_path):
    """Fast version of the acceptance case (128 object, 64 detector, 120 positions, true
    probe): phase SSIM >= 0.9 against the ground truth over the illuminated region."""
    sim = _sim(tmp_path, shape=(128, 128), det=(64, 64), n=120)
    result = run(_cfg(sim, tmp_path / "r.zarr", epochs=15, refine={"probe": None}))
    assert result.loss[-1] < 0.05 * result.loss[0]
    assert _phase_ssim(result, sim) >= 0.90


def test_defaults_converge_from_data_probe(tmp_path):
    """A user who sets only data, model, probe (from the data), epochs and output gets a good
    reconstruction: the probe found from the data may shift the object (translation
    ambiguity), so the phase is compared after alignment."""
    sim = _sim(tmp_path, shape=(128, 128), det=(64, 64), n=120, seed=2)
    cfg = config_from_dict({
        "data": {"path": str(sim.path)},
        "model": {"kind": "ptychography", "probe_modes": 1, "slices": 1},
        "probe": {"init": "from_data"},
        "epochs": 30,
        "output": str(tmp_path / "r.zarr"),
        "cluster": {"scheduler": "sync"},
        "progress": False,
    })
    result = run(cfg)
    obj = result.object()
    recon = obj[:, :, 0, 0] + 1j * obj[:, :, 0, 1]
    # Compare in the object's frame: object pixel = data pixel + position offset.
    off = result.position_offset_px.astype(int)
    truth = in_object_frame(sim.object[:, :, 0], recon.shape, off)
    mask = illumination_mask(sim.probe, sim.positions_px + off, truth.shape)
    corr = aligned_phase_correlation(recon, truth, mask=mask)
    assert corr >= 0.9, corr


def test_acceptance_256_object_128_detector_300_positions(tmp_path):
    """Issue acceptance: 256x256 object, 128x128 detector, 300 positions, true probe given:
    phase SSIM >= 0.90 (measured 0.99 with the default step after 20 epochs)."""
    sim = _sim(tmp_path, shape=(256, 256), det=(128, 128), n=300)
    result = run(_cfg(sim, tmp_path / "r.zarr", epochs=20, refine={"probe": None},
                      object={"chunks_px": [128, 128]}))
    assert _phase_ssim(result, sim) >= 0.90


def test_multislice_modes_delta_beta_poisson_converge(tmp_path):
    """Every model option on one small problem: 2 slices, 2 modes, delta/beta, Poisson loss
    and probe refinement; the Poisson deviance must fall by 10x in 8 epochs (measured 140x with
    the default pie update, 7.6x with Adam; a broken gradient path or a preconditioner that
    ignores how alike the slices act, which oscillated at 2.4x, would not)."""
    sim = _sim(tmp_path, shape=(64, 64), det=(32, 32), n=30, modes=2, slices=2,
               slice_spacing_m=2e-7, photons_per_pattern=1e5)
    cfg = _cfg(sim, tmp_path / "r.zarr", epochs=8,
               model={"slice_spacings_m": [2e-7], "loss": "poisson"},
               object={"representation": "real_imag"}, refine={"probe": {"start_epoch": 2}})
    result = run(cfg)
    assert result.loss[-1] < 0.1 * result.loss[0]
    db = _cfg(sim, tmp_path / "db.zarr", epochs=3, model={"slice_spacings_m": [2e-7]},
              object={"representation": "delta_beta"})
    r2 = run(db)
    assert r2.loss[-1] < r2.loss[0]
    assert r2.open().attrs["representation"] == "delta_beta"


def test_plan_covers_every_tile_once_in_compact_groups():
    """Raster rows exactly one detector apart (an even number of half-tile bands): every tile
    lands in exactly one group, and no group's box exceeds 2 detector areas per tile."""
    from adorym_dask.graphs.minibatch import MAX_BOX_AREA_PER_TILE, plan_tile_groups

    yy, xx = np.meshgrid(np.arange(0, 640, 64.0), np.arange(0, 1000, 50.0), indexing="ij")
    pos = np.stack([yy, xx], -1).reshape(1, -1, 2)
    groups = plan_tile_groups(pos, (64, 64), 8)
    tiles = np.sort(np.concatenate([g.tiles for g in groups]))
    np.testing.assert_array_equal(tiles, np.arange(pos.shape[1]))
    for g in groups:
        assert len(g.tiles) <= 8
        assert g.box[2] * g.box[3] <= MAX_BOX_AREA_PER_TILE * 64 * 64 * len(g.tiles)
