"""The ground: a top-down raster of surface materials (asphalt, paint, sidewalk, grass).

One raster per scene, in a frame aligned with the ego's path. The cameras see it through a
homography (the ground is flat) and the lidar reads a point's intensity from it, so lane paint
is bright in both, as on real roads.
"""
import math

import cv2
import numpy as np

from .road import CARRIAGEWAY, KERB, LANE_WIDTH, SIDEWALK, Road

GRASS, PAVEMENT, ASPHALT, WHITE_PAINT, YELLOW_PAINT, KERB_STONE = range(6)
# BGR colour, texture strength and lidar intensity (0-255) of each material.
COLOR = np.array([[62, 104, 84], [148, 150, 152], [84, 86, 90], [222, 224, 224],
                  [52, 172, 214], [172, 174, 178]], dtype=np.float32)
TEXTURE = np.array([1.6, 0.7, 1.0, 0.4, 0.4, 0.6], dtype=np.float32)
INTENSITY = np.array([14.0, 24.0, 7.0, 95.0, 70.0, 30.0], dtype=np.float32)
_SHIFT = 3  # sub-pixel bits for cv2 drawing


def noise_tile(rng: np.random.Generator, size: int = 1024) -> np.ndarray:
    """Multi-scale value noise, zero mean, roughly unit-amplitude features at every scale.

    Args:
        rng (np.random.Generator): Source of the noise.
        size (int): Side of the square tile. Defaults to 1024.

    Returns:
        np.ndarray: ``(size, size)`` float32.
    """
    tile = np.zeros((size, size), np.float32)
    for cells, amplitude in ((size, 5.0), (size // 4, 5.0), (size // 16, 7.0), (size // 64, 9.0)):
        coarse = rng.normal(0, amplitude, (cells, cells)).astype(np.float32)
        tile += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return tile


class GroundRaster:
    """Materials of the ground around a path, and their colours.

    Args:
        road (Road): The street to paint.
        path_xy (np.ndarray): ``(K, 2)`` global points the raster must surround.
        rng (np.random.Generator): Source of the texture.
        resolution (float): Metres per pixel. Defaults to 0.1.
        margin (float): Metres of ground kept around the path. Defaults to 100.
    """

    def __init__(self, road: Road, path_xy: np.ndarray, rng: np.random.Generator,
                 resolution: float = 0.1, margin: float = 100.0):
        self.resolution = resolution
        delta = path_xy[-1] - path_xy[0]
        angle = math.atan2(delta[1], delta[0]) if np.hypot(*delta) > 1 else 0.0
        c, s = math.cos(angle), math.sin(angle)
        to_local = np.array([[c, s], [-s, c]])
        local = (path_xy - path_xy[0]) @ to_local.T
        low = local.min(axis=0) - margin
        high = local.max(axis=0) + margin
        self.width, self.height = (np.ceil((high - low) / resolution).astype(int) + 1)
        # global = origin + to_local.T @ (low + resolution * (u, v))
        pix2global = np.eye(3)
        pix2global[:2, :2] = to_local.T * resolution
        pix2global[:2, 2] = path_xy[0] + to_local.T @ low
        self.pix2global = pix2global
        self.global2pix = np.linalg.inv(pix2global)
        self.material = self._paint(road)
        self._rng = rng
        self._color = None

    def _to_pixels(self, xy: np.ndarray) -> np.ndarray:
        pix = xy @ self.global2pix[:2, :2].T + self.global2pix[:2, 2]
        return np.round(pix * (1 << _SHIFT)).astype(np.int32)

    def _fill(self, image, polygons, value):
        cv2.fillPoly(image, [self._to_pixels(p) for p in polygons if len(p) >= 3], int(value),
                     lineType=cv2.LINE_8, shift=_SHIFT)

    def _paint(self, road: Road) -> np.ndarray:
        """Rasterise the street's cross-section, paint and crossings."""
        image = np.full((self.height, self.width), GRASS, np.uint8)
        s0, s1 = road.s[0], road.s[-1]
        self._fill(image, [road.band(-SIDEWALK, SIDEWALK, s0, s1)], PAVEMENT)
        self._fill(image, [road.band(-KERB, KERB, s0, s1)], ASPHALT)
        for side in (-1, 1):
            self._fill(image, [road.band(side * (KERB - 0.15), side * (KERB + 0.15), s0, s1)],
                       KERB_STONE)
            self._fill(image, [road.band(side * (CARRIAGEWAY - 0.08), side * (CARRIAGEWAY + 0.08),
                                         s0, s1)], WHITE_PAINT)
            self._fill(image, [road.band(side * 0.06, side * 0.18, s0, s1)], YELLOW_PAINT)
            dashes = [road.band(side * (LANE_WIDTH - 0.075), side * (LANE_WIDTH + 0.075),
                                start, start + 3.0, step=0.5)
                      for start in np.arange(s0, s1, 12.0)]
            self._fill(image, dashes, WHITE_PAINT)
        for centre in road.crossings:
            stripes = [road.band(d, d + 0.6, centre - 2.0, centre + 2.0, step=0.5)
                       for d in np.arange(-KERB + 0.5, KERB - 0.6, 1.2)]
            self._fill(image, stripes, WHITE_PAINT)
        return image

    @property
    def color(self) -> np.ndarray:
        """BGR texture of the raster, uint8 ``(H, W, 3)``, built on first use."""
        if self._color is None:
            tile = noise_tile(self._rng)
            color = np.empty((self.height, self.width, 3), np.uint8)
            for row in range(0, self.height, 512):
                mat = self.material[row:row + 512]
                rows = np.arange(row, row + mat.shape[0]) % tile.shape[0]
                cols = np.arange(self.width) % tile.shape[1]
                noise = tile[rows][:, cols] * TEXTURE[mat]
                color[row:row + 512] = np.clip(COLOR[mat] + noise[..., None], 0, 255)
            self._color = color
        return self._color

    def materials_at(self, xy: np.ndarray) -> np.ndarray:
        """Material of the ground at global points ``(N, 2)`` (grass outside the raster)."""
        pix = xy @ self.global2pix[:2, :2].T + self.global2pix[:2, 2]
        u = np.floor(pix[:, 0] + 0.5).astype(np.int64)  # pixel centres are at integers
        v = np.floor(pix[:, 1] + 0.5).astype(np.int64)
        inside = (u >= 0) & (u < self.width) & (v >= 0) & (v < self.height)
        out = np.full(len(xy), GRASS, np.uint8)
        out[inside] = self.material[v[inside], u[inside]]
        return out
