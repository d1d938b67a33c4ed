"""Procedural face identities and per-image nuisance for the synthetic benchmark.

An identity is a dict of named numbers (face geometry, colours, hair/beard style) plus a personal skin
texture (a smooth random field, freckles and moles). Everything is drawn from Gaussian latents
``z`` mapped through ``tanh``; ``difficulty`` shrinks the spread of the latents (identities closer together)
and mixes a latent shared by a *family* of consecutive identities into each member (look-alikes: the hard
negatives that low-FPR evaluation is about). A `Nuisance` is the per-image variation: pose, scale, shift,
illumination, colour cast, blur, noise, expression, occluders and JPEG quality, all scaled by difficulty.

Geometry is in canonical face coordinates: units of the image width, origin at the image centre, y down,
laid out like an insightface 112x112 aligned crop (eyes at y~0.46, mouth at y~0.82 of the height).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name: (base, amplitude); value = base + amplitude * spread(difficulty) * tanh(z)
GEOMETRY_SPECS: dict[str, tuple[float, float]] = {
    "face_w": (0.42, 0.05),  # half width at the cheeks
    "face_h": (0.53, 0.05),  # half height of the head oval
    "face_cy": (-0.04, 0.02),
    "temple_w": (0.93, 0.06),  # forehead width relative to face_w
    "jaw_w": (0.80, 0.12),  # jaw width relative to face_w
    "chin_w": (0.38, 0.14),  # flat part of the chin relative to face_w
    "eye_dx": (0.155, 0.015),
    "eye_y": (-0.04, 0.02),
    "eye_w": (0.072, 0.012),
    "eye_open": (0.42, 0.13),  # eye height / eye width
    "eye_tilt": (0.0, 0.16),  # radians, outer corners up when positive
    "iris_r": (0.42, 0.06),  # iris radius relative to eye_w
    "brow_gap": (0.068, 0.016),
    "brow_len": (0.085, 0.02),
    "brow_thick": (0.017, 0.008),
    "brow_arch": (0.018, 0.016),
    "brow_slant": (0.0, 0.022),
    "nose_y": (0.135, 0.025),
    "nose_w": (0.052, 0.016),
    "nose_shade": (0.86, 0.06),
    "mouth_y": (0.315, 0.03),
    "mouth_w": (0.118, 0.025),
    "lip_upper": (0.016, 0.008),
    "lip_lower": (0.024, 0.01),
    "lip_red": (0.5, 0.5),
    "ear_y": (0.02, 0.03),
    "ear_size": (0.085, 0.02),
    "hairline": (-0.27, 0.07),
    "hair_volume": (0.06, 0.05),
    "hair_part": (0.0, 0.18),
    "fringe": (0.04, 0.05),
    "hair_wave": (0.012, 0.012),  # amplitude of the wavy hairline
    "hair_length": (0.25, 0.25),  # how far long hair falls below the eyes
    "skin_tone": (0.5, 0.5),
    "texture_amp": (0.07, 0.04),
    "freckles": (-0.3, 1.0),  # > 0: number of freckles grows with it
    "beard": (-0.6, 1.0),  # > 0: beard/stubble; > 0.35: full beard
    "moustache": (-0.5, 1.0),
}
CATEGORICAL = ("hair_style", "hair_colour", "eye_colour")
HAIR_STYLES = ("short", "long", "buzz", "fringe", "bald")
HAIR_PALETTE = np.array(
    [(28, 22, 20), (62, 42, 30), (112, 76, 46), (198, 164, 104), (150, 72, 38), (158, 154, 150)], np.float32
)
EYE_PALETTE = np.array(
    [(45, 28, 18), (92, 58, 32), (118, 96, 50), (70, 110, 70), (70, 110, 160), (110, 120, 130)], np.float32
)
SKIN_PALETTE = np.array(
    [(250, 220, 196), (236, 192, 160), (214, 164, 128), (180, 128, 92), (138, 94, 64), (92, 60, 42)], np.float32
)
TEXTURE_GRID = 10
FAMILY_SIZE = 4


def latent_spread(difficulty: float) -> float:
    """How far identities spread around the mean face (1 = full range)."""
    return 1.0 - 0.5 * difficulty


def family_share(difficulty: float) -> float:
    """Fraction of latent variance shared within a family of FAMILY_SIZE consecutive identities."""
    return 0.7 * difficulty


@dataclass(frozen=True)
class Identity:
    """Everything fixed about one synthetic person."""

    params: dict[str, float]
    hair_style: str
    hair_rgb: np.ndarray
    eye_rgb: np.ndarray
    skin_rgb: np.ndarray
    lip_rgb: np.ndarray
    texture: np.ndarray  # (TEXTURE_GRID, TEXTURE_GRID) float32, zero-mean smooth field
    spots: np.ndarray  # (K, 4): x, y, radius, darkness of freckles and moles

    def vector(self) -> np.ndarray:
        """All continuous parameters as one float64 vector (for comparisons in tests and analysis)."""
        colours = np.concatenate([self.hair_rgb, self.eye_rgb, self.skin_rgb, self.lip_rgb])
        return np.concatenate([np.array(list(self.params.values())), colours, self.texture.ravel()])


def _latent_size() -> int:
    return len(GEOMETRY_SPECS) + len(CATEGORICAL) + 3 + TEXTURE_GRID * TEXTURE_GRID


def _palette_pick(palette: np.ndarray, z: float) -> np.ndarray:
    """Map a standard-normal latent to a palette entry (equiprobable bins)."""
    u = 0.5 * (1.0 + np.tanh(0.8 * z))  # roughly uniform in (0, 1)
    return palette[min(int(u * len(palette)), len(palette) - 1)].copy()


def make_identity(own: np.random.Generator, family: np.random.Generator, difficulty: float) -> Identity:
    """Draw one identity from its own generator and its family's generator (same family = look-alikes)."""
    rho = family_share(difficulty)
    n = _latent_size()
    z = np.sqrt(1.0 - rho) * own.standard_normal(n) + np.sqrt(rho) * family.standard_normal(n)
    spread = latent_spread(difficulty)
    u = np.tanh(z)
    names = list(GEOMETRY_SPECS)
    params = {k: GEOMETRY_SPECS[k][0] + GEOMETRY_SPECS[k][1] * spread * u[i] for i, k in enumerate(names)}
    zc = z[len(names):] * spread
    hair_style = HAIR_STYLES[min(int(0.5 * (1 + np.tanh(0.8 * zc[0])) * len(HAIR_STYLES)), len(HAIR_STYLES) - 1)]
    hair_rgb = _palette_pick(HAIR_PALETTE, zc[1]) + 12.0 * np.tanh(zc[3:6])
    eye_rgb = _palette_pick(EYE_PALETTE, zc[2])
    tone = np.clip(params["skin_tone"], 0.0, 1.0) * (len(SKIN_PALETTE) - 1)
    lo = int(min(tone, len(SKIN_PALETTE) - 2))
    skin_rgb = SKIN_PALETTE[lo] + (tone - lo) * (SKIN_PALETTE[lo + 1] - SKIN_PALETTE[lo])
    skin_rgb = skin_rgb * np.exp(0.04 * spread * own.standard_normal(3))
    lip_rgb = skin_rgb * np.array([0.92, 0.62, 0.62]) * (0.85 + 0.15 * params["lip_red"])
    field = z[-TEXTURE_GRID * TEXTURE_GRID:].reshape(TEXTURE_GRID, TEXTURE_GRID)
    field = _smooth(field)
    field = params["texture_amp"] * field / (field.std() + 1e-6)
    spots = _draw_spots(own, params)
    return Identity(
        params=params,
        hair_style=hair_style,
        hair_rgb=np.clip(hair_rgb, 0, 255).astype(np.float32),
        eye_rgb=eye_rgb.astype(np.float32),
        skin_rgb=np.clip(skin_rgb, 0, 255).astype(np.float32),
        lip_rgb=np.clip(lip_rgb, 0, 255).astype(np.float32),
        texture=field.astype(np.float32),
        spots=spots,
    )


