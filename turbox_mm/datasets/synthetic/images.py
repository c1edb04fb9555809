"""Camera images: the flat textured ground, sky, and boxes painted far to near, as JPEG.

The renderer is a painter's algorithm over boxes (buildings, trees, street lights and the
agents), each face shaded by a fixed sun, hazed with distance, and decorated by class (windows,
wheels and lights on vehicles; heads on pedestrians; stripes on cones and barriers) so that a
detector has something to learn, and the projection matches ``cam2img`` and ``lidar2cam``
exactly. Sensor noise on top gives the JPEGs the size of real camera images.
"""
import math

import cv2
import numpy as np

from .agents import LABEL
from .cameras import Camera
from .geometry import invert
from .ground import COLOR, GRASS, GroundRaster, noise_tile
from .road import BUILDING, CROWN

NEAR = 0.3  # m, near clipping plane
HAZE = np.array([205.0, 198.0, 192.0])  # BGR
ZENITH = np.array([190.0, 140.0, 95.0])
FOG_DISTANCE = 220.0  # m at which 63 % of a colour is haze
SUN = np.array([0.35, 0.45, 0.82]) / np.linalg.norm([0.35, 0.45, 0.82])
_SHIFT = 4  # sub-pixel bits for cv2 drawing

# Corner k of a box has x = +l/2 if k & 1, y = +w/2 if k & 2, z = +h/2 if k & 4.
_CORNER_SIGNS = np.array([[1 if k & 1 else -1, 1 if k & 2 else -1, 1 if k & 4 else -1]
                          for k in range(8)], dtype=np.float64)
# Faces as corners (u, v) = (0, 0), (1, 0), (1, 1), (0, 1); v runs upwards on side faces, and
# u runs from the front to the back on both long sides.
FRONT, BACK, LEFT, RIGHT, TOP, BOTTOM = range(6)
_FACES = np.array([[1, 3, 7, 5], [2, 0, 4, 6], [3, 2, 6, 7], [1, 0, 4, 5], [4, 5, 7, 6],
                   [0, 1, 3, 2]])
_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                    dtype=np.float64)
_GLASS, _TYRE, _HEADLIGHT, _TAILLIGHT = (70, 55, 45), (25, 25, 28), (200, 235, 245), (30, 30, 200)
_SKIN, _TROUSERS, _WHITE, _RED = (120, 150, 190), (50, 40, 35), (235, 235, 235), (40, 40, 200)
_SEAM, _STRIPE_BLUE, _STRIPE_RED = (60, 60, 60), (150, 80, 20), (40, 40, 180)


def _rects(*rows):
    return [(face, u0, u1, v0, v1, color) for face, u0, u1, v0, v1, color in rows]


def _sides(u0, u1, v0, v1, color):
    return [(LEFT, u0, u1, v0, v1, color), (RIGHT, u0, u1, v0, v1, color)]


def _all_sides(u0, u1, v0, v1, color):
    return [(f, u0, u1, v0, v1, color) for f in (FRONT, BACK, LEFT, RIGHT)]


def _panels(u0, u1, color, stripe):
    """Cargo-box sides: vertical seams every ~10 % of the length and a painted stripe."""
    seams = [r for u in np.arange(u0, u1, 0.1) for r in _sides(u, u + 0.008, 0.2, 0.98, color)]
    return seams + _sides(u0, u1, 0.3, 0.36, stripe)


def _lights(v0, v1):
    return _rects((FRONT, 0.06, 0.2, v0, v1, _HEADLIGHT), (FRONT, 0.8, 0.94, v0, v1, _HEADLIGHT),
                  (BACK, 0.06, 0.2, v0, v1, _TAILLIGHT), (BACK, 0.8, 0.94, v0, v1, _TAILLIGHT))


