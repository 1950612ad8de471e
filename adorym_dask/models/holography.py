"""Multi-distance in-line holography (paper Sec. 3.2, 3.3).

The object (one slice or multislice) is lit by a plane wave of ``incident_photons`` counts per
pixel (or that times an illumination from ``probe: {init: file}``) and Fresnel-propagated to each hologram's effective distance:
``I_ideal = |IFFT(FFT(T) exp(-i pi lambda z |f|^2))|^2``; the recorded hologram at pixel ``r``
is ``I_ideal(A_lin (r - c) + c + t)`` (``affine``, hologram 0 the reference). Refinable:
``distances`` (per hologram), ``affine`` (per hologram), and with ``model.kappa`` the
homogeneous-object ratio ``beta = kappa delta``.

Tiling (Sec. 2.1): each hologram is cut into tiles of at most ``model.tile_px``; a tile is
predicted from the object under it plus a halo of ``reach_px`` on every side
(``tile_halo_factor`` times the Fresnel spread ``lambda z_max / (2 pixel)``, plus the largest
alignment shift; an unsplit hologram needs only ``margin_factor`` spreads, as the object
beyond its field is vacuum), so the object stays chunked, and the engine's tiles are these
tiles. The object extends ``reach_px``
beyond the holograms' field on every side; that margin is vacuum (``object.margin``) unless
``free``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from adorym_dask.config import ConfigError
from adorym_dask.models.base import Batch, ParameterSpec
from adorym_dask.models.losses import LOSSES, abs_square
from adorym_dask.models.ptychography import extract_patches
from adorym_dask.models.tiling import Tiling
from adorym_dask.physics.affine import (
    affine_coordinates,
    fourier_upsample,
    identity_affine,
    sample_bspline,
)
from adorym_dask.physics.multislice import multislice, transmission_from_delta_beta
from adorym_dask.physics.propagation import fresnel_transfer_function
from adorym_dask.storage.measurements import MeasurementError, Measurements, read_tiles

log = logging.getLogger(__name__)

_LOSS_CURVATURE = {"lsq": 2.0, "poisson": 4.0}
DEFAULT_MAX_SHIFT_PX = 8.0
UPSAMPLE = 2  # the aligned wave is sampled on a grid this much finer (see predict)
PRECONDITION_FLOOR = 0.05  # of the transfer functions' weight (at most 1), see precondition


@dataclass(frozen=True)
class MultiDistanceHolography:
    """The forward model (small, immutable, shipped to every task).

    Attributes
    ----------
    tiling : Tiling
        Hologram and tile shapes.
    reach_px : int
        Halo read around each tile (the engine widens boxes and the object by it).
    representation : str
        ``real_imag`` or ``delta_beta``.
    wavelength_m, pixel_size_m : float
    distances_m : tuple of float
        Start value of each hologram's effective distance.
    incident_photons : float
        Plane-wave counts per pixel.
    n_slices : int
    slice_spacings_m : tuple of float
    slice_thickness_m : float
    loss_kind : str
    mask : ndarray or None
        ``[H, W]`` detector mask (False = ignored).
    kappa : float or None
        Start value of ``beta / delta`` (homogeneous object), or None.
    vacuum_margin : bool
        Hold the object outside the holograms' field at vacuum.
    max_shift_px : float
        Largest alignment shift allowed at the hologram's corners.
    illumination_path : str or None
        ``.npy`` complex ``[H, W]`` illumination at the sample (``probe: {init: file}``),
        relative to the plane wave of ``incident_photons``; it becomes the parameter
        ``probe`` ``[H + 2 reach, W + 2 reach]``, extended into the margin by its edge values.
        None: a plane wave.
    """

    tiling: Tiling
    reach_px: int
    representation: str
    wavelength_m: float
    pixel_size_m: float
    distances_m: tuple[float, ...]
    incident_photons: float = 1.0
    n_slices: int = 1
    slice_spacings_m: tuple[float, ...] = ()
    slice_thickness_m: float = 1e-6
    loss_kind: str = "lsq"
    mask: np.ndarray | None = None
    kappa: float | None = None
    vacuum_margin: bool = True
    max_shift_px: float = DEFAULT_MAX_SHIFT_PX
    illumination_path: str | None = None

    # Adam: with pie (a Gauss-Newton step preconditioned in frequency, selectable) the object
    # fits wrong distances within a few epochs, and they then creep back slowly (128 px
    # study, 150 epochs: -1.5 cm; Adam -0.46 cm), although its phase is better (high-pass
    # SSIM 0.83 against 0.73): a common distance error and a slightly defocused object
    # explain the holograms almost equally well (see the README)
    default_optimizer = "adam"
    # pie here is a Gauss-Newton step preconditioned in frequency (precondition_object_
    # gradient); 1.0 stalled at a loss of 0.15 on the 64 px study, 0.3 reached 2.7e-5 in 40
    # epochs (Adam: 5e-4), 0.1 1.4e-4
    default_object_steps = {"pie": 0.3}

    @property
    def n_holograms(self) -> int:
        return len(self.distances_m)

    # -- parameters --------------------------------------------------------------------------
    def parameter_specs(self) -> dict[str, ParameterSpec]:
        half = max(self.tiling.holo) / 2.0
        specs = {
            # the engine's tiles (fixed): alignment is refined through `affine`
            "positions": ParameterSpec(
                "positions", "positions_px", ("angle", "tile", "yx"), "tile", "float64",
                unit="px", default_step=1.0, default_optimizer="gd", refinable=False,
            ),
            # Adam from the first epoch, 5 mm steps: the distances must move before the
            # object has fitted the wrong ones (1 mm from epoch 5: still 1.8 cm off after
            # 200 epochs of the 128 px study; 5 mm from epoch 0: 0.4 cm)
            "distances": ParameterSpec(
                "distances", "distances_m", ("hologram",), "global", "float64", unit="m",
                default_step=5e-3, default_optimizer="adam", default_start_epoch=0,
            ),
            # step in pixels of movement at the hologram's edge: the linear part's step is
            # divided by the half-width (see step_scale)
            "affine": ParameterSpec(
                "affine", "affine", ("hologram", "row", "col"), "global", "float64", unit="px",
                default_step=0.05, default_optimizer="adam", default_start_epoch=5,
                options={"max_shift_px": DEFAULT_MAX_SHIFT_PX},
                step_scale=((1 / half, 1 / half, 1.0), (1 / half, 1 / half, 1.0)),
            ),
        }
        if self.illumination_path is not None:
            # refined only on request: with every hologram of one field, the illumination
            # and the object meet only as their product
            specs["probe"] = ParameterSpec(
                "probe", "probe", ("py", "px"), "global", "complex64", unit="sqrt(photons)",
                default_step=0.01, relative_step=True, default_optimizer="adam",
                default_start_epoch=5,
            )
        if self.kappa is not None:
            specs["kappa"] = ParameterSpec(
                "kappa", "kappa", (), "global", "float64", unit="1", default_step=0.1,
                relative_step=True, default_optimizer="adam", default_start_epoch=5,
            )
        return specs

    def initial_parameters(self, cfg, meas: Measurements) -> dict[str, np.ndarray]:
        values = {
            "positions": np.asarray(meas.positions_px, np.float64),
            "distances": np.asarray(self.distances_m, np.float64),
            "affine": identity_affine(self.n_holograms),
        }
        if self.kappa is not None:
            values["kappa"] = np.asarray(float(self.kappa))
        if self.illumination_path is not None:
            values["probe"] = self.load_illumination()
        return values

    def load_illumination(self) -> np.ndarray:
        """The illumination file ``[H, W]`` complex, extended by ``reach_px`` on every side
        (edge values), complex64 ``[H + 2 reach, W + 2 reach]``."""
        from adorym_dask.parameters import ProbeError

        path = self.illumination_path
        try:
            ill = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ProbeError(f"probe.path: cannot read {path} as a .npy array ({err})") from None
        ill = np.squeeze(ill)
        if ill.shape != self.tiling.holo:
            raise ProbeError(
                f"probe.path: the illumination {path} has shape {ill.shape}, but holography "
                f"needs one value per hologram pixel, {self.tiling.holo}"
            )
        if not np.all(np.isfinite(ill)):
            raise ProbeError(f"probe.path: {path} contains NaN or inf values")
        r = self.reach_px
        return np.pad(ill.astype(np.complex64), r, mode="edge")

    def engine_measurements(self, meas: Measurements) -> Measurements:
        """The measurements as the engine's tiles: each hologram cut by :attr:`tiling`, at
        ``positions_px`` = the hologram's position plus the tile's corner."""
        t = self.tiling
        if t.per_hologram == 1:
            return meas
        n = meas.n_tiles * t.per_hologram
        idx = np.arange(n)
        corners = t.corners(idx)
        pos = meas.positions_px[:, t.hologram(idx)] + corners[None]
        return replace(
            meas, source=replace(meas.source, split=(*t.tile, *t.n)), n_tiles=n,
            det_shape=t.tile, positions_px=pos, mask=None,
            distances_m=None if meas.distances_m is None else meas.distances_m[t.hologram(idx)],
        )

    def interior_boxes(self, positions_px: np.ndarray) -> list[tuple[int, int, int, int]]:
        """The measured field of each engine tile ``(y0, x0, h, w)`` (object pixels; the
        last row and column of tiles clipped to the hologram)."""
        t = self.tiling
        idx = np.arange(positions_px.shape[1])
        corners = t.corners(idx)
        out = []
        for pos in positions_px.reshape(-1, positions_px.shape[1], 2):
            for p, c in zip(np.floor(pos).astype(int), corners):
                h = min(t.tile[0], t.holo[0] - c[0])
                w = min(t.tile[1], t.holo[1] - c[1])
                out.append((int(p[0]), int(p[1]), int(h), int(w)))
        return out

    # -- physics -----------------------------------------------------------------------------
    def slices(self, obj_box: Tensor, kappa: Tensor | None) -> Tensor:
        """Complex transmission ``[S, h, w]``; with kappa, ``beta = kappa delta`` (the stored
        second channel is not used)."""
        a, b = obj_box[..., 0].permute(2, 0, 1), obj_box[..., 1].permute(2, 0, 1)
        if self.representation == "real_imag":
            return torch.complex(a, b)
        if kappa is not None:
            b = kappa.to(a.dtype) * a
        return transmission_from_delta_beta(
            a, b, wavelength_m=self.wavelength_m, thickness_m=self.slice_thickness_m
        )

    def _window(self) -> tuple[int, int]:
        r = self.reach_px
        return self.tiling.tile[0] + 2 * r, self.tiling.tile[1] + 2 * r

    def detector_spectra(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """``FFT`` of each tile window's wave at its hologram's distance, ``[G, wy, wx]``
        (``wy = t_y + 2 reach``)."""
        r = self.reach_px
        pos = params["positions"].detach() - torch.as_tensor(batch.origin, dtype=torch.float64)
        corners = torch.floor(pos).long().numpy() - r
        if corners.min() < 0 or (corners + np.asarray(self._window()) > np.asarray(obj_box.shape[:2])).any():
            raise ValueError("a tile's window reaches outside its object box: the box lacks "
                             f"the {r}-pixel halo the model needs")
        slices = self.slices(obj_box, params.get("kappa"))
        win = self._window()
        patches = extract_patches(slices, corners, win)  # [S, G, wy, wx]
        tf = None
        if self.n_slices > 1:
            gaps = fresnel_transfer_function(
                win, pixel_size_m=self.pixel_size_m, wavelength_m=self.wavelength_m,
                distance_m=torch.as_tensor(self.slice_spacings_m, dtype=torch.float64),
                dtype=slices.dtype,
            )
            tf = list(gaps.unbind(0))
        amp = math.sqrt(self.incident_photons)
        if "probe" in params:  # the illumination over each window: probe pixel 0 = -reach
            sub = self.tiling.corners(batch.tiles)
            iy = torch.as_tensor(sub[:, 0])[:, None] + torch.arange(win[0])
            ix = torch.as_tensor(sub[:, 1])[:, None] + torch.arange(win[1])
            incident = amp * params["probe"].to(slices.dtype)[iy[:, :, None], ix[:, None, :]]
        else:
            incident = torch.full((len(corners), *win), amp, dtype=slices.dtype)
        wave = multislice(incident, patches, transfer_function=tf)
        holo = torch.as_tensor(self.tiling.hologram(batch.tiles))
        h = fresnel_transfer_function(
            win, pixel_size_m=self.pixel_size_m, wavelength_m=self.wavelength_m,
            distance_m=params["distances"][holo], dtype=wave.dtype,
        )
        return torch.fft.fft2(wave) * h

    def predict(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Recorded (aligned) intensities ``[G, t_y, t_x]``; see :class:`ForwardModel`.

        The recorded intensity at pixel ``r`` is the wave's ``|psi(q)|^2`` at the aligned
        point ``q`` (``affine``): the wave, band-limited on the pixel grid, is interpolated
        exactly onto a grid twice as fine (:func:`fourier_upsample`) and sampled there
        bicubically, then squared; interpolating the intensity itself (which holds twice the
        wave's bandwidth) misfit noise-free holograms several times more than this.
        """
        spectra = self.detector_spectra(obj_box, params, batch)
        r = self.reach_px
        ty, tx = self.tiling.tile
        affine = params["affine"]
        holo = torch.as_tensor(self.tiling.hologram(batch.tiles))
        eye = torch.as_tensor(identity_affine(1)[0], dtype=affine.dtype)
        if not affine.requires_grad and bool(((affine[holo] == eye) | (holo == 0)[:, None, None]).all()):
            # no alignment to apply (hologram 0, or maps that are not refined and the identity)
            return abs_square(torch.fft.ifft2(spectra)[:, r : r + ty, r : r + tx])
        # hologram 0 is the reference: its map stays the identity (and gets no gradient)
        maps = torch.where((holo == 0)[:, None, None], eye, affine[holo])
        sub = torch.as_tensor(self.tiling.corners(batch.tiles), dtype=affine.dtype)
        centre = ((self.tiling.holo[0] - 1) / 2, (self.tiling.holo[1] - 1) / 2)
        q = (affine_coordinates(maps, sub, (ty, tx), centre) - sub[:, None, None, :] + r) * UPSAMPLE
        coef = fourier_upsample(spectra, UPSAMPLE, bspline=True)
        re = sample_bspline(coef.real.contiguous(), q)
        im = sample_bspline(coef.imag.contiguous(), q)
        return re * re + im * im

    def tile_mask(self, tiles: np.ndarray) -> Tensor | None:
        """``[G, t_y, t_x]`` bool: measured pixels (inside the hologram, kept by the mask)."""
        t = self.tiling
        if t.per_hologram == 1:
            return None if self.mask is None else torch.as_tensor(self.mask)
        full = np.ones(t.holo, bool) if self.mask is None else np.asarray(self.mask, bool)
        padded = np.zeros((t.n[0] * t.tile[0], t.n[1] * t.tile[1]), bool)
        padded[: t.holo[0], : t.holo[1]] = full
        out = np.stack([padded[y : y + t.tile[0], x : x + t.tile[1]]
                        for y, x in t.corners(tiles)])
        return torch.as_tensor(out)

    def tile_losses(self, obj_box: Tensor, params: dict[str, Tensor], batch: Batch,
                    meas: Tensor) -> Tensor:
        """Per-tile loss ``[G]`` over each tile's measured pixels."""
        pred = self.predict(obj_box, params, batch)
        return LOSSES[self.loss_kind](pred, meas, mask=self.tile_mask(batch.tiles))

    def loss(self, pred: Tensor, meas: Tensor) -> Tensor:
        return LOSSES[self.loss_kind](pred, meas, mask=None if self.tiling.per_hologram > 1
                                      else (None if self.mask is None
                                            else torch.as_tensor(self.mask)))

    def constrain_parameters(self, states: dict) -> dict:
        """After each step: hologram 0's map stays the identity, every map moves a corner by
        at most ``max_shift_px`` (its departure from the identity is scaled back), distances
        and kappa stay positive."""
        from adorym_dask.optimizers import ParameterState
        from adorym_dask.physics.affine import corner_displacement_px

        out = dict(states)
        if "affine" in out:
            ps = out["affine"]
            a = np.array(ps.value)
            eye = identity_affine(len(a))
            a[0] = eye[0]
            moved = corner_displacement_px(a, self.tiling.holo)
            over = moved > self.max_shift_px
            if over.any():
                shrink = (self.max_shift_px / moved[over])[:, None, None]
                a[over] = eye[over] + (a[over] - eye[over]) * shrink
            out["affine"] = ParameterState(a, ps.state, ps.step)
        if "distances" in out:
            ps = out["distances"]
            lo = 0.05 * np.asarray(self.distances_m)
            out["distances"] = ParameterState(np.maximum(ps.value, lo), ps.state, ps.step)
        if "kappa" in out:
            ps = out["kappa"]
            out["kappa"] = ParameterState(np.maximum(ps.value, 1e-6), ps.state, ps.step)
        return out

    # -- curvature (the pie optimizer's preconditioner) --------------------------------------
    def _curvature_scale(self) -> float:
        n_pix = float(np.prod(self.tiling.tile))
        c = _LOSS_CURVATURE[self.loss_kind] * self.incident_photons * self.n_slices / n_pix
        if self.representation == "delta_beta":
            c *= (2 * math.pi / self.wavelength_m * self.slice_thickness_m) ** 2
        return c

    def precondition_object_gradient(self, grad: np.ndarray, params: dict[str, Tensor]) -> np.ndarray:
        """The ``pie`` optimizer's preconditioner: the gradient ``[h, w, S, 2]`` of a box
        divided, frequency by frequency, by the weak-object curvature's spectral shape.

        For ``T = 1 + t`` a hologram at distance ``z`` passes ``Re t`` (absorption) through
        ``cos(chi)`` and ``Im t`` (phase) through ``sin(chi)``, ``chi = pi lambda z |f|^2``
        (the contrast transfer functions), so the Gauss-Newton curvature at frequency ``f`` is
        ``mean_j cos^2 chi_j`` for the first and ``mean_j sin^2 chi_j`` for the second (phase:
        delta; absorption: beta), up to the per-pixel scale that :meth:`object_curvature_map`
        gives. Dividing by it (plus ``PRECONDITION_FLOOR``) makes the step a damped
        Gauss-Newton one in every frequency: plain gradient steps move the phase's low
        frequencies (``sin chi ~ chi``, tiny) hardly at all.
        """
        h, w = grad.shape[:2]
        z = params["distances"].detach().numpy().astype(np.float64)
        fy = np.fft.fftfreq(h, d=self.pixel_size_m)
        fx = np.fft.fftfreq(w, d=self.pixel_size_m)
        chi = np.pi * self.wavelength_m * z[:, None, None] * (fy[None, :, None] ** 2
                                                              + fx[None, None, :] ** 2)
        w_phase = (np.sin(chi) ** 2).mean(axis=0)
        w_abs = (np.cos(chi) ** 2).mean(axis=0)
        # channel of the phase: imag (real_imag) or delta (delta_beta); the other: absorption
        weights = (w_abs, w_phase) if self.representation == "real_imag" else (w_phase, w_abs)
        out = np.empty_like(grad)
        for c, wt in enumerate(weights):
            spec = np.fft.fft2(grad[..., c].astype(np.float64), axes=(0, 1))
            spec /= (wt + PRECONDITION_FLOOR)[:, :, None]
            out[..., c] = np.fft.ifft2(spec, axes=(0, 1)).real
        return out

    def object_curvature_map(self, obj_box: Tensor, params: dict[str, Tensor],
                             batch: Batch) -> Tensor:
        """``[h, w]`` Gauss-Newton curvature of the group's summed losses in each object value:
        the plane wave lights every pixel of a tile's field with ``incident_photons``, and a
        unitary propagation keeps that curvature, ``c I0 / n_pixels`` per hologram that sees
        the pixel (times ``(k dz)^2`` for delta/beta), as ptychography's under a flat probe."""
        pos = params["positions"].detach() - torch.as_tensor(batch.origin, dtype=torch.float64)
        corners = torch.floor(pos).long().numpy()
        out = torch.zeros(obj_box.shape[:2], dtype=obj_box.dtype)
        wy, wx = self._window()  # every pixel of a tile's window reaches its hologram
        for y, x in corners - self.reach_px:
            out[max(y, 0) : y + wy, max(x, 0) : x + wx] += 1.0
        return self._curvature_scale() * out

    def object_curvature(self, params: dict[str, np.ndarray], n_tiles: int) -> float:
        """The curvature where one tile of the minibatch lights a value (see ptychography)."""
        return self._curvature_scale() / max(n_tiles, 1)