def _smooth(field: np.ndarray) -> np.ndarray:
    """Two passes of a separable [1, 2, 1] filter with wrap-around: a low-frequency texture."""
    for _ in range(2):
        field = (np.roll(field, 1, 0) + 2 * field + np.roll(field, -1, 0)) / 4
        field = (np.roll(field, 1, 1) + 2 * field + np.roll(field, -1, 1)) / 4
    return field - field.mean()


def _draw_spots(rng: np.random.Generator, p: dict[str, float]) -> np.ndarray:
    """Freckles across nose and cheeks, plus 0-3 moles anywhere on the face."""
    n_freckles = int(max(0.0, p["freckles"]) * 40)
    fx = rng.normal(0.0, 0.11, n_freckles)
    fy = p["nose_y"] - 0.03 + rng.normal(0.0, 0.045, n_freckles)
    freckles = np.stack([fx, fy, rng.uniform(0.004, 0.007, n_freckles), rng.uniform(0.1, 0.25, n_freckles)], 1)
    n_moles = int(rng.integers(0, 4))
    mx = rng.uniform(-0.7, 0.7, n_moles) * p["face_w"]
    my = p["face_cy"] + rng.uniform(-0.2, 0.75, n_moles) * p["face_h"]
    moles = np.stack([mx, my, rng.uniform(0.006, 0.011, n_moles), rng.uniform(0.45, 0.7, n_moles)], 1)
    return np.concatenate([freckles, moles]).astype(np.float32)


