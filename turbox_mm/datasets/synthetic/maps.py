"""Vector-map annotations around the ego: lane dividers, pedestrian crossings, road boundaries.

The same shapes MapTR's and SparseDrive's converters extract from the nuScenes map expansion:
polylines in the LIDAR_TOP frame (x right, y forward), clipped to a patch of 30 m across by
60 m along the car. A crossing is its outline (a closed ring) clipped to the patch, a boundary
is a kerb line, a divider is a lane line (the centre line, lane lines, lane-edge lines).
"""
import numpy as np
from shapely.geometry import LineString, MultiLineString, box
from shapely.ops import linemerge

from .geometry import apply, invert
from .road import CARRIAGEWAY, KERB, LANE_WIDTH, Road

MAP_CLASSES = ('divider', 'ped_crossing', 'boundary')  # MapTR's order
ROI_SIZE = (30.0, 60.0)  # (across = lidar x, along = lidar y), metres
DIVIDERS = (0.0, -LANE_WIDTH, LANE_WIDTH, -CARRIAGEWAY, CARRIAGEWAY)
BOUNDARIES = (-KERB, KERB)


def vector_map(road: Road, ego_s: float, lidar2global: np.ndarray, roi_size=ROI_SIZE) -> dict:
    """Map elements around the ego, in the lidar frame.

    Args:
        road (Road): The street.
        ego_s (float): The ego's arc length (where to look).
        lidar2global (np.ndarray): 4x4 lidar pose.
        roi_size (tuple[float, float]): Patch size ``(x extent, y extent)`` in metres, centred
            on the lidar. Defaults to (30, 60).

    Returns:
        dict: ``{class: [polyline, ...]}`` for each of :data:`MAP_CLASSES`, a polyline being a
        list of ``[x, y]`` (plain floats, millimetre precision).
    """
    global2lidar = invert(lidar2global)
    reach = float(np.hypot(*roi_size)) / 2 + KERB + 5.0
    s0, s1 = ego_s - reach, ego_s + reach
    patch = box(-roi_size[0] / 2, -roi_size[1] / 2, roi_size[0] / 2, roi_size[1] / 2)

    def clipped(global_xy: np.ndarray) -> list:
        if len(global_xy) < 2:
            return []
        xyz = np.concatenate([global_xy, np.zeros((len(global_xy), 1))], axis=1)
        local = apply(global2lidar, xyz)[:, :2]
        return _pieces(LineString(local).intersection(patch))

    annos = {name: [] for name in MAP_CLASSES}
    for d in DIVIDERS:
        annos['divider'] += clipped(road.polyline(d, s0, s1))
    for centre in road.crossings:
        if s0 - 5 < centre < s1 + 5:
            ring = road.band(-KERB, KERB, centre - 2.0, centre + 2.0, step=4.0)
            annos['ped_crossing'] += clipped(np.concatenate([ring, ring[:1]]))
    for d in BOUNDARIES:
        annos['boundary'] += clipped(road.polyline(d, s0, s1))
    return annos


def _pieces(geometry) -> list:
    """Polylines of a clipped geometry, merged where they touch and lightly simplified."""
    if geometry.is_empty:
        return []
    if isinstance(geometry, MultiLineString):
        geometry = linemerge(geometry)
    lines = list(geometry.geoms) if hasattr(geometry, 'geoms') else [geometry]
    out = []
    for line in lines:
        if not isinstance(line, LineString) or line.length < 0.5:
            continue
        coords = np.asarray(line.simplify(0.02).coords)
        out.append(np.round(coords, 3).tolist())
    return out
