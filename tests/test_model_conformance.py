"""Conformance tests that every registered forward model must pass.

:class:`ModelConformance` checks the :class:`~adorym_dask.models.base.ForwardModel` contract
generically: shapes and dtypes of :meth:`predict` and :meth:`loss`, determinism, autograd
against central finite differences in float64 for the object box and for *every* declared
parameter, the optional :meth:`curvature`, the parameter declarations, the box-origin
convention and the start values. A model takes part by subclassing it (``Test...``), setting
``kind`` and implementing :meth:`ModelConformance.make_case`; :data:`CONFORMANCE` maps every
registered kind to its subclasses, and :func:`test_every_registered_model_has_a_conformance_case`
fails for a registered kind without one.
"""

from __future__ import annotations

import math
import pickle
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor

from adorym_dask import registry
from adorym_dask.config import RunConfig
from adorym_dask.models.base import Batch, ForwardModel, ParameterSpec
from adorym_dask.optimizers import STATE_NAMES
from adorym_dask.storage.measurements import Measurements, open_measurements, write_measurements

SCOPES = ("global", "tile", "angle")
OBJECT = "object"  # the name the object box goes by in the finite-difference checks
# Variables the run store writes besides the parameters (a parameter's output must not clash).
RESERVED_OUTPUTS = {"object", "loss", "probe_mode_power"}


# ================================================================================== the case
@dataclass
class ConformanceCase:
    """A small, random but physically reasonable input of one forward model.

    Attributes
    ----------
    model : ForwardModel
        The model, able to compute in float64 when given float64 inputs.
    obj_box : Tensor
        ``[h, w, n_z, 2]`` float64 object box (random, not uniform).
    params : dict of Tensor
        Every declared parameter, exactly as :meth:`ForwardModel.predict` receives it (global
        values whole, per-tile rows ``[G, ...]``, the angle's row), float64 or complex128.
    batch : Batch
        Where the group sits (``origin`` need not be 0; positions are absolute).
    meas : Tensor
        ``[G, det_y, det_x]`` float64 measured intensities; they differ from the prediction,
        so that the gradients do not vanish.
    fd_steps : dict of float
        Finite-difference step by parameter name (``"object"`` for the box), in the value's
        unit; a parameter not listed gets ``1e-6 max |value|``.
    cfg : RunConfig, optional
        A run configuration that builds ``model`` through the registry.
    measurements : Measurements, optional
        The measurements ``model`` was built from (for :meth:`initial_parameters`).
    """

    model: ForwardModel
    obj_box: Tensor
    params: dict[str, Tensor]
    batch: Batch
    meas: Tensor
    fd_steps: dict[str, float] = field(default_factory=dict)
    cfg: RunConfig | None = None
    measurements: Measurements | None = None

    @property
    def n_group(self) -> int:
        """Number of tiles ``G`` in the group."""
        return len(self.batch.tiles)

    @property
    def det_shape(self) -> tuple[int, int]:
        """Detector shape ``(det_y, det_x)``, from the measured intensities."""
        return tuple(self.meas.shape[1:])