@dataclass(frozen=True)
class Nuisance:
    """Per-image variation, drawn by `draw_nuisance`."""

    yaw: float  # radians
    pitch: float
    roll: float
    scale: float
    shift: tuple[float, float]  # image-width units
    smile: float  # -0.3 (frown) .. 1 (big smile)
    mouth_open: float  # 0 closed .. 1
    brow_raise: float  # image-width units, negative = frown
    eye_open: float  # multiplier on the eye opening (blink < 0.3)
    gaze: tuple[float, float]
    hair_jitter: float
    glasses: str  # "", "clear", "sun"
    mask: bool
    hat: bool
    occluder_rgb: np.ndarray
    background_rgb: np.ndarray
    brightness: float
    gradient: tuple[float, float, float]  # amplitude, cos, sin of the light direction
    cast: np.ndarray  # per-channel gain
    blur: float  # Gaussian radius in output pixels at 112 (scaled with size)
    noise: float  # sigma in 0..255 units
    jpeg_quality: int


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def draw_nuisance(rng: np.random.Generator, difficulty: float) -> Nuisance:
    """Draw one image's nuisance; every strength grows linearly with difficulty."""
    d = float(difficulty)
    deg = np.pi / 180.0
    glasses_roll = rng.random()
    p_clear, p_sun = _lerp(0.04, 0.15, d), _lerp(0.01, 0.07, d)
    glasses = "clear" if glasses_roll < p_clear else "sun" if glasses_roll < p_clear + p_sun else ""
    angle = rng.uniform(0, 2 * np.pi)
    expression = _lerp(0.3, 1.0, d)
    return Nuisance(
        yaw=rng.uniform(-1, 1) * _lerp(8, 50, d) * deg,
        pitch=rng.uniform(-1, 1) * _lerp(4, 20, d) * deg,
        roll=rng.normal(0, _lerp(2, 10, d)) * deg,
        scale=float(np.exp(rng.normal(0, _lerp(0.02, 0.08, d)))),
        shift=(float(rng.normal(0, _lerp(0.008, 0.035, d))), float(rng.normal(0, _lerp(0.008, 0.035, d)))),
        smile=float(rng.uniform(-0.3, 1.0) * expression),
        mouth_open=float(rng.random() < _lerp(0.08, 0.35, d)) * rng.uniform(0.3, 1.0) * expression,
        brow_raise=rng.uniform(-0.012, 0.02) * expression,
        eye_open=0.15 if rng.random() < _lerp(0.02, 0.1, d) else float(rng.uniform(0.8, 1.15)),
        gaze=(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.15, 0.15))),
        hair_jitter=float(rng.normal(0, 0.01)),
        glasses=glasses,
        mask=bool(rng.random() < _lerp(0.01, 0.10, d)),
        hat=bool(rng.random() < _lerp(0.02, 0.10, d)),
        occluder_rgb=rng.uniform(20, 235, 3).astype(np.float32),
        background_rgb=(rng.uniform(40, 220) + rng.uniform(-60, 60, 3)).astype(np.float32),
        brightness=float(np.exp(rng.normal(0, _lerp(0.05, 0.25, d)))),
        gradient=(float(rng.uniform(0, _lerp(0.1, 0.6, d))), float(np.cos(angle)), float(np.sin(angle))),
        cast=np.exp(rng.normal(0, _lerp(0.02, 0.09, d), 3)).astype(np.float32),
        blur=float(rng.uniform(0, _lerp(0.5, 2.5, d))) if rng.random() < _lerp(0.1, 0.6, d) else 0.0,
        noise=float(rng.uniform(0, _lerp(2, 12, d))),
        jpeg_quality=int(rng.integers(int(_lerp(90, 30, d)), 96)),
    )
