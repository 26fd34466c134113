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


def _clip(value: float, low: float, high: float) -> float:
    """np.clip of one number, without its overhead."""
    return min(max(value, low), high)


def dead_leaves(size: int, seed: int | Sequence[int]) -> np.ndarray:
    """A size x size RGB uint8 dead-leaves scene, the same for the same seed (an int or a sequence of ints).

    Leaves are laid front to back onto the uncovered pixels only, until the canvas is covered, and then
    shaded and painted in one pass (each pixel belongs to one leaf); the few pixels still bare after
    MAX_LEAVES take the colour of the nearest leaf. A leaf's shape is tested on the bare pixels of its box
    only: late leaves land mostly on covered ground.
    """
    rng = np.random.default_rng([1906, *np.atleast_1d(seed).tolist()])
    side = SUPERSAMPLE * size
    r_min, r_max = side * rng.uniform(0.004, 0.012), side * rng.uniform(0.12, 0.35)
    exponent = rng.uniform(2.5, 3.5)
    rectangle_share = rng.uniform()
    hues = rng.uniform(0.0, 1.0, rng.integers(2, 6)).tolist()
    saturation = rng.uniform(0.15, 0.7)
    texture_amplitude = rng.uniform(0.0, 0.12)
    texture = gaussian_filter(rng.normal(0.0, 1.0, (side, side)).astype(np.float32), rng.uniform(0.7, 3.0))
    texture /= texture.std() + 1e-6

    # Radii from the density r^-exponent on [r_min, r_max] by inverse transform, r = (low + u * span)^(1/a)
    # for a uniform draw u; centres uniform on [-r_max / 2, side + r_max / 2]. rng.random() and
    # np.pi * rng.random() give the values of rng.uniform() and rng.uniform(0.0, np.pi), with less overhead.
    a = 1.0 - exponent
    low, span, power = r_min ** a, r_max ** a - r_min ** a, 1.0 / a
    centre_low, centre_high = -r_max / 2, side + r_max / 2
    bare = np.ones((side, side), bool)
    n_covered = 0
    pixels_y, pixels_x, counts = [], [], []  # each leaf's pixels
    centres_slopes, colours = [], []  # each leaf's (cx, cy, slope x, slope y) and RGB
    for count in range(MAX_LEAVES):
        radius = (low + rng.random() * span) ** power
        cx, cy = rng.uniform(centre_low, centre_high, 2).tolist()
        x0, x1 = int(max(0, cx - radius)), int(min(side, cx + radius + 1))
        y0, y1 = int(max(0, cy - radius)), int(min(side, cy + radius + 1))
        if x0 >= x1 or y0 >= y1 or not np.count_nonzero(bare[y0:y1, x0:x1]):
            continue  # off the canvas, or on covered ground
        iy, ix = np.nonzero(bare[y0:y1, x0:x1])
        iy += y0
        ix += x0
        dx, dy = ix - cx, iy - cy  # float64 offsets from the centre
        if rng.random() < rectangle_share:
            angle, aspect = np.pi * rng.random(), rng.uniform(0.4, 1.0)
            cos, sin = np.cos(angle), np.sin(angle)
            along, across = cos * dx + sin * dy, -sin * dx + cos * dy
            leaf = (np.abs(along) < 0.8 * radius) & (np.abs(across) < 0.8 * radius * aspect)
        else:
            leaf = dx ** 2 + dy ** 2 < radius ** 2
        iy, ix = iy[leaf], ix[leaf]
        bare[iy, ix] = False
        n_covered += len(iy)
        pixels_y.append(iy)
        pixels_x.append(ix)
        counts.append(len(iy))
        hue = (hues[rng.integers(len(hues))] + rng.normal(0.0, 0.03)) % 1.0
        colours.append(colorsys.hsv_to_rgb(hue, _clip(rng.normal(saturation, 0.15), 0.0, 1.0),
                                           _clip(rng.beta(2.5, 2.0), 0.05, 1.0)))
        lit = max(radius, 1.0)  # light falling across the leaf: a slope along x and along y
        centres_slopes.append((cx, cy, rng.normal(0.0, 0.25) / lit, rng.normal(0.0, 0.25) / lit))
        if count % 256 == 255 and n_covered / bare.size > 0.999:  # covered.mean(), without its pass
            break

    iy, ix = np.concatenate(pixels_y), np.concatenate(pixels_x)
    flat = iy * side + ix
    cx, cy, slope_x, slope_y = (np.repeat(values, counts) for values in np.array(centres_slopes).T)
    colour = np.repeat(np.array(colours, np.float32), counts, axis=0)
    shade = 1.0 + slope_x * (ix - cx) + slope_y * (iy - cy) + texture_amplitude * texture.ravel()[flat]
    canvas = np.zeros((side, side, 3), np.float32)
    canvas.reshape(-1, 3)[flat] = colour * shade[:, None]
    if n_covered < bare.size:
        near_y, near_x = distance_transform_edt(bare, return_distances=False, return_indices=True)
        canvas[bare] = canvas[near_y[bare], near_x[bare]]
    image = Image.fromarray(np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