# Decorations of each class: (face, u0, u1, v0, v1, BGR colour).
DETAILS = {
    LABEL['car']: (_sides(0.25, 0.75, 0.58, 0.9, _GLASS) + _sides(0.12, 0.26, 0, 0.3, _TYRE)
                   + _sides(0.74, 0.88, 0, 0.3, _TYRE) + _lights(0.35, 0.48)
                   + _rects((FRONT, 0.08, 0.92, 0.6, 0.9, _GLASS),
                            (BACK, 0.1, 0.9, 0.62, 0.88, _GLASS))),
    LABEL['truck']: (_sides(0.02, 0.2, 0.6, 0.86, _GLASS) + _sides(0.06, 0.17, 0, 0.22, _TYRE)
                     + _sides(0.7, 0.8, 0, 0.22, _TYRE) + _sides(0.82, 0.92, 0, 0.22, _TYRE)
                     + _panels(0.25, 0.98, _SEAM, _STRIPE_BLUE)
                     + _lights(0.2, 0.3) + _rects((FRONT, 0.08, 0.92, 0.6, 0.88, _GLASS),
                                                  (BACK, 0.49, 0.51, 0.2, 0.95, _SEAM))),
    LABEL['trailer']: (_sides(0.72, 0.8, 0, 0.18, _TYRE) + _sides(0.83, 0.91, 0, 0.18, _TYRE)
                       + _panels(0.02, 0.98, _SEAM, _STRIPE_RED) + _lights(0.15, 0.24)
                       + _rects((BACK, 0.49, 0.51, 0.2, 0.95, _SEAM))),
    LABEL['bus']: (_sides(0.05, 0.95, 0.45, 0.85, _GLASS) + _sides(0.12, 0.2, 0, 0.2, _TYRE)
                   + _sides(0.75, 0.83, 0, 0.2, _TYRE) + _lights(0.12, 0.2)
                   + _rects((FRONT, 0.05, 0.95, 0.35, 0.9, _GLASS),
                            (BACK, 0.1, 0.9, 0.55, 0.85, _GLASS))),
    LABEL['construction_vehicle']: (
        _sides(0.05, 0.3, 0.55, 0.88, _GLASS) + _sides(0.05, 0.25, 0, 0.35, _TYRE)
        + _sides(0.72, 0.92, 0, 0.35, _TYRE) + _rects((FRONT, 0.1, 0.9, 0.55, 0.88, _GLASS))),
    LABEL['bicycle']: (_sides(0.0, 0.32, 0, 0.55, _TYRE) + _sides(0.68, 1.0, 0, 0.55, _TYRE)
                       + _all_sides(0.35, 0.65, 0.55, 1.0, _TROUSERS)),
    LABEL['motorcycle']: (_sides(0.0, 0.3, 0, 0.45, _TYRE) + _sides(0.7, 1.0, 0, 0.45, _TYRE)
                          + _all_sides(0.35, 0.7, 0.5, 1.0, _TROUSERS) + _lights(0.4, 0.5)),
    LABEL['pedestrian']: (_all_sides(0.0, 1.0, 0.0, 0.45, _TROUSERS)
                          + _all_sides(0.25, 0.75, 0.86, 1.0, _SKIN)),
    LABEL['traffic_cone']: (_all_sides(0.0, 1.0, 0.45, 0.62, _WHITE)
                            + _all_sides(0.0, 1.0, 0.0, 0.08, _TYRE)),
    LABEL['barrier']: [(face, u, u + 0.2, 0.2, 1.0, _WHITE) for face in (FRONT, BACK)
                       for u in (0.1, 0.5)] + _all_sides(0.0, 1.0, 0.0, 0.15, _RED),
}


