"""Draw one synthetic face image: an `Identity` under a `Nuisance`, as uint8 RGB at the requested size.

The face parts are built as polygons in canonical coordinates (`pipeline.synthetic.scene`), drawn on a canvas
``supersample_factor(size)`` times larger and box-reduced to the output size, so every size is rendered
directly and anti-aliased. Skin texture, illumination, colour cast, blur and sensor noise are applied at the
output size, where they are cheapest.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.synthetic.identity import TEXTURE_GRID, Identity, Nuisance
from pipeline.synthetic.scene import Pose, Scene

CANVAS_TARGET = 160  # the supersampled canvas is at least this wide (and at least 2x the output)
TEXTURE_SPAN = 1.1  # the identity's texture grid covers [-0.55, 0.55]^2 of the canonical face
SCLERA = np.array([236.0, 232.0, 226.0])
PUPIL = np.array([12.0, 10.0, 10.0])
MOUTH_INSIDE = np.array([60.0, 22.0, 26.0])
TEETH = np.array([228.0, 222.0, 206.0])
DARK_LENS = np.array([22.0, 22.0, 26.0])
_T9 = np.linspace(0.0, 1.0, 9)
_S9 = np.linspace(-1.0, 1.0, 9)
_S13 = np.linspace(-1.0, 1.0, 13)


def supersample_factor(size: int) -> int:
    """Canvas scale: at least 2, and enough that thin features (lids, brows) resolve at small sizes."""
    return max(2, -(-CANVAS_TARGET // size))


@lru_cache(maxsize=16)
def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], 1)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 12) -> np.ndarray:
    return _unit_circle(n) * (rx, ry) + (cx, cy)


def _band(x: np.ndarray, y_top: np.ndarray, y_bottom: np.ndarray) -> np.ndarray:
    """Polygon between two curves sampled at the same x."""
    return np.concatenate([np.stack([x, y_top], 1), np.stack([x, y_bottom], 1)[::-1]])


def face_outline(p: dict[str, float], n_side: int = 22) -> np.ndarray:
    """Closed face contour (right side top to chin, then left side), widths interpolated between knots."""
    s = np.linspace(0.0, 1.0, n_side)
    knots = [0.0, 0.05, 0.2, 0.5, 0.82, 0.95, 1.0]
    widths = [0.0, 0.6 * p["temple_w"], p["temple_w"], 1.0, p["jaw_w"], p["chin_w"], 0.0]
    x = np.interp(s, knots, widths)
    for _ in range(2):  # round off the knots
        x[1:-1] = (x[:-2] + 2 * x[1:-1] + x[2:]) / 4
    right = np.stack([x * p["face_w"], p["face_cy"] - p["face_h"] + 2.0 * p["face_h"] * s], 1)
    return np.concatenate([right, right[::-1][1:-1] * (-1.0, 1.0)])


def _below(outline: np.ndarray, y: float, top_curve: float, lift: float, scene: Scene, colour) -> None:
    """Fill the part of the face below height ``y`` (beard, mask), top edge bulging ``top_curve`` downwards."""
    lower = outline[outline[:, 1] > y]
    lower = lower[np.argsort(np.arctan2(lower[:, 1] - y, lower[:, 0]))]  # right -> chin -> left
    xs = np.linspace(lower[-1, 0], lower[0, 0], 9)
    top = np.stack([xs, y + top_curve * (1 - (xs / np.abs(xs).max()) ** 2)], 1)
    n = len(lower)
    scene.polygon(np.concatenate([lower, top]), colour, np.concatenate([np.full(n, np.nan), np.full(9, lift)]))


def _cap(p: dict, y_side: float, y_top: float, power: float, volume: float, wave: float) -> tuple:
    """Hair or hat: an arc over the head down to ``y_side``, inner edge across the forehead at ``y_top``."""
    big_a, big_b = p["face_w"] * (1.03 + volume), p["face_h"] + volume
    reach = np.arccos(np.clip((p["face_cy"] - y_side) / big_b, -1.0, 1.0))
    angles = np.linspace(-reach, reach, 16)
    outer = np.stack([big_a * np.sin(angles), p["face_cy"] - big_b * np.cos(angles)], 1)
    x_side = p["face_w"] * 0.97
    x = np.linspace(x_side, -x_side, 17)
    part = p["hair_part"]
    rel = np.clip(np.abs(x - part * x_side) / (x_side * (1 + abs(part))), 0.0, 1.0)
    y = y_top + (y_side - y_top) * rel**power + wave * np.sin(38.0 * x + 20.0 * part)
    lift = np.concatenate([np.full(16, np.nan), np.full(17, 0.01)])
    return np.concatenate([outer, np.stack([x, y], 1)]), lift


def _hair(scene: Scene, ident: Identity, n: Nuisance, back: bool) -> None:
    p, style, hair = ident.params, ident.hair_style, ident.hair_rgb
    volume = max(p["hair_volume"] + n.hair_jitter, 0.0)
    if back:
        if style == "long":
            a, b = p["face_w"] * (1.08 + volume), p["face_h"] + volume
            bottom = p["eye_y"] + 0.2 + max(p["hair_length"], 0.0)
            arc = np.linspace(-np.pi / 2, np.pi / 2, 14)
            top = np.stack([a * np.sin(arc), p["face_cy"] - b * np.cos(arc)], 1)
            scene.polygon(np.concatenate([top, [[a * 1.05, bottom], [-a * 1.05, bottom]]]), hair * 0.8, None)
        return
    if style == "bald":
        return
    brow_y = p["eye_y"] - p["brow_gap"]
    if style == "fringe":
        y_top, power, wave = brow_y - 0.03 - max(p["fringe"], 0.0), 6.0, 2 * abs(p["hair_wave"])
    else:
        y_top, power, wave = p["hairline"], 2.5, abs(p["hair_wave"])
    y_side = p["ear_y"] - 0.02 if style == "long" else p["eye_y"] - 0.01
    colour = 0.55 * hair + 0.45 * ident.skin_rgb if style == "buzz" else hair
    pts, lift = _cap(p, y_side, y_top, power, 0.0 if style == "buzz" else volume, wave)
    scene.polygon(pts, colour, lift)


def _eyes(scene: Scene, ident: Identity, n: Nuisance) -> None:
    p = ident.params
    for side in (-1.0, 1.0):
        ex, ey, ew = side * p["eye_dx"], p["eye_y"], p["eye_w"]
        eh = ew * p["eye_open"] * n.eye_open
        xs = ex - ew + 2 * ew * _T9
        arc = np.sin(np.pi * _T9)
        y_mid = ey - p["eye_tilt"] * (xs - ex) * side
        upper, lower = y_mid - eh * arc**0.8, y_mid + 0.75 * eh * arc
        scene.polygon(_band(xs, upper, lower), SCLERA)
        ir = p["iris_r"] * ew
        cx, cy = ex + n.gaze[0] * ew, ey + n.gaze[1] * eh
        scene.polygon(_ellipse(cx, cy, ir, ir), ident.eye_rgb)
        scene.polygon(_ellipse(cx, cy, 0.45 * ir, 0.45 * ir, 10), PUPIL)
        scene.polygon(_band(xs, upper - 1.3 * ew, upper), ident.skin_rgb * 0.93)  # lid hides the iris top
        scene.polygon(_band(xs, lower, lower + 0.9 * ew), ident.skin_rgb)
        scene.polygon(_band(xs, upper - 0.012, upper), ident.hair_rgb * 0.4)  # lash line


def _brows(scene: Scene, ident: Identity, n: Nuisance) -> None:
    p, t = ident.params, _S9  # inner end -> outer end
    frown = min(n.brow_raise, 0.0)
    half = p["brow_thick"] * (0.65 - 0.25 * t) * 0.5
    y = (p["eye_y"] - p["brow_gap"] - n.brow_raise - p["brow_arch"] * (1 - t * t) + p["brow_slant"] * t
         + 0.8 * frown * (1 - t))
    for side in (-1.0, 1.0):
        x = side * (p["eye_dx"] + t * p["brow_len"])
        scene.polygon(_band(x, y - half, y + half), ident.hair_rgb * 0.85, 0.005)


def _nose(scene: Scene, ident: Identity) -> None:
    p, skin = ident.params, ident.skin_rgb
    ny, nw, ey = p["nose_y"], p["nose_w"], p["eye_y"]
    shade = skin * p["nose_shade"]
    bridge = np.array([[-0.02, ey + 0.03], [-0.028, ey + 0.03], [-0.62 * nw, ny - 0.02], [-0.5 * nw, ny - 0.015]])
    scene.polygon(bridge, shade, 0.09 * np.clip((bridge[:, 1] - ey) / (ny - ey), 0.0, 1.0))
    for side in (-1.0, 1.0):
        scene.polygon(_ellipse(side * 0.8 * nw, ny, 0.35 * nw, 0.42 * nw, 10), shade, 0.04)
    scene.polygon(_ellipse(0.0, ny - 0.008, 0.55 * nw, 0.4 * nw), skin * (0.5 + 0.5 * p["nose_shade"]), 0.09)
    for side in (-1.0, 1.0):
        scene.polygon(_ellipse(side * 0.45 * nw, ny + 0.014, 0.24 * nw, 0.11 * nw, 8), skin * 0.4, 0.05)


def _mouth(scene: Scene, ident: Identity, n: Nuisance) -> None:
    p, t = ident.params, _S13
    x = t * p["mouth_w"] * (1.0 + 0.12 * n.smile)
    bulge = (1.0 - t * t) ** 0.7
    line = p["mouth_y"] - 0.028 * n.smile * t * t
    gap = 0.05 * n.mouth_open * (1.0 - t * t) ** 0.8
    top = line - p["lip_upper"] * bulge + 0.35 * p["lip_upper"] * np.exp(-((t / 0.15) ** 2))
    scene.polygon(_band(x, top, line + gap + p["lip_lower"] * bulge), ident.lip_rgb, 0.01)
    if n.mouth_open > 0.0:
        scene.polygon(_band(x, line, line + gap), MOUTH_INSIDE, 0.01)
        scene.polygon(_band(x, line, line + 0.35 * gap), TEETH, 0.01)
    else:
        scene.polygon(_band(x, line - 0.002, line + 0.003), ident.lip_rgb * 0.5, 0.01)


def _facial_hair(scene: Scene, ident: Identity, outline: np.ndarray) -> None:
    p, hair, skin = ident.params, ident.hair_rgb, ident.skin_rgb
    if p["beard"] > 0.0:
        amount = 0.25 if p["beard"] < 0.35 else 0.85  # stubble or full beard
        _below(outline, p["nose_y"] + 0.045, 0.02, 0.0, scene, amount * hair * 0.8 + (1 - amount) * skin * 0.9)
    if p["moustache"] > 0.0:
        t = _S9
        y = p["mouth_y"] - p["lip_upper"] - 0.012 + 0.01 * t * t
        half = 0.011 * (1 - 0.5 * t * t)
        scene.polygon(_band(t * p["mouth_w"] * 1.05, y - half, y + half), 0.85 * hair + 0.15 * skin, 0.02)


def _occluders(scene: Scene, ident: Identity, n: Nuisance, outline: np.ndarray) -> None:
    p = ident.params
    if n.glasses:
        frame = n.occluder_rgb * 0.3
        for side in (-1.0, 1.0):
            lens = _ellipse(side * p["eye_dx"], p["eye_y"] + 0.006, 1.5 * p["eye_w"], 1.1 * p["eye_w"], 16)
            if n.glasses == "sun":
                scene.polygon(lens, DARK_LENS, 0.05)
            scene.polygon(lens, frame, 0.05, outline=0.008)
        inner = p["eye_dx"] - 1.45 * p["eye_w"]
        scene.line(np.array([[-inner, p["eye_y"] - 0.01], [inner, p["eye_y"] - 0.01]]), frame, 0.06)
    if n.mask:
        _below(outline, p["nose_y"] - 0.035, -0.02, 0.1, scene, n.occluder_rgb)
    if n.hat:
        y_brim = p["eye_y"] - p["brow_gap"] - 0.045
        pts, lift = _cap(p, y_brim + 0.01, y_brim, 12.0, 0.09, 0.0)
        scene.polygon(pts, n.occluder_rgb * 0.8, lift)


def build_scene(ident: Identity, n: Nuisance) -> tuple[Scene, int]:
    """All shapes of one image in drawing order; also returns the face outline's shape id (skin mask)."""
    p, skin = ident.params, ident.skin_rgb
    scene = Scene()
    outline = face_outline(p)
    _hair(scene, ident, n, back=True)
    neck = np.array([[-0.6, 0.0], [0.6, 0.0], [0.65, 1.0], [-0.65, 1.0]]) * (p["jaw_w"] * p["face_w"], 1.0)
    scene.polygon(neck + (0.0, p["face_cy"] + 0.25), skin * 0.78, -0.1)
    for side in (-1.0, 1.0):
        scene.polygon(_ellipse(side * p["face_w"] * 0.98, p["ear_y"], 0.04, p["ear_size"]), skin * 0.9, -0.08)
    face_id = scene.polygon(outline, skin, None)
    for x, y, r, dark in ident.spots.tolist():
        scene.dot((x, y), r, skin * (1.0 - dark))
    _facial_hair(scene, ident, outline)
    _nose(scene, ident)
    _mouth(scene, ident, n)
    _eyes(scene, ident, n)
    _brows(scene, ident, n)
    _hair(scene, ident, n, back=False)
    _occluders(scene, ident, n, outline)
    return scene, face_id