def _inputs(case: ConformanceCase, *, grad: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Fresh leaf copies of the case's object box and parameters.

    Parameters
    ----------
    case : ConformanceCase
        The case.
    grad : bool
        Whether the copies require gradients.

    Returns
    -------
    (Tensor, dict of Tensor)
        The box and the parameters, never sharing memory with ``case``.
    """
    box = case.obj_box.detach().clone().requires_grad_(grad)
    params = {k: v.detach().clone().requires_grad_(grad) for k, v in case.params.items()}
    return box, params


def _total_loss(case: ConformanceCase, box: Tensor, params: dict[str, Tensor]) -> Tensor:
    """``loss(predict(box, params), meas).sum()`` for the case's batch and data."""
    pred = case.model.predict(box, params, case.batch)
    return case.model.loss(pred, case.meas.to(pred.dtype)).sum()


def _real_view(t: Tensor) -> Tensor:
    """``t`` itself, or ``[..., 2]`` (real, imag) of a complex ``t`` (sharing memory)."""
    return torch.view_as_real(t) if t.is_complex() else t


def _group_rows(case: ConformanceCase, rows: np.ndarray) -> tuple[dict[str, Tensor], Batch]:
    """The parameters and batch of a sub-group made of the case's group rows ``rows``."""
    specs = case.model.parameter_specs()
    idx = torch.as_tensor(rows)
    params = {
        name: (value[idx] if specs[name].scope == "tile" else value).detach().clone()
        for name, value in case.params.items()
    }
    batch = Batch(origin=case.batch.origin, angle=case.batch.angle, tiles=case.batch.tiles[rows])
    return params, batch


def _seed(*parts: str) -> int:
    """A seed that depends only on ``parts`` (stable across runs, unlike ``hash``)."""
    return zlib.crc32("/".join(parts).encode())


# ============================================================================ the base class
class ModelConformance:
    """The forward-model contract, checked for every subclass's case.

    Not collected by itself (no ``Test`` prefix). A subclass sets :attr:`kind` and implements
    :meth:`make_case`; every ``test_*`` method then runs against its case.

    Attributes
    ----------
    kind : str
        The registered model kind the subclass covers.
    fd_rtol : float
        Relative tolerance of autograd against central finite differences.
    fd_entries : int
        Entries checked per parameter: this many uniformly random ones plus this many among
        those with a large gradient (all entries of a parameter with at most twice as many).
    curvature_factor : float
        How far (as a factor, either way) a curvature estimate may be from the loss's second
        difference at a perfect fit.
    global_curvature_entries : int
        Entries of a global parameter's curvature checked against the second difference (the
        best-lit ones: the probe has tens of thousands).
    """

    kind: str = ""
    fd_rtol: float = 2e-5
    fd_entries: int = 4
    curvature_factor: float = 10.0
    global_curvature_entries: int = 6

    def make_case(self, tmp_path_factory: pytest.TempPathFactory) -> ConformanceCase:
        """Build the case (implemented by every subclass).

        Parameters
        ----------
        tmp_path_factory : pytest.TempPathFactory
            For files the case needs (measurements).

        Returns
        -------
        ConformanceCase
        """
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def case(cls, tmp_path_factory: pytest.TempPathFactory) -> ConformanceCase:
        """The subclass's case, built once per class (tests must not modify it)."""
        return cls().make_case(tmp_path_factory)

    # -- 1. shapes and dtypes -------------------------------------------------------------
    def test_predict_and_loss_shapes(self, case: ConformanceCase) -> None:
        """``predict`` gives real, finite, non-negative float64 ``[G, det_y, det_x]`` for
        float64 inputs; ``loss`` gives finite, non-negative ``[G]``, ~0 at a perfect fit."""
        assert isinstance(case.model, ForwardModel)
        box, params = _inputs(case)
        with torch.no_grad():
            pred = case.model.predict(box, params, case.batch)
            assert tuple(pred.shape) == (case.n_group, *case.det_shape)
            assert not pred.is_complex()
            assert pred.dtype == torch.float64, "float64 inputs must give a float64 prediction"
            assert bool(torch.isfinite(pred).all())
            assert float(pred.min()) >= 0.0
            loss = case.model.loss(pred, case.meas)
            perfect = case.model.loss(pred, pred)
        assert tuple(loss.shape) == (case.n_group,)
        assert not loss.is_complex() and loss.dtype.is_floating_point
        assert bool(torch.isfinite(loss).all())
        assert bool((loss > 0).all()), "the case's data must not fit the prediction exactly"
        tiny = 1e-6 * float(loss.min())
        assert float(perfect.abs().max()) <= tiny, f"loss(pred, pred) = {perfect.tolist()}"

    # -- 2. determinism ---------------------------------------------------------------------
    def test_deterministic_and_pure(self, case: ConformanceCase) -> None:
        """Two predictions, losses and backward passes are bit-identical; inputs stay as they
        were; a pickled copy of the model (as shipped to Dask workers) predicts the same."""
        runs = []
        for model in (case.model, case.model, pickle.loads(pickle.dumps(case.model))):
            box, params = _inputs(case, grad=True)
            pred = model.predict(box, params, case.batch)
            loss = model.loss(pred, case.meas)
            loss.sum().backward()
            grads = {k: v.grad for k, v in params.items()}
            runs.append((pred.detach(), loss.detach(), box.grad, grads))
            assert torch.equal(box.detach(), case.obj_box), "predict modified the object box"
            for name, value in params.items():
                assert torch.equal(value.detach(), case.params[name]), f"predict modified {name}"
        first = runs[0]
        for other in runs[1:]:
            assert torch.equal(first[0], other[0]), "predict is not deterministic"
            assert torch.equal(first[1], other[1]), "loss is not deterministic"
            assert torch.equal(first[2], other[2]), "object gradient is not deterministic"
            for name, g in first[3].items():
                h = other[3][name]
                assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), name

    def test_tiles_are_independent(self, case: ConformanceCase) -> None:
        """Each row of ``predict``/``loss`` depends only on its own tile: predicting a
        sub-group (the rows reversed, and each tile alone) gives the same rows."""
        box, params = _inputs(case)
        with torch.no_grad():
            full = case.model.predict(box, params, case.batch)
            full_loss = case.model.loss(full, case.meas)
            orders = [np.arange(case.n_group)[::-1].copy()]
            orders += [np.array([i]) for i in range(case.n_group)]
            for rows in orders:
                sub_params, sub_batch = _group_rows(case, rows)
                pred = case.model.predict(box, sub_params, sub_batch)
                atol = 1e-12 * float(full.max())
                torch.testing.assert_close(pred, full[rows], rtol=1e-10, atol=atol)
                loss = case.model.loss(pred, case.meas[rows])
                torch.testing.assert_close(loss, full_loss[rows], rtol=1e-10, atol=0.0)

    def test_positions_are_absolute(self, case: ConformanceCase) -> None:
        """With a ``positions`` parameter: padding the box before its corner and moving
        ``batch.origin`` back by as much leaves the prediction unchanged."""
        if "positions" not in case.model.parameter_specs():
            pytest.skip("the model has no positions")
        pad = (3, 5)
        box, params = _inputs(case)
        h, w = box.shape[:2]
        gen = torch.Generator().manual_seed(1)
        big = torch.rand((h + pad[0], w + pad[1], *box.shape[2:]), generator=gen, dtype=box.dtype)
        big[pad[0]:, pad[1]:] = box
        y0, x0 = case.batch.origin
        moved = Batch((y0 - pad[0], x0 - pad[1]), case.batch.angle, case.batch.tiles)
        with torch.no_grad():
            ref = case.model.predict(box, params, case.batch)
            got = case.model.predict(big, params, moved)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(ref.max()))

    # -- 3. gradients -----------------------------------------------------------------------
    def _fd_step(self, case: ConformanceCase, name: str, value: Tensor) -> float:
        """The finite-difference step of ``name``: the case's, or ``1e-6 max |value|``."""
        if name in case.fd_steps:
            return float(case.fd_steps[name])
        scale = float(_real_view(value).abs().max())
        return 1e-6 * (scale if scale > 0 else 1.0)

    def _pick_entries(self, name: str, grad: np.ndarray) -> np.ndarray:
        """Flat indices (of the real view) to check: random ones and large-gradient ones."""
        n = grad.size
        if n <= 2 * self.fd_entries:
            return np.arange(n)
        rng = np.random.default_rng(_seed(type(self).__name__, name))
        uniform = rng.choice(n, self.fd_entries, replace=False)
        large = np.flatnonzero(np.abs(grad) >= 0.1 * np.abs(grad).max())
        strong = rng.choice(large, min(self.fd_entries, large.size), replace=False)
        return np.unique(np.concatenate([uniform, strong]))

    def test_gradients_match_finite_differences(self, case: ConformanceCase) -> None:
        """Autograd's ``d loss.sum() / d entry`` equals ``(L(x+h) - L(x-h)) / 2h`` in float64
        for entries of the object box and of every declared parameter (real and imaginary
        parts of complex ones separately)."""
        specs = case.model.parameter_specs()
        assert set(case.params) == set(specs), "the case must give every declared parameter"
        box, params = _inputs(case, grad=True)
        _total_loss(case, box, params).backward()
        leaves = {OBJECT: box, **{name: params[name] for name in specs if specs[name].refinable}}

        failures, checked = [], []
        for name, leaf in leaves.items():
            assert leaf.grad is not None, f"no gradient reaches {name!r}"
            grad = _real_view(leaf.grad).detach().numpy().ravel()
            scale = float(np.abs(grad).max())
            assert scale > 0, f"the gradient of {name!r} vanishes at the case's inputs"
            h = self._fd_step(case, name, leaf.detach())
            for flat in self._pick_entries(name, grad):
                losses = []
                for sign in (1.0, -1.0):
                    b, p = _inputs(case)
                    target = b if name == OBJECT else p[name]
                    _real_view(target).view(-1)[flat] += sign * h
                    with torch.no_grad():
                        losses.append(float(_total_loss(case, b, p)))
                fd = (losses[0] - losses[1]) / (2.0 * h)
                ad = float(grad[flat])
                tol = self.fd_rtol * max(abs(ad), abs(fd)) + 1e-3 * self.fd_rtol * scale
                checked.append(name)
                if not abs(ad - fd) <= tol:
                    failures.append(
                        f"{name}[{np.unravel_index(flat, _real_view(leaf).shape)}]: "
                        f"autograd {ad:.10g}, finite differences {fd:.10g} (h={h:.3g}, "
                        f"rel err {abs(ad - fd) / max(abs(ad), abs(fd), 1e-300):.2e})"
                    )
        assert set(checked) == set(leaves)
        assert not failures, "gradient mismatches:\n" + "\n".join(failures)

    def test_native_dtypes(self, case: ConformanceCase) -> None:
        """With the engine's dtypes (float32 box, parameters in their declared dtype) the
        prediction is finite and close to float64's, and every gradient has its leaf's dtype
        and shape and is finite."""
        specs = case.model.parameter_specs()
        box = case.obj_box.detach().to(torch.float32).requires_grad_(True)
        params = {
            name: torch.from_numpy(np.asarray(v.numpy(), specs[name].dtype)).requires_grad_(True)
            for name, v in case.params.items()
        }
        pred = case.model.predict(box, params, case.batch)
        assert tuple(pred.shape) == (case.n_group, *case.det_shape)
        assert not pred.is_complex() and pred.dtype.is_floating_point
        with torch.no_grad():
            ref = case.model.predict(*_inputs(case), case.batch)
        atol = 1e-4 * float(ref.max())
        torch.testing.assert_close(pred.detach().double(), ref, rtol=1e-3, atol=atol)
        case.model.loss(pred, case.meas.to(pred.dtype)).sum().backward()
        assert box.grad is not None and box.grad.dtype == torch.float32
        assert bool(torch.isfinite(box.grad).all())
        for name, leaf in params.items():
            if not specs[name].refinable:
                continue
            assert leaf.grad is not None, f"no gradient reaches {name!r}"
            assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
            assert bool(torch.isfinite(_real_view(leaf.grad)).all()), name

    # -- 4. curvature -----------------------------------------------------------------------
    def test_curvature(self, case: ConformanceCase) -> None:
        """If the model estimates curvatures: one per declared parameter, finite,
        non-negative, real, in float64 and with the engine's dtypes; for a per-tile or
        per-angle parameter in the shape of its rows (the gradient's), for a global one in a
        shape that broadcasts against its real view (the probe's is ``[py, px]``, the same for
        every mode, shared by a complex entry's real and imaginary parts); and, at a perfect fit, within a
        factor of :attr:`curvature_factor` of the central second difference of ``loss.sum()``
        in each entry (the estimate has the gradient's scale: not per pixel, not summed twice;
        for a global parameter the :attr:`global_curvature_entries` best-lit entries)."""
        if not hasattr(case.model, "curvature"):
            pytest.skip("the model estimates no curvature")
        specs = case.model.parameter_specs()
        box, params = _inputs(case)
        native_params = {
            name: torch.from_numpy(np.asarray(v.numpy(), specs[name].dtype))
            for name, v in params.items()
        }
        for b, p in ((box, params), (box.to(torch.float32), native_params)):
            with torch.no_grad():
                est = case.model.curvature(b, p, case.batch)
            assert isinstance(est, dict) and est, "curvature() returned nothing"
            for name, c in est.items():
                assert name in specs, f"curvature of undeclared parameter {name!r}"
                assert not c.is_complex() and c.dtype.is_floating_point, name
                value = _real_view(p[name])
                if specs[name].scope == "global":
                    shape = torch.broadcast_shapes(c.shape, p[name].shape)
                    assert tuple(shape) == tuple(p[name].shape), (name, c.shape, p[name].shape)
                else:
                    assert tuple(c.shape) == tuple(value.shape), (name, c.shape, value.shape)
                assert bool(torch.isfinite(c).all()), name
                assert float(c.min()) >= 0.0, f"negative curvature of {name}: {c}"

        # order of magnitude: at a perfect fit the Hessian is the Gauss-Newton curvature
        with torch.no_grad():
            est = case.model.curvature(box, params, case.batch)
            fit = case.model.predict(box, params, case.batch)

            def loss_at(p: dict[str, Tensor]) -> float:
                return float(case.model.loss(case.model.predict(box, p, case.batch), fit).sum())

            centre = loss_at(params)
            bad = []
            for name, c in est.items():
                h = 10.0 * self._fd_step(case, name, params[name])
                entries = range(c.numel())
                if specs[name].scope == "global":
                    c = c.expand(params[name].shape)
                    if params[name].is_complex():  # real and imaginary parts share it
                        c = c.unsqueeze(-1).expand(*c.shape, 2)
                    entries = torch.argsort(c.reshape(-1), descending=True)
                    entries = entries[: self.global_curvature_entries].tolist()
                for flat in entries:
                    sides = []
                    for sign in (1.0, -1.0):
                        p = {k: v.clone() for k, v in params.items()}
                        _real_view(p[name]).view(-1)[flat] += sign * h
                        sides.append(loss_at(p))
                    second = (sides[0] - 2.0 * centre + sides[1]) / h**2
                    ratio = float(c.reshape(-1)[flat]) / second
                    if not 1.0 / self.curvature_factor <= ratio <= self.curvature_factor:
                        bad.append(f"{name}[{flat}]: estimate {float(c.reshape(-1)[flat]):.4g}, "
                                   f"second difference {second:.4g}")
        assert not bad, "curvature estimates off by more than the factor:\n" + "\n".join(bad)

    # -- 5. declarations ----------------------------------------------------------------------
    def test_parameter_specs_well_formed(self, case: ConformanceCase) -> None:
        """Every spec is keyed by its name, has a known scope and optimizer, a NumPy dtype
        that matches the case's value (complex or real), dims whose length matches the
        value's rank (less the ``[n_angles, n_tiles]`` or ``[n_angles]`` axes that a group's
        rows drop), and unique output names."""
        specs = case.model.parameter_specs()
        assert isinstance(specs, dict) and specs
        outputs = [s.output for s in specs.values()]
        assert len(set(outputs)) == len(outputs), f"outputs not unique: {outputs}"
        for key, spec in specs.items():
            where = f"spec {key!r}"
            assert isinstance(spec, ParameterSpec), where
            assert spec.name == key, f"{where}: name {spec.name!r}"
            assert spec.scope in SCOPES, f"{where}: scope {spec.scope!r}"
            assert spec.output.isidentifier() and spec.output not in RESERVED_OUTPUTS, where
            assert not spec.output.endswith("_initial"), where
            dt = np.dtype(spec.dtype)
            assert dt.kind in "fc", f"{where}: dtype {spec.dtype!r}"
            assert isinstance(spec.dims, tuple), where
            assert all(isinstance(d, str) for d in spec.dims), where
            assert len(set(spec.dims)) == len(spec.dims) and "channel" not in spec.dims, where
            assert spec.default_optimizer in STATE_NAMES, f"{where}: {spec.default_optimizer!r}"
            assert math.isfinite(spec.default_step) and spec.default_step > 0, where
            assert isinstance(spec.default_start_epoch, int), where
            assert spec.default_start_epoch >= 0, where
            assert isinstance(spec.unit, str) and spec.unit, where
            for opt, default in spec.options.items():
                assert isinstance(opt, str) and opt.isidentifier(), f"{where}: option {opt!r}"
                assert isinstance(default, (int, float)) and math.isfinite(default) and default >= 0

            value = case.params[key]
            assert value.is_complex() == spec.is_complex, f"{where}: complex {spec.is_complex}"
            if spec.scope == "global":
                assert value.ndim == len(spec.dims), f"{where}: {spec.dims} vs {tuple(value.shape)}"
                assert not {"angle", "tile"} & set(spec.dims), where
            elif spec.scope == "tile":
                assert spec.dims[:2] == ("angle", "tile"), f"{where}: dims {spec.dims}"
                assert value.ndim == len(spec.dims) - 1, f"{where}: rows {tuple(value.shape)}"
                assert value.shape[0] == case.n_group, where
            else:
                assert spec.dims[:1] == ("angle",), f"{where}: dims {spec.dims}"
                assert value.ndim == len(spec.dims) - 1, f"{where}: row {tuple(value.shape)}"

    def test_builds_from_registry(self, case: ConformanceCase) -> None:
        """The case's config names this class's kind, and the registry's builder makes a model
        of the case's type that predicts the same."""
        if case.cfg is None:
            pytest.skip("the case gives no config")
        assert self.kind in registry.model_names()
        assert case.cfg.model.kind == self.kind
        assert isinstance(case.cfg.model, registry.model_config_class(self.kind))
        built = registry.model_builder(self.kind)(case.cfg, case.measurements)
        assert type(built) is type(case.model)
        with torch.no_grad():
            ref = case.model.predict(*_inputs(case), case.batch)
            got = built.predict(*_inputs(case), case.batch)
        assert torch.equal(got, ref)

    def test_initial_parameters(self, case: ConformanceCase) -> None:
        """``initial_parameters`` gives every declared parameter as a finite array of its
        declared dtype: ``tile`` values ``[n_angles, n_tiles, ...]``, ``angle`` values
        ``[n_angles, ...]``, trailing axes as in the rows ``predict`` takes."""
        if case.cfg is None or case.measurements is None:
            pytest.skip("the case gives no config and measurements")
        meas = case.measurements
        specs = case.model.parameter_specs()
        values = case.model.initial_parameters(case.cfg, meas)
        assert set(values) == set(specs)
        for name, value in values.items():
            spec, rows = specs[name], tuple(case.params[name].shape)
            assert isinstance(value, np.ndarray), name
            assert value.dtype == np.dtype(spec.dtype), f"{name}: {value.dtype} != {spec.dtype}"
            assert value.ndim == len(spec.dims), name
            assert np.isfinite(value).all(), name
            if spec.scope == "global":
                assert value.shape == rows, f"{name}: {value.shape} vs {rows}"
            elif spec.scope == "tile":
                assert value.shape[:2] == (meas.n_angles, meas.n_tiles), name
                assert value.shape[2:] == rows[1:], name
            else:
                assert value.shape[0] == meas.n_angles and value.shape[1:] == rows, name