class Renderer:
    """Renders the cameras of a scene; keeps per-process textures between calls.

    Args:
        ground (GroundRaster): The scene's ground.
        seed (int): Seed of the sensor-noise texture.
        jpeg_quality (int): JPEG quality. Defaults to 90.
    """

    def __init__(self, ground: GroundRaster, seed: int, jpeg_quality: int = 90):
        self.ground = ground
        self.jpeg_quality = jpeg_quality
        rng = np.random.default_rng(seed)
        grain = rng.normal(0, 3.2, (1024, 2048)).astype(np.float32)
        blotch = cv2.resize(noise_tile(rng, 512), (2048, 1024)) * 0.35
        noise = np.clip(np.round(grain + blotch), -127, 127).astype(np.int16)
        self._grain_up = np.repeat(np.clip(noise, 0, None).astype(np.uint8)[..., None], 3, 2)
        self._grain_down = np.repeat(np.clip(-noise, 0, None).astype(np.uint8)[..., None], 3, 2)
        self._skies = {}
        self._windows = {}  # window tables of buildings, by box index (static in a scene)

    def render(self, camera: Camera, ego2global: np.ndarray, boxes: dict,
               rng: np.random.Generator) -> np.ndarray:
        """Render one image.

        Args:
            camera (Camera): The camera.
            ego2global (np.ndarray): 4x4 ego pose at the image's timestamp.
            boxes (dict): The scene's boxes at that time, from ``Scene.all_boxes``.
            rng (np.random.Generator): Source of the image's sensor noise.

        Returns:
            np.ndarray: BGR image, uint8 ``(height, width, 3)``.
        """
        global2cam = invert(ego2global @ camera.cam2ego)
        image = self._background(camera, global2cam)
        self._draw_boxes(image, camera, global2cam, boxes)
        image = cv2.GaussianBlur(image, (3, 3), 0.6)
        return self._add_grain(image, rng)

    def encode(self, image: np.ndarray) -> bytes:
        """JPEG bytes of an image."""
        ok, data = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        assert ok, 'JPEG encoding failed'
        return data.tobytes()

    # --- background ------------------------------------------------------------------------
    def _sky(self, camera: Camera) -> dict:
        """What of the background depends on the camera alone, computed once per camera.

        The ego only yaws on flat ground, so each pixel's elevation, and the distance at which
        its ray meets the ground, are fixed by the camera's mounting.
        """
        if camera.name not in self._skies:
            width, height = camera.width, camera.height
            k_inv = np.linalg.inv(camera.intrinsic)
            # Up-component of the ray through (u, v).
            a, b, c = (camera.cam2ego[2, :3] @ k_inv).astype(np.float32)
            k_inv = k_inv.astype(np.float32)
            u = np.arange(width, dtype=np.float32)
            v = np.arange(height, dtype=np.float32)[:, None]
            ray_x = k_inv[0, 0] * u + k_inv[0, 2]
            ray_y = k_inv[1, 1] * v + k_inv[1, 2]
            elevation = (a * u + b * v + c) / np.sqrt(ray_x ** 2 + ray_y ** 2 + 1.0)
            below = elevation < -1e-4
            rows = np.flatnonzero(below.any(axis=1))
            top = int(rows[0]) if len(rows) else height
            distance = np.float32(camera.cam2ego[2, 3]) / np.maximum(-elevation, 1e-4)
            fog = 1.0 - np.exp(-distance / np.float32(FOG_DISTANCE))
            weight = np.where(below, 1.0 - fog, 0.0)[top:]
            sky = np.clip(elevation * 4.0, 0, 1)[..., None]
            backdrop = np.where(below[..., None], HAZE.astype(np.float32),
                                HAZE.astype(np.float32) * (1 - sky)
                                + ZENITH.astype(np.float32) * sky)
            self._skies[camera.name] = dict(
                top=top, backdrop=np.clip(backdrop, 0, 255).astype(np.uint8),
                ground_weight=np.ascontiguousarray(weight, dtype=np.float32),
                backdrop_weight=np.ascontiguousarray(1.0 - weight, dtype=np.float32))
        return self._skies[camera.name]

    def _background(self, camera: Camera, global2cam) -> np.ndarray:
        """Sky above the horizon, hazed ground texture below it."""
        sky = self._sky(camera)
        image = sky['backdrop'].copy()
        top = sky['top']
        if top >= camera.height:
            return image
        homography = camera.intrinsic @ np.column_stack(
            [global2cam[:3, 0], global2cam[:3, 1], global2cam[:3, 3]]) @ self.ground.pix2global
        shift = np.array([[1.0, 0, 0], [0, 1, -top], [0, 0, 1]])
        ground = cv2.warpPerspective(
            self.ground.color, shift @ homography, (camera.width, camera.height - top),
            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
            borderValue=tuple(float(x) for x in COLOR[GRASS]))
        image[top:] = cv2.blendLinear(ground, image[top:], sky['ground_weight'],
                                      sky['backdrop_weight'])
        return image

    def _add_grain(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Add sensor grain: a random window of a fixed noise texture."""
        height, width = image.shape[:2]
        y = int(rng.integers(0, max(1, self._grain_up.shape[0] - height + 1)))
        x = int(rng.integers(0, max(1, self._grain_up.shape[1] - width + 1)))
        up = _fit(self._grain_up[y:y + height, x:x + width], height, width)
        down = _fit(self._grain_down[y:y + height, x:x + width], height, width)
        return cv2.subtract(cv2.add(image, up), down)

    # --- boxes -----------------------------------------------------------------------------
    def _draw_boxes(self, image, camera: Camera, global2cam, boxes: dict) -> None:
        """Paint the boxes in view, farthest first, each as faces then decorations."""
        corners = box_corners(boxes['center'], boxes['size'], boxes['yaw'])
        cam = corners @ global2cam[:3, :3].T + global2cam[:3, 3]
        visible = _in_frustum(cam, camera)
        distance = np.linalg.norm(cam[visible].mean(axis=1), axis=1)
        order = visible[np.argsort(-distance, kind='stable')]
        normals = np.einsum('nij,fj->nfi', _yaw_rotations(boxes['yaw'][order]), _NORMALS)
        light = 0.55 + 0.45 * np.clip(normals @ SUN, 0, None)  # (n, 6)
        polygons, colors = [], []
        for i, b in enumerate(order):
            quads = cam[b][_FACES]  # (6, 4, 3)
            normal_cam = normals[i] @ global2cam[:3, :3].T
            shown = np.einsum('fi,fi->f', normal_cam, quads.mean(axis=1)) < 0
            fog = 1.0 - math.exp(-float(np.linalg.norm(quads.mean(axis=(0, 1)))) / FOG_DISTANCE)
            agent = int(boxes['agent'][b])
            base = boxes['color'][b].astype(np.float64)
            if agent >= 0:  # a shadow on the road around the agent's footprint
                footprint = quads[BOTTOM]
                middle = footprint.mean(axis=0)
                polygons.append((middle + 1.15 * (footprint - middle))[None])
                colors.append(_haze(np.array([[48.0, 48.0, 50.0]]), fog))
            faces = np.flatnonzero(shown)
            shade = light[i, faces][:, None] * (0.9 if agent == -1 - CROWN else 1.0)
            polygons.append(quads[faces])
            colors.append(_haze(base[None] * shade, fog))
            if agent >= 0:
                table = DETAIL_TABLES.get(int(boxes['label'][b]))
            elif agent == -1 - BUILDING:
                if b not in self._windows:
                    self._windows[b] = _window_table(boxes['size'][b])
                table = self._windows[b]
            else:
                table = None
            if table is not None:
                keep = shown[table['face']]
                if keep.any():
                    face = table['face'][keep]
                    polygons.append(np.einsum('dkc,dcx->dkx', table['weights'][keep],
                                              quads[face]))
                    colors.append(_haze(table['color'][keep] * light[i, face][:, None], fog))
        if polygons:
            self._fill_all(image, camera, np.concatenate(polygons), np.concatenate(colors))

    def _fill_all(self, image, camera: Camera, polygons: np.ndarray, colors: np.ndarray):
        """Fill convex camera-frame quads in order, clipping those that cross the near plane."""
        crossing = (polygons[..., 2] < NEAR).any(axis=1)
        depth = np.maximum(polygons[..., 2:3], NEAR)
        pixels = (polygons @ camera.intrinsic.T)[..., :2] / depth
        points = np.round(np.clip(pixels, -1e5, 1e5) * (1 << _SHIFT)).astype(np.int32)
        color_list = colors.tolist()
        for q in range(len(polygons)):
            if crossing[q]:
                clipped = _clip_near(polygons[q])
                if len(clipped) < 3:
                    continue
                projected = clipped @ camera.intrinsic.T
                pts = np.round(np.clip(projected[:, :2] / projected[:, 2:3], -1e5, 1e5)
                               * (1 << _SHIFT)).astype(np.int32)
            else:
                pts = points[q]
            cv2.fillConvexPoly(image, pts, color_list[q], cv2.LINE_AA, _SHIFT)


def box_corners(center: np.ndarray, size: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """The 8 corners ``(N, 8, 3)`` of boxes given by gravity centre, ``(l, w, h)`` and yaw."""
    local = _CORNER_SIGNS[None] * size[:, None, :] / 2
    return np.einsum('nij,nkj->nki', _yaw_rotations(yaw), local) + center[:, None, :]


def _yaw_rotations(yaw: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.zeros((len(yaw), 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = c, -s, s, c
    rot[:, 2, 2] = 1
    return rot


def _in_frustum(corners_cam: np.ndarray, camera: Camera) -> np.ndarray:
    """Indices of boxes that may show in the image (conservative)."""
    z = corners_cam[..., 2]
    k = camera.intrinsic
    x_lo = -k[0, 2] / k[0, 0] * z
    x_hi = (camera.width - k[0, 2]) / k[0, 0] * z
    y_lo = -k[1, 2] / k[1, 1] * z
    y_hi = (camera.height - k[1, 2]) / k[1, 1] * z
    x, y = corners_cam[..., 0], corners_cam[..., 1]
    outside = ((z < NEAR).all(axis=1) | (x < x_lo).all(axis=1) | (x > x_hi).all(axis=1)
               | (y < y_lo).all(axis=1) | (y > y_hi).all(axis=1))
    return np.flatnonzero(~outside & (z.max(axis=1) < 400))


def _clip_near(polygon: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a polygon against ``z >= NEAR``."""
    out = []
    count = len(polygon)
    for i in range(count):
        p, q = polygon[i], polygon[(i + 1) % count]
        p_in, q_in = p[2] >= NEAR, q[2] >= NEAR
        if p_in:
            out.append(p)
        if p_in != q_in:
            t = (NEAR - p[2]) / (q[2] - p[2])
            out.append(p + t * (q - p))
    return np.array(out).reshape(-1, 3)


def _detail_table(rects) -> dict:
    """Vectorised form of decoration rectangles: face, bilinear weights and colour."""
    rects = list(rects)
    face = np.array([r[0] for r in rects], dtype=np.int64)
    weights = np.empty((len(rects), 4, 4))
    for i, (_, u0, u1, v0, v1, _) in enumerate(rects):
        for k, (u, v) in enumerate(((u0, v0), (u1, v0), (u1, v1), (u0, v1))):
            weights[i, k] = ((1 - u) * (1 - v), u * (1 - v), u * v, (1 - u) * v)
    color = np.array([r[5] for r in rects], dtype=np.float64)
    return dict(face=face, weights=weights, color=color)


def _window_table(size: np.ndarray) -> dict:
    """Windows of a building: one per 3.5 m floor and 3 m bay on each side."""
    faces, weights = [], []
    for face in (FRONT, BACK, LEFT, RIGHT):
        face_width = size[0] if face in (LEFT, RIGHT) else size[1]
        floors = max(1, int(size[2] / 3.5))
        bays = max(1, int(face_width / 3.0))
        bay, floor = np.meshgrid(np.arange(bays), np.arange(floors))
        u0, u1 = ((bay + 0.25) / bays).ravel(), ((bay + 0.75) / bays).ravel()
        v0, v1 = ((floor + 0.35) / floors).ravel(), ((floor + 0.8) / floors).ravel()
        u = np.stack([u0, u1, u1, u0], axis=1)[..., None]
        v = np.stack([v0, v0, v1, v1], axis=1)[..., None]
        weights.append(np.concatenate([(1 - u) * (1 - v), u * (1 - v), u * v, (1 - u) * v],
                                      axis=2))
        faces.append(np.full(len(u0), face))
    face = np.concatenate(faces)
    return dict(face=face, weights=np.concatenate(weights),
                color=np.broadcast_to(np.array(_GLASS, dtype=np.float64), (len(face), 3)))


DETAIL_TABLES = {label: _detail_table(rects) for label, rects in DETAILS.items()}


def _haze(color: np.ndarray, fog: float) -> np.ndarray:
    return np.clip(color * (1 - fog) + HAZE * fog, 0, 255)


def _fit(window: np.ndarray, height: int, width: int) -> np.ndarray:
    """Tile a noise window up to ``(height, width)`` when images exceed the texture."""
    if window.shape[0] >= height and window.shape[1] >= width:
        return np.ascontiguousarray(window[:height, :width])
    reps = (-(-height // window.shape[0]), -(-width // window.shape[1]), 1)
    return np.ascontiguousarray(np.tile(window, reps)[:height, :width])
