"""How a full-field image (a hologram) is cut into the engine's tiles (the paper's tiling
approach, Sec. 2.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tiling:
    """How each hologram ``[H, W]`` is cut: ``n = (n_y, n_x)`` tiles of ``tile = (t_y, t_x)``
    (row-major; the last row and column may reach past the hologram, those pixels masked)."""

    holo: tuple[int, int]
    tile: tuple[int, int]
    n: tuple[int, int]

    @classmethod
    def for_hologram(cls, holo: tuple[int, int], tile_px: int) -> Tiling:
        n = tuple(max(1, math.ceil(h / tile_px)) for h in holo)
        tile = tuple(math.ceil(h / k) for h, k in zip(holo, n))  # as even as possible
        return cls(tuple(holo), tile, n)

    @property
    def per_hologram(self) -> int:
        return self.n[0] * self.n[1]

    def corners(self, tiles: np.ndarray) -> np.ndarray:
        """``[k, 2]`` each tile's first pixel in its hologram."""
        sub = np.asarray(tiles) % self.per_hologram
        return np.stack([(sub // self.n[1]) * self.tile[0], (sub % self.n[1]) * self.tile[1]], -1)

    def hologram(self, tiles: np.ndarray) -> np.ndarray:
        return np.asarray(tiles) // self.per_hologram
