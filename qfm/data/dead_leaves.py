"""Procedural "dead leaves" scenes: distinct image content made from a seed, with no file to ship.

The dead-leaves model (Matheron; Lee, Mumford and Huang 2001) stacks opaque shapes whose radii follow a
power law, which gives the scale invariance and the edge statistics of natural photographs. It is the
texture chart of camera image-quality testing (ISO 19567-2, IEEE P1858) because blur, noise and
compression act on it as on real scenes. Each scene here draws its own radius range, shape mix, colour
palette and surface texture, so two seeds give two different contents.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt, gaussian_filter

SUPERSAMPLE = 2  # drawn at twice the size and reduced with Lanczos, so edges are anti-aliased
MAX_LEAVES = 20_000


def _radius(rng: np.random.Generator, r_min: float, r_max: float, exponent: float) -> float:
    """A radius drawn from the density r^-exponent on [r_min, r_max] (inverse transform)."""
    a = 1.0 - exponent
    return float((r_min ** a + rng.uniform() * (r_max ** a - r_min ** a)) ** (1.0 / a))


def dead_leaves(size: int, seed: int | Sequence[int]) -> np.ndarray:
    """A size x size RGB uint8 dead-leaves scene, the same for the same seed (an int or a sequence of ints).

    Leaves are drawn front to back onto the uncovered pixels only, until the canvas is covered; the few
    pixels still bare after MAX_LEAVES take the colour of the nearest leaf.
    """
    rng = np.random.default_rng([1906, *np.atleast_1d(seed).tolist()])
    side = SUPERSAMPLE * size
    r_min, r_max = side * rng.uniform(0.004, 0.012), side * rng.uniform(0.12, 0.35)
    exponent = rng.uniform(2.5, 3.5)
    rectangle_share = rng.uniform()
    hues = rng.uniform(0.0, 1.0, rng.integers(2, 6))
    saturation = rng.uniform(0.15, 0.7)
    texture_amplitude = rng.uniform(0.0, 0.12)
    texture = gaussian_filter(rng.normal(0.0, 1.0, (side, side)).astype(np.float32), rng.uniform(0.7, 3.0))
    texture /= texture.std() + 1e-6

    canvas = np.zeros((side, side, 3), np.float32)
    covered = np.zeros((side, side), bool)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    for count in range(MAX_LEAVES):
        radius = _radius(rng, r_min, r_max, exponent)
        cx, cy = rng.uniform(-r_max / 2, side + r_max / 2, 2)
        x0, x1 = int(max(0, cx - radius)), int(min(side, cx + radius + 1))
        y0, y1 = int(max(0, cy - radius)), int(min(side, cy + radius + 1))
        if x0 >= x1 or y0 >= y1 or covered[y0:y1, x0:x1].all():
            continue
        dx, dy = xs[y0:y1, x0:x1] - cx, ys[y0:y1, x0:x1] - cy
        if rng.uniform() < rectangle_share:
            angle, aspect = rng.uniform(0.0, np.pi), rng.uniform(0.4, 1.0)
            along, across = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
            leaf = (np.abs(along) < 0.8 * radius) & (np.abs(across) < 0.8 * radius * aspect)
        else:
            leaf = dx ** 2 + dy ** 2 < radius ** 2
        leaf &= ~covered[y0:y1, x0:x1]
        hue = (hues[rng.integers(len(hues))] + rng.normal(0.0, 0.03)) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, np.clip(rng.normal(saturation, 0.15), 0.0, 1.0),
                                              np.clip(rng.beta(2.5, 2.0), 0.05, 1.0)), np.float32)
        slope = rng.normal(0.0, 0.25, 2) / max(radius, 1.0)  # light falling across the leaf
        shade = 1.0 + slope[0] * dx + slope[1] * dy + texture_amplitude * texture[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1][leaf] = (colour * shade[..., None])[leaf]
        covered[y0:y1, x0:x1] |= leaf
        if count % 256 == 255 and covered.mean() > 0.999:
            break
    if not covered.all():
        _, (near_y, near_x) = distance_transform_edt(~covered, return_indices=True)
        canvas = canvas[near_y, near_x]
    image = Image.fromarray(np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
