"""A face drawing as an ordered list of shapes, projected through a head pose in one batch and drawn with PIL.

Shapes are given in canonical face coordinates (image-width units, origin at the image centre, y down).
A point either lies on the front of the head ellipsoid (``lift`` = height above that surface; yaw and pitch
slide it sideways/up as a 3-D point would) or on the head's silhouette (``lift=None``; yaw and pitch only
narrow it, like the outline of a turning ellipsoid). Collecting every shape first and projecting all points
with a few vectorised operations keeps per-image Python overhead low.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.synthetic.identity import Nuisance

HEAD_DEPTH = 0.32  # ellipsoid half-depth in image-width units


class Pose:
    """Head ellipsoid plus the nuisance pose: maps canonical points to canvas pixels."""

    def __init__(self, params: dict[str, float], nuisance: Nuisance, canvas: int):
        self.a, self.b, self.cy = params["face_w"] * 1.05, params["face_h"], params["face_cy"]
        self.canvas, self.scale = canvas, nuisance.scale
        self.yaw = (np.cos(nuisance.yaw), np.sin(nuisance.yaw))
        self.pitch = (np.cos(nuisance.pitch), np.sin(nuisance.pitch))
        # silhouette half-axes of the rotated ellipsoid, relative to the frontal ones
        self.kx = float(np.hypot(self.yaw[0], HEAD_DEPTH / self.a * self.yaw[1]))
        self.ky = float(np.hypot(self.pitch[0], HEAD_DEPTH / self.b * self.pitch[1]))
        cr, sr = np.cos(nuisance.roll), np.sin(nuisance.roll)
        self.linear = canvas * nuisance.scale * np.array([[cr, -sr], [sr, cr]])
        self.offset = canvas * (0.5 + np.asarray(nuisance.shift))

    def project(self, pts: np.ndarray, lift: np.ndarray) -> np.ndarray:
        """(M, 2) canonical points -> (M, 2) canvas pixels; NaN lift marks silhouette points."""
        x, y = pts[:, 0], pts[:, 1] - self.cy
        r = 1.0 - (x / self.a) ** 2 - (y / self.b) ** 2
        z = HEAD_DEPTH * np.sqrt(np.maximum(r, 0.0)) + lift
        (cy, sy), (cp, sp) = self.yaw, self.pitch
        depth = z * cy - x * sy
        surface_x, surface_y = x * cy + z * sy, y * cp - depth * sp
        silhouette = np.isnan(lift)
        xy = np.stack([np.where(silhouette, x * self.kx, surface_x),
                       self.cy + np.where(silhouette, y * self.ky, surface_y)], 1)
        return xy @ self.linear.T + self.offset


class Scene:
    """Shapes in drawing order; `draw` projects all points at once and paints them."""

    def __init__(self) -> None:
        self._points: list[np.ndarray] = []
        self._lifts: list[np.ndarray] = []
        self._colours: list[np.ndarray] = []
        self._shapes: list[tuple[str, int, int, float]] = []  # kind, start, stop, width or radius
        self._count = 0

    def _add(self, kind: str, pts: np.ndarray, colour: np.ndarray, lift, extra: float) -> int:
        n = len(pts)
        self._points.append(pts)
        if lift is None:
            lift = np.nan
        self._lifts.append(np.full(n, lift) if np.isscalar(lift) else np.asarray(lift, float))
        self._colours.append(colour)
        self._shapes.append((kind, self._count, self._count + n, extra))
        self._count += n
        return len(self._shapes) - 1

    def polygon(self, pts: np.ndarray, colour: np.ndarray, lift=0.0, outline: float = 0.0) -> int:
        """Filled polygon (or its outline, ``outline`` wide in image-width units); returns its shape id."""
        return self._add("polygon", pts, colour, lift, outline)

    def line(self, pts: np.ndarray, colour: np.ndarray, lift=0.0, width: float = 0.008) -> int:
        return self._add("line", pts, colour, lift, width)

    def dot(self, centre: np.ndarray, radius: float, colour: np.ndarray, lift=0.0) -> int:
        return self._add("dot", np.asarray(centre, float).reshape(1, 2), colour, lift, radius)

    def draw(self, pose: Pose, image: Image.Image) -> np.ndarray:
        """Paint every shape onto ``image``; returns the projected points (for `shape_points`)."""
        projected = pose.project(np.concatenate(self._points), np.concatenate(self._lifts))
        flat = projected.ravel().tolist()
        colours = np.clip(np.rint(np.array(self._colours)), 0, 255).astype(np.int64).tolist()
        pixels_per_unit = pose.canvas * pose.scale
        painter = ImageDraw.Draw(image)
        for (kind, start, stop, extra), colour in zip(self._shapes, colours):
            xy, fill = flat[2 * start: 2 * stop], tuple(colour)
            if kind == "dot":
                r = max(extra * pixels_per_unit, 0.6)
                painter.ellipse((xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r), fill=fill)
            elif kind == "line":
                painter.line(xy, fill=fill, width=max(1, round(extra * pixels_per_unit)))
            elif extra:
                painter.polygon(xy, outline=fill, width=max(1, round(extra * pixels_per_unit)))
            else:
                painter.polygon(xy, fill=fill)
        self._projected = projected
        return projected

    def shape_points(self, shape_id: int) -> np.ndarray:
        """Canvas points of one shape after `draw`."""
        _, start, stop, _ = self._shapes[shape_id]
        return self._projected[start:stop]