# ============================================================================ ptychography
def _ptychography_case(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    seed: int,
    representation: str,
    loss: str,
    n_modes: int,
    spacings: tuple[float, ...],
    masked: bool,
) -> ConformanceCase:
    """A far-field ptychography case built through the registry.

    A 16x16 detector, ``len(spacings) + 1`` slices, 3 tiles of angle 1 at sub-pixel positions
    (fractional parts in [0.1, 0.9]) inside a 28x28 box whose corner is object pixel (10, 20),
    a Gaussian probe with a curved phase (and weaker extra modes) of ~2000 photons, and
    measured intensities predicted at perturbed object, probe and positions.
    """
    rng = np.random.default_rng(seed)
    det, box_shape, origin = (16, 16), (28, 28), (10, 20)
    n_angles, n_tiles, angle = 2, 8, 1
    tiles = np.array([5, 1, 6])
    n_slices = len(spacings) + 1
    energy_ev, pixel_m = 12398.4, 1e-8  # ~1 Angstrom, 10 nm pixels

    # measurements: positions absolute; the file's intensities only feed the probe guess
    span = box_shape[0] - det[0] - 1
    positions = rng.uniform(0, span, (n_angles, n_tiles, 2)) + np.asarray(origin, float)
    rel = rng.integers(0, span, (len(tiles), 2)) + rng.uniform(0.1, 0.9, (len(tiles), 2))
    positions[angle, tiles] = rel + np.asarray(origin, float)
    mask = None
    if masked:
        mask = np.ones(det, bool)
        mask[0, :4] = False
        mask[11, 3] = False
    path = tmp_path_factory.mktemp(f"conformance-{seed}") / "scan.h5"
    write_measurements(
        path, intensities=rng.poisson(8.0, (n_angles, n_tiles, *det)).astype(np.float32),
        positions_px=positions, energy_ev=energy_ev, pixel_size_m=pixel_m, mask=mask,
    )
    measurements = open_measurements(path)
    model_cfg = {"kind": "ptychography", "loss": loss, "probe_modes": n_modes, "slices": n_slices}
    if spacings:
        model_cfg["slice_spacings_m"] = list(spacings)
    cfg = RunConfig(
        data={"path": str(path)}, model=model_cfg, object={"representation": representation},
    )
    model = registry.model_builder("ptychography")(cfg, measurements)

    # object box [h, w, n_z, 2]
    shape = (*box_shape, n_slices)
    if representation == "real_imag":
        t = rng.uniform(0.6, 1.0, shape) * np.exp(1j * rng.uniform(-0.6, 0.6, shape))
        obj = np.stack([t.real, t.imag], axis=-1)
    else:
        kl = 2 * math.pi / model.wavelength_m * model.slice_thickness_m
        delta, beta = rng.uniform(0.02, 0.3, shape), rng.uniform(0.002, 0.03, shape)
        obj = np.stack([delta / kl, beta / kl], axis=-1)

    # probe [M, py, px]: Gaussian, curved phase, weaker random extra modes
    yy, xx = np.mgrid[: det[0], : det[1]] - (np.asarray(det)[:, None, None] - 1) / 2
    env = np.exp(-(yy**2 + xx**2) / (2 * 3.5**2))
    modes = [env * np.exp(1j * (0.08 * (yy**2 + xx**2) + rng.uniform(-0.3, 0.3, det)))]
    for _ in range(n_modes - 1):
        noise = rng.normal(size=det) + 1j * rng.normal(size=det)
        modes.append(0.4 * env * noise)
    probe = np.stack(modes)
    probe *= np.sqrt(2000.0 / (np.abs(probe) ** 2).sum())

    params = {
        "probe": torch.from_numpy(probe.astype(np.complex128)),
        "positions": torch.from_numpy(positions[angle, tiles].copy()),
    }
    if spacings:
        params["slice_spacings"] = torch.tensor(spacings, dtype=torch.float64)
    assert set(params) == set(model.parameter_specs())
    box = torch.from_numpy(obj)
    batch = Batch(origin=origin, angle=angle, tiles=tiles)

    # data: the prediction at perturbed inputs (never crossing a box edge)
    true_params = dict(params)
    true_params["probe"] = params["probe"] * torch.from_numpy(
        1 + 0.05 * rng.normal(size=probe.shape) + 0.05j * rng.normal(size=probe.shape)
    )
    moves = torch.from_numpy(rng.uniform(-0.05, 0.05, (len(tiles), 2)))
    true_params["positions"] = params["positions"] + moves
    true_box = box * torch.from_numpy(1 + 0.05 * rng.normal(size=obj.shape))
    with torch.no_grad():
        meas = model.predict(true_box, true_params, batch).clamp_min(0.0)

    fd_steps = {"positions": 1e-4}
    if spacings:
        fd_steps["slice_spacings"] = 1e-6 * float(np.mean(spacings))
    return ConformanceCase(
        model=model, obj_box=box, params=params, batch=batch, meas=meas, fd_steps=fd_steps,
        cfg=cfg, measurements=measurements,
    )


