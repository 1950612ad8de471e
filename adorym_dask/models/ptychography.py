"""Far-field (Fraunhofer) ptychography with multislice and incoherent probe modes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from adorym_dask.models.losses import LOSSES
from adorym_dask.physics.multislice import multislice, transmission_from_delta_beta
from adorym_dask.physics.propagation import fraunhofer, fresnel_transfer_function
from adorym_dask.physics.shifts import fourier_shift


def farfield_intensities(
    probe: Tensor, patches: Tensor, frac_shifts: Tensor, *, transfer_function: Tensor | None = None
) -> Tensor:
    """Far-field intensities of a group of tiles, summed over incoherent probe modes.

    Parameters
    ----------
    probe : Tensor
        ``[M, py, px]`` complex probe modes.
    patches : Tensor
        ``[S, G, py, px]`` complex transmission of each slice under each tile.
    frac_shifts : Tensor
        ``[G, 2]`` sub-pixel (dy, dx) shift of the probe for each tile (0 <= shift < 1).
    transfer_function : Tensor, optional
        ``[py, px]`` Fresnel kernel between slices; required when ``S > 1``.

    Returns
    -------
    Tensor
        ``[G, py, px]`` intensities, zero frequency at ``(py//2, px//2)``.
    """
    if bool((frac_shifts != 0).any()):
        shifted = fourier_shift(probe.unsqueeze(0), frac_shifts.unsqueeze(1))  # [G, M, py, px]
    else:
        shifted = probe.unsqueeze(0).expand(patches.shape[1], -1, -1, -1)
    exit_wave = multislice(shifted, patches.unsqueeze(2), transfer_function=transfer_function)
    far = fraunhofer(exit_wave)
    return (far.real.square() + far.imag.square()).sum(dim=1)


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
    slice_spacing_m : float or None
        Free-space distance between consecutive slices (multislice only).
    slice_thickness_m : float
        Thickness of one slice for the delta/beta representation.
    loss_kind : str
        ``"lsq"`` or ``"poisson"``.
    mask : ndarray or None
        ``[det_y, det_x]`` bool, False where detector pixels are ignored.
    """

    det_shape: tuple[int, int]
    representation: str
    wavelength_m: float
    pixel_size_m: float
    slice_spacing_m: float | None = None
    slice_thickness_m: float = 1e-8
    loss_kind: str = "lsq"
    mask: np.ndarray | None = None

    def slices(self, obj_box: Tensor) -> Tensor:
        """Complex transmission ``[S, h, w]`` of an object box ``[h, w, S, 2]``."""
        a, b = obj_box[..., 0].permute(2, 0, 1), obj_box[..., 1].permute(2, 0, 1)
        if self.representation == "real_imag":
            return torch.complex(a, b)
        return transmission_from_delta_beta(
            a, b, wavelength_m=self.wavelength_m, thickness_m=self.slice_thickness_m
        )

    def transfer_function(self, n_slices: int, dtype: torch.dtype) -> Tensor | None:
        if n_slices == 1:
            return None
        return fresnel_transfer_function(
            self.det_shape,
            pixel_size_m=self.pixel_size_m,
            wavelength_m=self.wavelength_m,
            distance_m=self.slice_spacing_m,
            dtype=dtype,
        )

    def predict(self, obj_box: Tensor, probe: Tensor, positions_rel: np.ndarray) -> Tensor:
        """Predicted intensities ``[G, det_y, det_x]``; see :class:`ForwardModel`."""
        corners = np.floor(positions_rel).astype(np.int64)
        frac = torch.as_tensor(positions_rel - corners, dtype=obj_box.dtype)
        slices = self.slices(obj_box)
        patches = extract_patches(slices, corners, self.det_shape)
        tf = self.transfer_function(slices.shape[0], slices.dtype)
        return farfield_intensities(probe, patches, frac, transfer_function=tf)

    def loss(self, pred: Tensor, meas: Tensor) -> Tensor:
        """Per-tile loss ``[G]`` with the detector mask applied."""
        mask = None if self.mask is None else torch.as_tensor(self.mask)
        return LOSSES[self.loss_kind](pred, meas, mask=mask)
