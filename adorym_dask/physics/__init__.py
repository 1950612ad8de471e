"""Physics kernels: propagation, multislice, shifts and probes (pure torch)."""

from .multislice import multislice, transmission_from_delta_beta
from .probes import defocused_aperture_probe, disk_aperture, normalize_probe_power
from .propagation import (
    fraunhofer,
    fresnel_propagate,
    fresnel_transfer_function,
    wavelength_m,
)
from .shifts import fourier_shift

__all__ = [
    "defocused_aperture_probe",
    "disk_aperture",
    "fourier_shift",
    "fraunhofer",
    "fresnel_propagate",
    "fresnel_transfer_function",
    "multislice",
    "normalize_probe_power",
    "transmission_from_delta_beta",
    "wavelength_m",
]