class _PtychographyConformance(ModelConformance):
    """Far-field ptychography: the generic contract plus its sub-pixel position convention."""

    kind = "ptychography"
    seed = 0
    representation = "real_imag"
    loss_kind = "lsq"
    n_modes = 2
    spacings: tuple[float, ...] = (1.5e-6,)
    masked = False

    def make_case(self, tmp_path_factory: pytest.TempPathFactory) -> ConformanceCase:
        """The case of this variant (see :func:`_ptychography_case`)."""
        return _ptychography_case(
            tmp_path_factory, seed=self.seed, representation=self.representation,
            loss=self.loss_kind, n_modes=self.n_modes, spacings=self.spacings, masked=self.masked,
        )

    def test_subpixel_shift_continuous_across_integers(self, case: ConformanceCase) -> None:
        """A probe that vanishes near the window's edge gives the same intensities just below
        and just above an integer position (the sub-pixel shift moves the probe the way the
        integer corner does).

        Exact (to 1e-6 of the peak) for one slice. With several slices the window, which
        moves with the integer corner, wraps the propagated wave around periodically, so the
        two sides differ by a window artefact (~1e-3 of the peak here); a wrong shift sign
        would give a 2 px jump, ~4e-2 .. 2e-1 of the peak for these cases.
        """
        tol = 1e-6 if "slice_spacings" not in case.params else 5e-3
        box, params = _inputs(case)
        border = torch.zeros(case.det_shape, dtype=torch.float64)
        border[2:-2, 2:-2] = 1.0
        params["probe"] = params["probe"] * border
        corner = torch.floor(params["positions"][0]) + 1.0
        preds = {}
        for axis in (0, 1):
            for delta in (-1e-7, 1e-7):
                p = dict(params)
                p["positions"] = params["positions"].clone()
                p["positions"][0, axis] = corner[axis] + delta
                with torch.no_grad():
                    preds[axis, delta] = case.model.predict(box, p, case.batch)[0]
            below, above = preds[axis, -1e-7], preds[axis, 1e-7]
            torch.testing.assert_close(below, above, rtol=0.0, atol=tol * float(above.max()))

    def test_masked_pixels_do_not_count(self, case: ConformanceCase) -> None:
        """Changing the data where the detector mask is False changes no tile's loss."""
        if case.model.mask is None:
            pytest.skip("no detector mask")
        off = torch.from_numpy(~case.model.mask)
        changed = case.meas.clone()
        changed[:, off] *= 3.0
        with torch.no_grad():
            pred = case.model.predict(*_inputs(case), case.batch)
            got, ref = case.model.loss(pred, changed), case.model.loss(pred, case.meas)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0.0)


