"""Far-field (Fraunhofer) ptychography with (sparse) multislice and incoherent probe modes.

Refinable parameters: the probe (refined by default), the probe positions (per tile, through
the differentiable sub-pixel Fourier shift, Sec. 2.2 and Algorithm 1) and the slice spacings
(Sec. 3.5), each declared by :meth:`FarFieldPtychography.parameter_specs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from adorym_dask.models.base import Batch, ParameterSpec
from adorym_dask.models.losses import LOSSES, abs_square, farfield_loss
from adorym_dask.physics.multislice import multislice, transmission_from_delta_beta
from adorym_dask.physics.propagation import fraunhofer, fresnel_transfer_function
from adorym_dask.physics.shifts import fourier_shift
from adorym_dask.storage.measurements import MeasurementError

# Curvature of the loss in the far-field amplitude at a perfect fit: 2 for least squares on
# amplitudes, 4 for Poisson; what the gd/momentum object step is scaled by.
_LOSS_CURVATURE = {"lsq": 2.0, "poisson": 4.0}


def exit_waves(
    probe: Tensor,
    patches: Tensor,
    frac_shifts: Tensor,
    *,
    transfer_function: Tensor | list[Tensor] | None = None,
) -> Tensor:
    """Exit waves ``[G, M, py, px]`` of a group of tiles, one per incoherent probe mode.

    Parameters
    ----------
    probe : Tensor
        ``[M, py, px]`` complex probe modes.
    patches : Tensor
        ``[S, G, py, px]`` complex transmission of each slice under each tile.
    frac_shifts : Tensor
        ``[G, 2]`` sub-pixel (dy, dx) shift of the probe for each tile (0 <= shift < 1); the
        gradient with respect to it is the position gradient. The probe's FFT is taken once
        for all tiles; each tile costs one inverse FFT per mode.
    transfer_function : Tensor or list of Tensor, optional
        ``[py, px]`` Fresnel kernel between slices, or one per gap; required when ``S > 1``.
    """
    if frac_shifts.requires_grad or bool((frac_shifts != 0).any()):
        shifted = fourier_shift(probe.unsqueeze(0), frac_shifts.unsqueeze(1))  # [G, M, py, px]
    else:
        shifted = probe.unsqueeze(0).expand(patches.shape[1], -1, -1, -1)
    return multislice(shifted, patches.unsqueeze(2), transfer_function=transfer_function)


def farfield_intensities(
    probe: Tensor,
    patches: Tensor,
    frac_shifts: Tensor,
    *,
    transfer_function: Tensor | list[Tensor] | None = None,
) -> Tensor:
    """Far-field intensities ``[G, py, px]`` of a group of tiles, summed over incoherent probe
    modes, zero frequency at ``(py//2, px//2)``; arguments as in :func:`exit_waves`."""
    far = fraunhofer(exit_waves(probe, patches, frac_shifts, transfer_function=transfer_function))
    return abs_square(far).sum(dim=1)


def extract_patches(slices: Tensor, corners: np.ndarray, shape: tuple[int, int]) -> Tensor:
    """Gather ``[S, G, py, px]`` patches at integer ``corners [G, 2]`` from ``slices [S, h, w]``.

    One advanced-indexing gather for all tiles (no Python loop); its backward is a scatter-add.
    """
    py, px = shape
    dev = slices.device
    iy = torch.as_tensor(corners[:, 0], device=dev)[:, None] + torch.arange(py, device=dev)
    ix = torch.as_tensor(corners[:, 1], device=dev)[:, None] + torch.arange(px, device=dev)
    return slices[:, iy[:, :, None], ix[:, None, :]]


@dataclass(frozen=True)
class FarFieldPtychography:
    """Multislice far-field ptychography (one angle at a time).

    Attributes
    ----------
    det_shape : (int, int)
        Detector (= probe window) size in pixels.
    representation : str
        ``"real_imag"`` (object = transmission) or ``"delta_beta"`` (refractive index).
    wavelength_m, pixel_size_m : float
        Wavelength and object-plane pixel size.
    n_modes, n_slices : int
        Probe modes and object slices.
    slice_spacings_m : tuple of float
        Start value of the distance between consecutive slices, one per gap (may be unequal).
    slice_thickness_m : float
        Thickness of one slice for the delta/beta representation.
    loss_kind : str
        ``"lsq"`` or ``"poisson"``.
    mask : ndarray or None
        ``[det_y, det_x]`` bool, False where detector pixels are ignored.
    near_field_distance_m : float or None
        Near-field ptychography: each exit wave is Fresnel-propagated by this effective
        (plane-wave) distance over the tile's window instead of to the far field.
    """

    det_shape: tuple[int, int]
    representation: str
    wavelength_m: float
    pixel_size_m: float
    n_modes: int = 1
    n_slices: int = 1
    slice_spacings_m: tuple[float, ...] = ()
    slice_thickness_m: float = 1e-8
    loss_kind: str = "lsq"
    mask: np.ndarray | None = None
    near_field_distance_m: float | None = None

    #: the object's optimizer when ``optimizer.name`` is not given
    default_optimizer = "pie"

    # -- parameters --------------------------------------------------------------------------
    def parameter_specs(self) -> dict[str, ParameterSpec]:
        specs = {
            # a damped Gauss-Newton step on the object intensity under the probe (PIE's
            # probe update, see curvature()) with Nesterov momentum 0.8 (mPIE's), half a
            # Newton step at a time: the object takes its own full step from the same
            # residual. From a wrong-defocus start, with the true object held, the probe's
            # overlap with the truth went 0.87 -> 0.988 in one epoch (plain steps: 0.92).
            "probe": ParameterSpec(
                "probe", "probe", ("mode", "py", "px"), "global", "complex64",
                unit="sqrt(photons)", default_step=1.0, default_steps={"adam": 0.01},
                relative_step=True, default_optimizer="momentum", default_momentum=0.8,
                default_newton_fraction=0.5, default_start_epoch=0, refined_by_default=True,
            ),
            # gd with the model's curvature: a damped Gauss-Newton step per tile, each move
            # capped at step_size px (see curvature() and optimizers.parameter_step)
            # near field: 0.2 px from epoch 5 (on the PETRA III data, 1 px from epoch 2 took
            # the loss from 19 up to 34; 0.2 px from 5 brought it from 11 down to 4.6)
            "positions": ParameterSpec(
                "positions", "positions_px", ("angle", "tile", "yx"), "tile", "float64",
                unit="px", default_step=1.0 if self.near_field_distance_m is None else 0.2,
                default_optimizer="gd",
                default_start_epoch=2 if self.near_field_distance_m is None else 5,
                options={"max_shift_px": 10.0, "hold_affine": False, "search_px": 6.0,
                         "search_every_epochs": 5.0, "search_loss_ratio": 1.5},
            ),
        }
        if self.n_slices > 1:
            mean = float(np.mean(self.slice_spacings_m))
            # gd: steps proportional to the gradient (at most 5% of the spacing): Adam's
            # fixed-size steps keep a global parameter that every minibatch updates wandering
            specs["slice_spacings"] = ParameterSpec(
                "slice_spacings", "slice_spacings_m", ("gap",), "global", "float64",
                unit="m", default_step=0.05 * mean, default_optimizer="gd",
                default_start_epoch=3,
            )
        return specs

    def initial_parameters(self, cfg, meas) -> dict[str, np.ndarray]:
        from adorym_dask.parameters import initial_probe

        values = {
            "probe": initial_probe(cfg.probe, meas, n_modes=self.n_modes, seed=cfg.seed,
                                   near_field_m=self.near_field_distance_m),
            "positions": np.asarray(meas.positions_px, np.float64),
        }
        if self.n_slices > 1:
            values["slice_spacings"] = np.asarray(self.slice_spacings_m, np.float64)
        return values

    # -- physics -----------------------------------------------------------------------------
    def slices(self, obj_box: Tensor) -> Tensor:
        """Complex transmission ``[S, h, w]`` of an object box ``[h, w, S, 2]``."""
        a, b = obj_box[..., 0].permute(2, 0, 1), obj_box[..., 1].permute(2, 0, 1)
        if self.representation == "real_imag":
            return torch.complex(a, b)
        return transmission_from_delta_beta(
            a, b, wavelength_m=self.wavelength_m, thickness_m=self.slice_thickness_m
        )

    def transfer_functions(self, spacings: Tensor | None, dtype: torch.dtype) -> list[Tensor] | None:
        """One Fresnel kernel ``[py, px]`` per gap (differentiable in the spacings)."""
        if self.n_slices == 1:
            return None
        if spacings is None:
            spacings = torch.as_tensor(self.slice_spacings_m, dtype=torch.float64)
        h = fresnel_transfer_function(
            self.det_shape, pixel_size_m=self.pixel_size_m, wavelength_m=self.wavelength_m,
            distance_m=spacings, dtype=dtype,
        )
        return list(h.unbind(0))

    def _exit_waves(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch) -> Tensor:
        pos = params["positions"] - torch.as_tensor(batch.origin, dtype=params["positions"].dtype)
        corners = torch.floor(pos.detach())
        frac = (pos - corners).to(obj_box.dtype)
        slices = self.slices(obj_box)
        patches = extract_patches(slices, corners.long().numpy(), self.det_shape)
        tf = self.transfer_functions(params.get("slice_spacings"), slices.dtype)
        probe = params["probe"].to(slices.dtype)
        return exit_waves(probe, patches, frac, transfer_function=tf)

    def propagate(self, exit_waves: Tensor) -> Tensor:
        """Exit waves ``[..., py, px]`` to the detector: Fraunhofer, or Fresnel over
        ``near_field_distance_m`` (both unitary)."""
        if self.near_field_distance_m is None:
            return fraunhofer(exit_waves)
        h = fresnel_transfer_function(
            self.det_shape, pixel_size_m=self.pixel_size_m, wavelength_m=self.wavelength_m,
            distance_m=self.near_field_distance_m, dtype=exit_waves.dtype,
        )
        return torch.fft.ifft2(torch.fft.fft2(exit_waves) * h)

    def predict(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Predicted intensities ``[G, det_y, det_x]``; see :class:`ForwardModel`."""
        return abs_square(self.propagate(self._exit_waves(obj_box, params, batch))).sum(dim=1)

    def tile_losses(
        self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch, meas: Tensor
    ) -> Tensor:
        """Per-tile loss ``[G]``, equal to ``loss(predict(...), meas)`` but computed by
        :func:`~adorym_dask.models.losses.farfield_loss` (no shift of the far field, a
        closed-form backward): what the gradient tasks call. A subclass that overrides
        :meth:`predict` or :meth:`loss` (a plug-in adding a background, say) gets exactly
        ``loss(predict(...), meas)``: the fused step would skip its physics."""
        cls, base = type(self), FarFieldPtychography
        if (cls.predict is not base.predict or cls.loss is not base.loss
                or self.near_field_distance_m is not None):
            return self.loss(self.predict(obj_box, params, batch), meas)
        mask = None if self.mask is None else torch.as_tensor(self.mask)
        return farfield_loss(self._exit_waves(obj_box, params, batch), meas,
                             kind=self.loss_kind, mask=mask)

    def loss(self, pred: Tensor, meas: Tensor) -> Tensor:
        """Per-tile loss ``[G]`` with the detector mask applied."""
        mask = None if self.mask is None else torch.as_tensor(self.mask)
        return LOSSES[self.loss_kind](pred, meas, mask=mask)

    def curvature(
        self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch,
        names: frozenset[str] = frozenset({"positions", "probe"}),
    ) -> dict[str, Tensor]:
        """Gauss-Newton curvature of the group's summed tile losses, for the parameters in
        ``names``: ``{"positions": [G, 2], "probe": [py, px]}``.

        Positions: moving the probe by ``dp`` over the object changes the far-field
        intensities as moving the object by ``-dp`` under the probe does (the two differ by a
        far-field phase ramp), so the exit wave changes by ``P dT/dp``, with ``T`` the product
        of the slices' transmissions. The far-field amplitude changes by at most as much (ortho
        FFT), so ``c sum_m sum_r |P_m|^2 |dT/dy|^2 / n_pixels`` (and likewise along x)
        estimates the curvature (an upper bound for one thin slice; central differences on the
        pixel grid and the propagation between slices ignored, it came out 0.5-1.1 times the
        true second derivative in tests, which is why the engine caps each move). A flat
        region of the object gives (correctly) almost none.

        Probe: the exit wave changes by ``T dP``, so ``c sum_tiles |T|^2 / n_pixels`` per
        probe pixel (the same for every mode): the object intensity that PIE-family probe
        updates divide by.
        """
        pos = params["positions"].detach() - torch.as_tensor(batch.origin, dtype=torch.float64)
        corners = torch.floor(pos).long().numpy()
        patches = extract_patches(self.slices(obj_box.detach()), corners, self.det_shape)
        t = patches.prod(dim=0)  # [G, py, px]
        if self.mask is not None:
            n_pix = float(self.mask.sum())
        else:
            n_pix = float(np.prod(self.det_shape))
        c = _LOSS_CURVATURE[self.loss_kind] / n_pix
        out = {}
        if "positions" in names:
            dy = torch.zeros_like(t)
            dx = torch.zeros_like(t)
            dy[:, 1:-1] = 0.5 * (t[:, 2:] - t[:, :-2])
            dx[:, :, 1:-1] = 0.5 * (t[:, :, 2:] - t[:, :, :-2])
            light = (params["probe"].detach().abs() ** 2).sum(dim=0).to(t.real.dtype)
            hy = c * (light * dy.abs() ** 2).sum(dim=(-2, -1))
            hx = c * (light * dx.abs() ** 2).sum(dim=(-2, -1))
            out["positions"] = torch.stack([hy, hx], dim=-1).to(torch.float64)
        if "probe" in names:
            out["probe"] = (c * abs_square(t).sum(dim=0)).to(torch.float64)
        return out

    def object_curvature_map(
        self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch
    ) -> Tensor:
        """Gauss-Newton curvature ``[h, w]`` of the group's summed tile losses in each object
        value of the box: ``c sum_tiles sum_modes |P(r - p_t)|^2 / n_pixels`` (times
        ``(k dz)^2`` for delta/beta), the illumination the group gives each pixel on the scale
        of :meth:`object_curvature` (whole-pixel placement: a preconditioner needs no more).

        Times the number of slices: a pixel's values in the slices act on the exit wave almost
        alike (the slices are thin against the depth of field), so a Gauss-Newton step taken
        in every slice at once moves the exit wave up to ``n_slices`` times as far as each
        slice's own curvature says (the largest eigenvalue of that block of the curvature
        matrix); without the factor, 2 slices with momentum oscillated in the tests.
        """
        pos = params["positions"].detach() - torch.as_tensor(batch.origin, dtype=torch.float64)
        corners = torch.floor(pos).long()
        light = (params["probe"].detach().abs() ** 2).sum(dim=0).to(obj_box.dtype)
        h, w = obj_box.shape[:2]
        py, px = self.det_shape
        iy = corners[:, 0, None] + torch.arange(py)
        ix = corners[:, 1, None] + torch.arange(px)
        flat = (iy[:, :, None] * w + ix[:, None, :]).reshape(-1)
        out = torch.zeros(h * w, dtype=obj_box.dtype)
        out.index_add_(0, flat, light.expand(len(corners), py, px).reshape(-1))
        n_pix = float(self.mask.sum()) if self.mask is not None else float(np.prod(self.det_shape))
        c = _LOSS_CURVATURE[self.loss_kind] * self.n_slices / n_pix
        if self.representation == "delta_beta":
            c *= (2 * math.pi / self.wavelength_m * self.slice_thickness_m) ** 2
        return (c * out).reshape(h, w)

    def object_curvature(self, params: dict[str, np.ndarray], n_tiles: int) -> float:
        """Largest curvature ``L`` of a minibatch's mean loss in one object value, where a
        single tile lights it: ``c |P|^2_max n_slices / (n_pixels n_tiles)`` (Gauss-Newton,
        ortho FFT; ``n_slices`` as in :meth:`object_curvature_map`), times ``(k dz)^2`` for
        delta/beta. ``gd`` steps ``step_size / L`` times the gradient."""
        probe = params["probe"]
        peak = float((np.abs(probe) ** 2).sum(axis=0).max())
        n_pix = float(self.mask.sum()) if self.mask is not None else float(np.prod(self.det_shape))
        curvature = (_LOSS_CURVATURE[self.loss_kind] * peak * self.n_slices
                     / (n_pix * max(n_tiles, 1)))
        if self.representation == "delta_beta":
            curvature *= (2 * math.pi / self.wavelength_m * self.slice_thickness_m) ** 2
        return curvature


def build_ptychography(cfg, meas) -> FarFieldPtychography:
    """The model of ``cfg.model`` (a :class:`~adorym_dask.config.PtychographyConfig`)."""
    m = cfg.model
    spacings = tuple(m.slice_spacings_m or ())
    thickness = cfg.object.slice_thickness_m or (
        float(np.mean(spacings)) if spacings else meas.pixel_size_m
    )
    near = None
    if m.propagation.value == "near_field":
        if meas.distances_m is None:
            raise MeasurementError(
                f"distances_m: near-field ptychography needs the sample-to-detector distance; "
                f"{meas.source.path} has none: set data.detector_distance_m (and "
                "data.source_distance_m for a cone beam)"
            )
        near = float(np.mean(meas.distances_m))
    return FarFieldPtychography(
        near_field_distance_m=near,
        det_shape=tuple(meas.det_shape),
        representation=cfg.object.representation.value,
        wavelength_m=meas.wavelength_m,
        pixel_size_m=meas.pixel_size_m,
        n_modes=m.probe_modes,
        n_slices=m.slices,
        slice_spacings_m=spacings,
        slice_thickness_m=thickness,
        loss_kind=m.loss.value,
        mask=meas.mask,
    )
