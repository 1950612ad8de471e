"""Optimizers for the object and every parameter: Nesterov momentum against torch, gd and
momentum on the object with their default steps, and shrink-wrap of the support."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adorym_dask.config import config_from_dict
from adorym_dask.engine import run
from adorym_dask.metrics import illumination_mask
from adorym_dask.optimizers import OptimizerSpec, ParameterState, nesterov_step, parameter_step
from adorym_dask.simulate import simulate_ptychography
from adorym_dask.storage.support import read_support


def test_nesterov_matches_torch_sgd():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 3)).astype(np.float32)
    spec = OptimizerSpec("momentum", 0.05, momentum=0.9)
    xt = torch.tensor(x0, requires_grad=True)
    opt = torch.optim.SGD([xt], lr=0.05, momentum=0.9, nesterov=True)
    x, m = x0, np.zeros_like(x0)
    for _ in range(6):
        g = rng.standard_normal((4, 3)).astype(np.float32)
        x, m = nesterov_step(x, g, m, spec)
        opt.zero_grad()
        xt.grad = torch.from_numpy(g)
        opt.step()
    np.testing.assert_allclose(x, xt.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_gd_step_of_a_small_parameter_is_bounded_by_step_size():
    """gd on a small parameter: no element moves more than step_size, and steps shrink with
    the gradient."""
    ps = ParameterState.start(np.zeros(3), OptimizerSpec("gd", 0.5))
    spec = OptimizerSpec("gd", 0.5)
    ps = parameter_step(ps, np.array([2.0, -1.0, 0.0]), spec)
    np.testing.assert_allclose(ps.value, [-0.5, 0.25, 0.0])
    ps = parameter_step(ps, np.array([0.2, 0.0, 0.0]), spec)  # gmax stays 2: a small step
    np.testing.assert_allclose(ps.value, [-0.55, 0.25, 0.0])


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_ptychography(tmp_path_factory.mktemp("opt") / "s.h5", object_shape=(96, 96),
                                 probe_shape=(32, 32), n_positions=60, seed=1)


@pytest.mark.parametrize("name", ["gd", "momentum", "pie"])
def test_object_gd_and_momentum_converge_with_default_steps(sim, tmp_path, name):
    """Their default step is a fraction of 1/L, L the data term's curvature under the probe
    (pie: of the Newton step with each pixel's own curvature): the loss falls steadily by 10x
    in 10 epochs (noise-free data, true probe)."""
    result = run(config_from_dict({
        "data": {"path": str(sim.path)},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "refine": {"probe": None},
        "optimizer": {"name": name},
        "object": {"shape_px": [96, 96], "chunks_px": [48, 48]},
        "epochs": 10, "output": str(tmp_path / "r.zarr"),
        "cluster": {"scheduler": "sync"}, "progress": False,
    }))
    loss = np.asarray(result.loss)
    assert loss[-1] < 0.2 * loss[0], loss
    assert np.all(np.diff(loss) < 0), loss


def test_shrinkwrap_tightens_the_support(tmp_path):
    """A compact object in a vacuum field, started with a support over everything: after
    shrink-wrap the support covers the object and less than half of the lit vacuum (measured:
    all of the disk, 29 % of the lit vacuum after 8 epochs; the rest is the noise Adam leaves
    in weakly lit places, which the blur and the threshold keep)."""
    yy, xx = np.mgrid[:96, :96]
    inside = np.hypot(yy - 48, xx - 48) < 22
    obj = np.where(inside, 0.8 * np.exp(0.6j), 1.0).astype(np.complex64)
    sim = simulate_ptychography(tmp_path / "s.h5", obj=obj, probe_shape=(32, 32), n_positions=80,
                                seed=2)
    result = run(config_from_dict({
        "data": {"path": str(sim.path)},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "refine": {"probe": None},
        "object": {"shape_px": [96, 96], "chunks_px": [48, 48],
                   "shrinkwrap": {"start_epoch": 3, "every_epochs": 2, "sigma_px": 1.5,
                                  "threshold": 0.35}},
        "epochs": 8, "output": str(tmp_path / "r.zarr"),
        "cluster": {"scheduler": "sync"}, "progress": False,
    }))
    support = read_support(str(result.output), (0, 0, 96, 96))[..., 0]
    lit = illumination_mask(sim.probe, sim.positions_px, (96, 96))
    assert support[inside].mean() > 0.97
    assert support[~inside & lit].mean() < 0.5
    recon = result.object()[..., 0, 0] + 1j * result.object()[..., 0, 1]
    assert np.all(recon[~support] == 1.0)


def test_a_step_size_without_a_name_keeps_adam(sim, tmp_path, caplog):
    """Ptychography defaults to pie, but a run file that gives optimizer.step_size without a
    name was written for Adam (every model's default before): taking 0.01 as a fraction of a
    Newton step would make it 100x slower without a word."""
    import itertools

    from adorym_dask.engine import Reconstruction

    count = itertools.count()

    def spec(**opt):
        return Reconstruction(config_from_dict({
            "data": {"path": str(sim.path)},
            "probe": {"init": "file", "path": str(sim.probe_path)},
            "optimizer": opt, "output": str(tmp_path / f"r{next(count)}.zarr"),
            "cluster": {"scheduler": "sync"}, "progress": False,
        })).spec

    assert spec().name == "pie" and spec().step_size == 1.0
    with caplog.at_level("WARNING", logger="adorym_dask.layout"):
        s = spec(step_size=0.02)
    assert (s.name, s.step_size) == ("adam", 0.02)
    assert "without optimizer.name: using adam" in caplog.text
    assert spec(name="pie", step_size=0.5).name == "pie"
