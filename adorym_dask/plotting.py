"""A PNG summary of a run: object phase, probe amplitude, loss curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def object_phase(obj: np.ndarray, representation: str, *, slice_index: int = 0) -> np.ndarray:
    """Phase image ``[n_y, n_x]`` of one slice of an object ``[n_y, n_x, n_z, 2]``.

    For delta/beta objects the phase is ``-delta`` (proportional to the phase shift).
    """
    s = obj[:, :, slice_index]
    if representation == "real_imag":
        return np.angle(s[..., 0] + 1j * s[..., 1])
    return -s[..., 0]


def save_summary_png(
    path: str | Path, *, obj: np.ndarray, representation: str, probe: np.ndarray, loss: list[float]
) -> Path:
    """Write phase, probe and loss panels to ``path``.

    Parameters
    ----------
    obj : ndarray
        ``[n_y, n_x, n_z, 2]`` object.
    probe : ndarray
        ``[M, py, px]`` complex probe.
    loss : list of float
        Loss per epoch.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    im = ax[0].imshow(object_phase(obj, representation), cmap="gray")
    ax[0].set_title("object phase (rad)" if representation == "real_imag" else "-delta")
    fig.colorbar(im, ax=ax[0])
    im = ax[1].imshow(np.abs(probe[0]), cmap="viridis")
    ax[1].set_title(f"probe |mode 0| of {probe.shape[0]}")
    fig.colorbar(im, ax=ax[1])
    ax[2].semilogy(np.arange(1, len(loss) + 1), loss, "o-")
    ax[2].set_xlabel("epoch")
    ax[2].set_title("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