class TestFarFieldPtychographyRealImag(_PtychographyConformance):
    """Transmission object, least squares, 2 modes, 2 slices."""


class TestFarFieldPtychographyDeltaBeta(_PtychographyConformance):
    """Refractive-index object, Poisson loss, detector mask, 2 modes, 3 unequal slices."""

    seed = 1
    representation = "delta_beta"
    loss_kind = "poisson"
    spacings = (1.0e-6, 2.5e-6)
    masked = True


class TestFarFieldPtychographySingleSlice(_PtychographyConformance):
    """Transmission object, Poisson loss, one mode, one slice (no slice spacings declared)."""

    seed = 2
    loss_kind = "poisson"
    n_modes = 1
    spacings = ()


# ============================================================================= holography
def _holography_case(
    tmp_path_factory: pytest.TempPathFactory, *, seed: int, representation: str, loss: str,
    kappa: float | None,
) -> ConformanceCase:
    """Two 11x11 holograms (1 and 2 cm, 17.5 keV, 1 um pixels) cut into 2x2 tiles of 6x6 (the
    last row and column reaching past the hologram, masked), built through the registry; a
    group of 3 tiles of both holograms in a box whose corner is object pixel (10, 20), with
    non-identity alignment maps, and data predicted at perturbed object, distances and maps."""
    rng = np.random.default_rng(seed)
    holo, origin, n_holo = (11, 11), (10, 20), 2
    path = tmp_path_factory.mktemp(f"conformance-holo-{seed}") / "holo.h5"
    write_measurements(
        path, intensities=rng.poisson(50.0, (1, n_holo, *holo)).astype(np.float32),
        positions_px=np.zeros((n_holo, 2)), energy_ev=17500.0, pixel_size_m=1e-6,
        distances_m=np.array([0.01, 0.02]), incident_photons=50.0,
    )
    measurements = open_measurements(path)
    model_cfg = {"kind": "holography", "loss": loss, "tile_px": 8}
    if kappa is not None:
        model_cfg["kappa"] = kappa
    cfg = RunConfig(data={"path": str(path)}, model=model_cfg,
                    object={"representation": representation})
    model = registry.model_builder("holography")(cfg, measurements)
    r = model.reach_px
    tiles = np.array([1, 4, 6])
    corners = model.tiling.corners(tiles)
    positions = corners + r + np.asarray(origin, float)
    box_shape = (holo[0] + 2 * r + 2, holo[1] + 2 * r + 3)
    shape = (*box_shape, 1)
    if representation == "real_imag":
        t = rng.uniform(0.6, 1.0, shape) * np.exp(1j * rng.uniform(-0.6, 0.6, shape))
        obj = np.stack([t.real, t.imag], axis=-1)
    else:
        kl = 2 * math.pi / model.wavelength_m * model.slice_thickness_m
        obj = np.stack([rng.uniform(0.02, 0.3, shape) / kl, rng.uniform(0.002, 0.03, shape) / kl],
                       axis=-1)
    affine = np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (n_holo, 1, 1))
    affine[1] += rng.uniform(-0.02, 0.02, (2, 3)) + np.array([[0, 0, 0.3], [0, 0, -0.2]])
    params = {
        "positions": torch.from_numpy(positions),
        "distances": torch.tensor([0.01, 0.02], dtype=torch.float64),
        "affine": torch.from_numpy(affine),
    }
    if kappa is not None:
        params["kappa"] = torch.tensor(kappa, dtype=torch.float64)
    assert set(params) == set(model.parameter_specs())
    box = torch.from_numpy(obj)
    batch = Batch(origin=origin, angle=0, tiles=tiles)
    truth = dict(params)
    truth["distances"] = params["distances"] * 1.02
    truth["affine"] = params["affine"] + torch.from_numpy(rng.uniform(-0.01, 0.01, (n_holo, 2, 3)))
    with torch.no_grad():
        meas = model.predict(box * torch.from_numpy(1 + 0.05 * rng.normal(size=obj.shape)),
                             truth, batch).clamp_min(0.0)
    return ConformanceCase(model=model, obj_box=box, params=params, batch=batch, meas=meas,
                           fd_steps={"affine": 1e-6, "distances": 1e-7}, cfg=cfg,
                           measurements=measurements)


