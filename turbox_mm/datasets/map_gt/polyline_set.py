"""Many polylines in flat arrays, with a coarse spatial index over runs of their edges.

A :class:`PolylineSet` holds open lines and closed rings (a ring repeats its first point at
the end); edge ``e`` goes from ``points[e]`` to ``points[e + 1]`` for every point index ``e``
that is not the last of its polyline. Edges are grouped in chunks of at most ``chunk``
consecutive edges of one polyline, each with its bounding box, so a query for a region
touches only the chunks whose boxes meet it: a city-sized ring costs a few chunks per
sample, not its whole length.
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class PolylineSet:
    """Polylines in flat arrays.

    Attributes:
        points (np.ndarray): ``(P, 2)`` float64 vertices, polyline after polyline.
        offsets (np.ndarray): ``(L + 1,)`` int64: polyline ``l`` is
            ``points[offsets[l]:offsets[l + 1]]``.
        closed (np.ndarray): ``(L,)`` bool: a ring (its last point equals its first).
        chunk_start (np.ndarray): ``(C,)`` int64 first edge of each chunk.
        chunk_stop (np.ndarray): ``(C,)`` int64 one past the last edge of each chunk.
        chunk_bounds (np.ndarray): ``(C, 4)`` ``[xmin, ymin, xmax, ymax]`` of each chunk.
    """
    points: np.ndarray
    offsets: np.ndarray
    closed: np.ndarray
    chunk_start: np.ndarray
    chunk_stop: np.ndarray
    chunk_bounds: np.ndarray

    @classmethod
    def build(cls, polylines: list, closed: list, chunk: int = 32) -> 'PolylineSet':
        """Pack polylines (each ``(k, 2)``, ``k >= 2``; rings already closed).

        Args:
            polylines (list[np.ndarray]): The polylines.
            closed (list[bool]): Which are rings.
            chunk (int): Edges per chunk of the index. Defaults to 32.
        """
        counts = np.array([len(p) for p in polylines], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        points = (np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in polylines])
                  if polylines else np.zeros((0, 2)))
        starts, stops = [], []
        for first, end in zip(offsets[:-1], offsets[1:]):
            edges = np.arange(first, end - 1)
            starts.append(edges[::chunk])
            stops.append(np.minimum(edges[::chunk] + chunk, end - 1))
        chunk_start = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)
        chunk_stop = np.concatenate(stops).astype(np.int64) if stops else np.zeros(0, np.int64)
        bounds = np.zeros((len(chunk_start), 4))
        for c, (first, stop) in enumerate(zip(chunk_start, chunk_stop)):
            span = points[first:stop + 1]
            bounds[c, :2], bounds[c, 2:] = span.min(0), span.max(0)
        return cls(points, offsets, np.asarray(closed, dtype=bool).reshape(-1), chunk_start,
                   chunk_stop, bounds)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def candidate_edges(self, bounds: np.ndarray) -> np.ndarray:
        """Sorted ids of the edges in chunks whose boxes meet ``[xmin, ymin, xmax, ymax]``
        (a superset of the edges that meet the region)."""
        b = self.chunk_bounds
        hit = np.flatnonzero((b[:, 0] <= bounds[2]) & (b[:, 2] >= bounds[0])
                             & (b[:, 1] <= bounds[3]) & (b[:, 3] >= bounds[1]))
        if len(hit) == 0:
            return np.zeros(0, np.int64)
        lengths = self.chunk_stop[hit] - self.chunk_start[hit]
        steps = np.ones(int(lengths.sum()), np.int64)
        firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        steps[firsts[1:]] = self.chunk_start[hit][1:] - self.chunk_stop[hit][:-1] + 1
        steps[0] = self.chunk_start[hit][0]
        return np.cumsum(steps)

    def polyline_of(self, edges: np.ndarray) -> np.ndarray:
        """The polyline index of each edge (or point) id."""
        return np.searchsorted(self.offsets, edges, side='right') - 1