def build_holography(cfg, meas: Measurements) -> MultiDistanceHolography:
    """The model of ``cfg.model`` (a :class:`~adorym_dask.config.HolographyConfig`)."""
    m = cfg.model
    if meas.n_angles != 1:
        raise MeasurementError(
            f"intensities: holography expects [1, n_holograms, det_y, det_x]; this file has "
            f"{meas.n_angles} angles (tomography is a different model)"
        )
    if meas.distances_m is None:
        raise MeasurementError(
            f"distances_m is missing in {meas.source.path}: holography needs one effective "
            "(plane-wave) propagation distance in metres per hologram, a dataset "
            "'distances_m' [n_holograms] (see write_measurements)"
        )
    if "positions" in {k for k, v in cfg.refine.items() if v is not None}:
        raise ConfigError("refine.positions: holograms are aligned by refine.affine (a 2x3 map "
                          "per hologram); remove refine.positions")
    if m.kappa is not None and cfg.object.representation.value != "delta_beta":
        raise ConfigError("model.kappa (beta = kappa delta) needs object.representation: "
                          "delta_beta")
    affine_cfg = cfg.refine.get("affine")
    max_shift = DEFAULT_MAX_SHIFT_PX
    if affine_cfg is not None and "max_shift_px" in affine_cfg.options():
        max_shift = float(affine_cfg.options()["max_shift_px"])
    z_max = float(meas.distances_m.max())
    if "distances" in cfg.refine and cfg.refine["distances"] is not None:
        z_max *= 1.1  # room for the refined distances to grow
    tiling = Tiling.for_hologram(meas.det_shape, m.tile_px)
    spread = meas.wavelength_m * z_max / (2 * meas.pixel_size_m ** 2)
    factor = m.margin_factor if tiling.per_hologram == 1 else m.tile_halo_factor
    aligned = cfg.refine.get("affine") is not None
    reach = int(math.ceil(factor * spread)) + (int(math.ceil(max_shift)) if aligned else 0)
    spacings = tuple(m.slice_spacings_m or ())
    thickness = cfg.object.slice_thickness_m or meas.pixel_size_m
    model = MultiDistanceHolography(
        tiling=tiling,
        reach_px=reach,
        representation=cfg.object.representation.value,
        wavelength_m=meas.wavelength_m,
        pixel_size_m=meas.pixel_size_m,
        distances_m=tuple(float(d) for d in meas.distances_m),
        incident_photons=meas.incident_photons,
        n_slices=m.slices,
        slice_spacings_m=spacings,
        slice_thickness_m=thickness,
        loss_kind=m.loss.value,
        mask=meas.mask,
        kappa=m.kappa,
        vacuum_margin=cfg.object.margin.value == "vacuum",
        max_shift_px=max_shift,
    )
    level = float(read_tiles(meas.source, 0, np.arange(1)).mean())
    if not 0.25 < level / meas.incident_photons < 4.0:
        log.warning(
            "incident_photons is %g but hologram 1 averages %.4g counts per pixel: the plane "
            "wave would have to be amplified or absorbed that much by the object. Set the "
            "file's attribute incident_photons to the bare beam's counts per pixel",
            meas.incident_photons, level)
    log.info("holography: %d hologram(s) of %s px in tiles of %s, halo and margin %d px "
             "(Fresnel spread %.1f px at z_max %.4g m)", meas.n_tiles, meas.det_shape,
             model.tiling.tile, reach, spread, z_max)
    if cfg.probe.init.value == "file":
        model = replace(model, illumination_path=str(cfg.probe.path))
        model.load_illumination()  # a clear error before the run starts
    elif cfg.probe.init.value == "aperture":
        raise ConfigError("probe.init: aperture is for ptychography; holography is lit by a "
                          "plane wave, or by probe: {init: file, path: illumination.npy}")
    return model