def _texture_affine(pose: Pose, size: int) -> tuple[float, ...]:
    """PIL affine data mapping output pixels to texture-grid pixels (linearised pose)."""
    to_out = pose.linear @ np.diag([pose.kx, pose.ky]) * (size / pose.canvas)
    origin = pose.offset * (size / pose.canvas) + to_out @ np.array([-TEXTURE_SPAN / 2, -TEXTURE_SPAN / 2])
    inverse = np.linalg.inv(to_out * (TEXTURE_SPAN / TEXTURE_GRID))
    c = -inverse @ origin
    return (inverse[0, 0], inverse[0, 1], c[0], inverse[1, 0], inverse[1, 1], c[1])


@lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return g[None, :], g[:, None]


def render_face(identity: Identity, nuisance: Nuisance, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one image (uint8 RGB, size x size); ``rng`` supplies the sensor noise."""
    s = supersample_factor(size)
    pose = Pose(identity.params, nuisance, size * s)
    scene, face_id = build_scene(identity, nuisance)
    canvas = Image.new("RGB", (size * s, size * s), tuple(int(v) for v in np.clip(nuisance.background_rgb, 0, 255)))
    scene.draw(pose, canvas)
    image = canvas.reduce(s)
    if nuisance.blur > 0.0:
        image = image.filter(ImageFilter.GaussianBlur(nuisance.blur * size / 112.0))

    mask_canvas = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask_canvas).polygon(scene.shape_points(face_id).ravel().tolist(), fill=255)
    skin_mask = np.asarray(mask_canvas.reduce(s), dtype=np.float32) * (1.0 / 255.0)
    texture = Image.fromarray(identity.texture).transform(
        (size, size), Image.Transform.AFFINE, _texture_affine(pose, size), resample=Image.Resampling.BILINEAR)
    gx, gy = _unit_grid(size)
    amp, cos_a, sin_a = nuisance.gradient
    light = nuisance.brightness * (1.0 + amp * (cos_a * gx + sin_a * gy))
    shading = (1.0 + np.asarray(texture) * skin_mask) * light
    out = np.asarray(image, dtype=np.float32) * (shading[..., None] * nuisance.cast)
    if nuisance.noise > 0.0:  # luminance noise: chroma noise would mostly vanish in JPEG's subsampling
        sigma = nuisance.noise * min(1.0, size / 112.0) ** 0.5  # as if downscaled from 112
        out += (rng.standard_normal((size, size), dtype=np.float32) * sigma)[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def image_transform(identity: Identity, nuisance: Nuisance, size: int) -> np.ndarray:
    """(2, 3) similarity of `render_face`'s pose from the canonical plane (after the head's 3-D turn) to output
    pixel centres: the image's frame, whose composition with another image's inverse frame maps one render of a
    face onto another of the same face and nuisance at another scale, rotation and place."""
    s = supersample_factor(size)
    pose = Pose(identity.params, nuisance, size * s)
    return np.c_[pose.linear / s, (pose.offset - (s - 1) / 2) / s]


def face_landmarks(identity: Identity, nuisance: Nuisance, size: int) -> np.ndarray:
    """(5, 2) float64 pixel positions (pixel centres at integers) in `render_face`'s image of the five points an
    IJB detector reports: eye centres, nose tip, mouth corners, left to right as seen, through the same pose."""
    p, s = identity.params, supersample_factor(size)
    mouth_x = p["mouth_w"] * (1.0 + 0.12 * nuisance.smile)
    mouth_y = p["mouth_y"] - 0.028 * nuisance.smile  # the lips' line at the corners (see _mouth)
    points = np.array([[-p["eye_dx"], p["eye_y"]], [p["eye_dx"], p["eye_y"]], [0.0, p["nose_y"] - 0.008],
                       [-mouth_x, mouth_y], [mouth_x, mouth_y]])
    lifts = np.array([0.0, 0.0, 0.09, 0.01, 0.01])  # as drawn: eyes on the surface, the nose tip raised
    canvas = Pose(identity.params, nuisance, size * s).project(points, lifts)
    return (canvas - (s - 1) / 2) / s  # canvas pixel centres -> output pixel centres after reduce(s)