class _HolographyConformance(ModelConformance):
    """Multi-distance holography: the generic contract on tiled, misaligned holograms."""

    kind = "holography"
    seed = 10
    representation = "real_imag"
    loss_kind = "lsq"
    kappa: float | None = None

    def make_case(self, tmp_path_factory: pytest.TempPathFactory) -> ConformanceCase:
        return _holography_case(tmp_path_factory, seed=self.seed,
                                representation=self.representation, loss=self.loss_kind,
                                kappa=self.kappa)

    def test_initial_parameters(self, case: ConformanceCase) -> None:
        """The model is built from the file's holograms but starts its parameters from the
        engine's tiles (``engine_measurements``): a tile's corner, one distance and one
        identity map per hologram."""
        view = case.model.engine_measurements(case.measurements)
        assert view.n_tiles == 2 * case.model.tiling.per_hologram
        values = case.model.initial_parameters(case.cfg, view)
        assert values["positions"].shape == (1, view.n_tiles, 2)
        np.testing.assert_array_equal(values["distances"], [0.01, 0.02])
        assert values["affine"].shape == (2, 2, 3)
        for name, spec in case.model.parameter_specs().items():
            assert values[name].dtype == np.dtype(spec.dtype), name


class TestHolographyRealImag(_HolographyConformance):
    """Transmission object, least squares."""


