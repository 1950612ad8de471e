"""A plug-in model is configured like a built-in one: its registration brings the class of its
``model:`` keys, and its declared parameters are refined through the same ``refine:`` section."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from pydantic import Field

from adorym_dask import registry
from adorym_dask.config import ConfigError, PtychographyConfig, config_from_dict
from adorym_dask.engine import run
from adorym_dask.models.base import ParameterSpec
from adorym_dask.models.ptychography import FarFieldPtychography, build_ptychography
from adorym_dask.simulate import simulate_ptychography


class ScaledConfig(PtychographyConfig):
    """``model:`` keys of the plug-in: ptychography's plus a detector background."""

    gain: float = Field(0.0, ge=0, description="start value of the background, photons/pixel")


@dataclass(frozen=True)
class ScaledPtychography(FarFieldPtychography):
    """Ptychography with a uniform detector background (photons per pixel), refinable."""

    gain: float = 0.0

    def parameter_specs(self):
        specs = super().parameter_specs()
        specs["gain"] = ParameterSpec("gain", "gain", (), "global", "float64", unit="photons",
                                      default_step=0.5, default_optimizer="gd")
        return specs

    def initial_parameters(self, cfg, meas):
        return {**super().initial_parameters(cfg, meas), "gain": np.asarray(self.gain)}

    def predict(self, obj_box, params, batch):
        return super().predict(obj_box, params, batch) + params["gain"]


def _build(cfg, meas):
    base = build_ptychography(cfg, meas)
    return ScaledPtychography(**{f: getattr(base, f) for f in base.__dataclass_fields__},
                              gain=cfg.model.gain)


class _EntryPoint:
    name = "scaled"

    def load(self):
        return registry.ModelRegistration(_build, ScaledConfig)


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setattr(registry, "_plugins", lambda: {"scaled": _EntryPoint()})


def test_plugin_keys_are_validated_like_builtin_ones(plugin, tmp_path):
    tree = {"data": {"path": "x.h5"}, "model": {"kind": "scaled", "gain": 2.5, "probe_modes": 2}}
    cfg = config_from_dict(tree)
    assert isinstance(cfg.model, ScaledConfig) and cfg.model.gain == 2.5
    assert cfg.model.probe_modes == 2
    assert cfg.model_dump(mode="json")["model"]["gain"] == 2.5
    with pytest.raises(ConfigError, match=r"model\.gian: unknown key"):
        config_from_dict({**tree, "model": {"kind": "scaled", "gian": 2}})
    with pytest.raises(ConfigError, match=r"model\.gain"):
        config_from_dict({**tree, "model": {"kind": "scaled", "gain": -1}})
    with pytest.raises(ConfigError, match=r"model\.gain: unknown key"):
        config_from_dict({**tree, "model": {"kind": "ptychography", "gain": 2}})


def test_plugin_parameter_is_refined(plugin, tmp_path):
    """Data recorded over a background of 20 photons per pixel; the plug-in starts at 15 and
    refines it (the "gain" key holds the background in this toy plug-in)."""
    sim = simulate_ptychography(tmp_path / "s.h5", object_shape=(64, 64), probe_shape=(32, 32),
                                n_positions=24, seed=0)
    import h5py

    with h5py.File(sim.path, "r+") as f:
        f["intensities"][...] = f["intensities"][...] + 20.0
    tree = {
        "data": {"path": str(sim.path)},
        "model": {"kind": "scaled", "gain": 15.0},
        "probe": {"init": "file", "path": str(sim.probe_path)},
        "refine": {"probe": None, "gain": {"start_epoch": 4, "step_size": 1.0}},
        "object": {"shape_px": [64, 64], "chunks_px": [32, 32]},
        "epochs": 12, "output": str(tmp_path / "r.zarr"),
        "cluster": {"scheduler": "sync"}, "progress": False,
    }
    result = run(config_from_dict(tree))
    ds = result.open()
    assert float(ds["gain_initial"]) == 15.0
    assert abs(float(ds["gain"]) - 20.0) < 2.0  # measured 18.8 after 8 refined epochs
    with pytest.raises(ConfigError, match=r"refine\.gian.*has no refinable parameter"):
        run(config_from_dict({**tree, "refine": {"gian": {}},
                              "output": str(tmp_path / "s.zarr")}))