class TestHolographyKappaPoisson(_HolographyConformance):
    """Refractive-index object with beta = kappa delta, Poisson loss."""

    seed = 11
    representation = "delta_beta"
    loss_kind = "poisson"
    kappa = 0.05


# ============================================================================== tomography
def _tomography_case(
    tmp_path_factory: pytest.TempPathFactory, *, seed: int, loss: str, distance: float | None,
) -> ConformanceCase:
    """3 projections of 10 x 12 (20 keV, 1 um pixels) of a 10 x 12 x 12 volume, cut into bands
    of 5 rows, built through the registry; a group of both bands of angle 1, the whole volume
    as the box, tilts, offsets and an off-centre axis all away from zero, and data predicted
    at perturbed object, tilts and offsets. With ``distance`` the exit wave is propagated."""
    rng = np.random.default_rng(seed)
    n_y, n_x = 10, 12
    path = tmp_path_factory.mktemp(f"conformance-tomo-{seed}") / "tomo.h5"
    write_measurements(
        path, intensities=rng.uniform(20.0, 50.0, (3, 1, n_y, n_x)).astype(np.float32),
        positions_px=np.zeros((3, 1, 2)), angles_rad=np.array([0.2, 1.1, 2.5]),
        energy_ev=20000.0, pixel_size_m=1e-6, incident_photons=50.0,
        distances_m=None if distance is None else np.array([distance]),
    )
    measurements = open_measurements(path)
    cfg = RunConfig(data={"path": str(path)}, model={"kind": "tomography", "loss": loss,
                                                      "tile_px": 5},
                    object={"representation": "delta_beta"})
    model = registry.model_builder("tomography")(cfg, measurements)
    kdz = 2 * math.pi / model.wavelength_m * 1e-6
    obj = np.stack([rng.uniform(0.0, 0.3, (n_y, n_x, n_x)) / kdz,
                    rng.uniform(0.0, 0.03, (n_y, n_x, n_x)) / kdz], axis=-1)
    params = {
        "positions": torch.tensor([[0.0, 0.0], [5.0, 0.0]], dtype=torch.float64),
        "tilts": torch.tensor([0.01, 0.03, -0.02], dtype=torch.float64),
        "offsets": torch.tensor([0.3, -0.4], dtype=torch.float64),
        "rotation_centre": torch.tensor(5.3, dtype=torch.float64),
    }
    assert set(params) == set(model.parameter_specs())
    box = torch.from_numpy(obj)
    batch = Batch(origin=(0, 0), angle=1, tiles=np.array([0, 1]))
    truth = dict(params, tilts=params["tilts"] + 0.01, offsets=params["offsets"] - 0.2)
    with torch.no_grad():
        meas = model.predict(box * torch.from_numpy(1 + 0.05 * rng.normal(size=obj.shape)),
                             truth, batch)
    return ConformanceCase(model=model, obj_box=box, params=params, batch=batch, meas=meas,
                           fd_steps={"tilts": 1e-8, "offsets": 1e-7, "rotation_centre": 1e-7},
                           cfg=cfg, measurements=measurements)


class _TomographyConformance(ModelConformance):
    """Tomography: the generic contract on bands of a tilted, offset projection.

    Trilinear interpolation is piecewise linear, and with small tilts many samples along the
    beam sit next to voxel planes: finite differences converge to autograd's (exact,
    one-sided) derivative only for tiny steps (offsets: 2.5e-3 relative at 1e-5 px, 1e-10 at
    1e-7 px), hence the steps of the case and a looser tolerance."""

    kind = "tomography"
    seed = 20
    loss_kind = "lsq"
    distance: float | None = None
    fd_rtol = 2e-3

    def make_case(self, tmp_path_factory: pytest.TempPathFactory) -> ConformanceCase:
        return _tomography_case(tmp_path_factory, seed=self.seed, loss=self.loss_kind,
                                distance=self.distance)


class TestTomographyLineIntegrals(_TomographyConformance):
    """Absorption, least squares on line integrals (ART's objective)."""


class TestTomographyPropagatedPoisson(_TomographyConformance):
    """Phase and absorption, Fresnel-propagated exit wave, Poisson loss."""

    seed = 21
    loss_kind = "poisson"
    distance = 2e-3


def _ptychotomography_case(tmp_path_factory: pytest.TempPathFactory, *, seed: int
                           ) -> ConformanceCase:
    """Far-field ptychography through a 12 x 12 x 12 volume rotated to 1.1 rad with small
    tilts, 4 tiles of 8 x 8 (10 keV, 20 nm voxels), a random complex probe of 2 modes, built through
    the registry; data predicted at a perturbed object and tilts."""
    rng = np.random.default_rng(seed)
    n, det = 12, 8
    pos = np.array([[0.0, 0.1], [0.2, 2.5], [2.2, 0.3], [2.4, 2.6]])
    path = tmp_path_factory.mktemp(f"conformance-pt-{seed}") / "pt.h5"
    write_measurements(
        path, intensities=rng.uniform(1.0, 9.0, (2, 4, det, det)).astype(np.float32),
        positions_px=np.broadcast_to(pos, (2, 4, 2)).copy(), angles_rad=np.array([0.0, 1.1]),
        energy_ev=10000.0, pixel_size_m=2e-8, detector_distance_m=1.0,
    )
    measurements = open_measurements(path)
    cfg = RunConfig(data={"path": str(path)},
                    model={"kind": "ptychotomography", "probe_modes": 2, "slices": 2},
                    object={"representation": "delta_beta"})
    model = registry.model_builder("ptychotomography")(cfg, measurements).with_volume((n, n, n))
    kdz = 2 * math.pi / model.wavelength_m * 2e-8
    obj = np.stack([rng.uniform(0.0, 0.1, (n, n, n)) / kdz,
                    rng.uniform(0.0, 0.01, (n, n, n)) / kdz], axis=-1)
    window = np.hanning(det + 2)[1:-1]  # a probe that fades at its edges (Fourier shifts wrap)
    probe = (rng.normal(size=(2, det, det)) + 1j * rng.normal(size=(2, det, det))) \
        * np.outer(window, window)
    params = {
        "probe": torch.from_numpy(probe),
        "positions": torch.from_numpy(pos + 1.3),
        "tilts": torch.tensor([0.01, 0.02, -0.03], dtype=torch.float64),
    }
    assert set(params) == set(model.parameter_specs())
    box = torch.from_numpy(obj)
    batch = Batch(origin=(0, 0), angle=1, tiles=np.arange(4))
    truth = dict(params, tilts=params["tilts"] + 0.01)
    with torch.no_grad():
        meas = model.predict(box * torch.from_numpy(1 + 0.05 * rng.normal(size=obj.shape)),
                             truth, batch)
    return ConformanceCase(model=model, obj_box=box, params=params, batch=batch, meas=meas,
                           fd_steps={"tilts": 1e-8, "positions": 1e-6}, cfg=cfg,
                           measurements=measurements)


class TestPtychotomography(ModelConformance):
    """Joint ptychotomography: the generic contract through the rotated, multislice volume
    (loose finite-difference tolerance: trilinear interpolation, as for tomography)."""

    kind = "ptychotomography"
    fd_rtol = 2e-3

    def make_case(self, tmp_path_factory: pytest.TempPathFactory) -> ConformanceCase:
        return _ptychotomography_case(tmp_path_factory, seed=30)

    def test_builds_from_registry(self, case: ConformanceCase) -> None:
        """The registry's model, given the volume's extent (as the engine does), predicts the
        same."""
        built = registry.model_builder(self.kind)(case.cfg, case.measurements)
        built = built.with_volume(case.model.geometry.volume)
        assert type(built) is type(case.model)
        with torch.no_grad():
            assert torch.equal(built.predict(*_inputs(case), case.batch),
                               case.model.predict(*_inputs(case), case.batch))


# ================================================================================ registry
CONFORMANCE: dict[str, tuple[type[ModelConformance], ...]] = {
    "ptychography": (
        TestFarFieldPtychographyRealImag,
        TestFarFieldPtychographyDeltaBeta,
        TestFarFieldPtychographySingleSlice,
    ),
    "holography": (TestHolographyRealImag, TestHolographyKappaPoisson),
    "tomography": (TestTomographyLineIntegrals, TestTomographyPropagatedPoisson),
    "ptychotomography": (TestPtychotomography,),
}
"""Every registered model kind and the conformance classes that cover it."""


def test_every_registered_model_has_a_conformance_case() -> None:
    """Every kind in :func:`adorym_dask.registry.model_names` has a conformance class here."""
    missing = sorted(registry.model_names() - set(CONFORMANCE))
    assert not missing, (
        f"registered model kind(s) {missing} have no conformance test: subclass "
        "ModelConformance in tests/test_model_conformance.py and list it in CONFORMANCE"
    )


def test_conformance_table_is_consistent() -> None:
    """Every listed class covers its key's kind, every key is registered, and every concrete
    conformance class in this module is listed (so none is silently left out)."""
    listed = {cls for classes in CONFORMANCE.values() for cls in classes}
    for kind, classes in CONFORMANCE.items():
        assert kind in registry.model_names(), f"{kind!r} is not a registered model"
        assert classes, kind
        for cls in classes:
            assert issubclass(cls, ModelConformance) and cls.kind == kind, (kind, cls)
            assert cls.__name__.startswith("Test"), f"{cls.__name__} would not be collected"
    defined = {
        obj for obj in globals().values()
        if isinstance(obj, type) and issubclass(obj, ModelConformance)
        and obj.__name__.startswith("Test")
    }
    unlisted = sorted(cls.__name__ for cls in defined - listed)
    assert not unlisted, f"not listed in CONFORMANCE: {unlisted}"
    assert listed <= defined
