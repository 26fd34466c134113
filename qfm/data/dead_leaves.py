"""Procedural "dead leaves" scenes: distinct image content made from a seed, with no file to ship.

The dead-leaves model (Matheron; Lee, Mumford and Huang 2001) stacks opaque shapes whose radii follow a
power law, which gives the scale invariance and the edge statistics of natural photographs. It is the
texture chart of camera image-quality testing (ISO 19567-2, IEEE P1858) because blur, noise and
compression act on it as on real scenes. Each scene here draws its own radius range, shape mix, colour
palette and surface texture, so two seeds give two different contents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import distance_transform_edt, gaussian_filter

SUPERSAMPLE = 2  # drawn at twice the size and reduced with Lanczos, so edges are anti-aliased
MAX_LEAVES = 20_000
BATCH = 1_000  # leaves drawn from the random stream at a time, front to back
TILE = 16  # side in pixels of the tiles of the bare-ground map that decides which leaves of a batch can show


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """colorsys.hsv_to_rgb of arrays: an (n, 3) array of RGB in [0, 1]."""
    sector = np.floor(hue * 6.0)
    f = hue * 6.0 - sector
    p, q, t = value * (1.0 - saturation), value * (1.0 - saturation * f), value * (1.0 - saturation * (1.0 - f))
    sector = sector.astype(int) % 6
    return np.stack([np.choose(sector, channel) for channel in
                     ((value, q, p, p, t, value), (t, value, value, q, p, p), (p, p, t, value, value, q))], axis=1)


def _shapes(cx: np.ndarray, cy: np.ndarray, radius: np.ndarray, rectangle: np.ndarray, angle: np.ndarray,
            aspect: np.ndarray) -> np.ndarray:
    """Each leaf's box x0, y0, x1, y1 (inclusive, in pixels) then, for a rectangle, its four corners x, y.

    A disc covers the pixels within radius of its centre (pixel centres on integers): the box
    [ceil(c - r), floor(c + r)], the one PIL's ellipse fills. A rectangle is 1.6 radius long and aspect
    times as wide, turned by angle; its corners are rounded to pixels (PIL would truncate them) and its box
    bounds them.
    """
    cos, sin = np.cos(angle), np.sin(angle)
    half_long, half_wide = 0.8 * radius, 0.8 * radius * aspect
    corners = np.empty((len(cx), 4, 2), int)
    for k, (u, v) in enumerate(((-1, -1), (1, -1), (1, 1), (-1, 1))):
        corners[:, k, 0] = np.rint(cx + cos * u * half_long - sin * v * half_wide)
        corners[:, k, 1] = np.rint(cy + sin * u * half_long + cos * v * half_wide)
    disc_box = np.stack([np.ceil(cx - radius), np.ceil(cy - radius), np.floor(cx + radius),
                         np.floor(cy + radius)], axis=1).astype(int)
    box = np.where(rectangle[:, None], np.concatenate([corners.min(1), corners.max(1)], axis=1), disc_box)
    return np.concatenate([box, corners.reshape(-1, 8)], axis=1)


def _can_show(bare: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Which leaves' boxes (rows x0, y0, x1, y1, inclusive) meet a TILE x TILE tile with a bare pixel.

    An empty box (a disc too small to hold a pixel centre) covers nothing.
    """
    side = bare.shape[0]
    n_tiles = -(-side // TILE)
    padded = np.zeros((n_tiles * TILE, n_tiles * TILE), bool)
    padded[:side, :side] = bare
    tiles = padded.reshape(n_tiles, TILE, -1).any(axis=1).reshape(n_tiles, n_tiles, TILE).any(axis=2)
    summed = np.zeros((n_tiles + 1, n_tiles + 1), np.int32)
    summed[1:, 1:] = tiles.cumsum(0).cumsum(1)
    x0, y0, x1, y1 = box.T
    on_canvas = (x0 <= x1) & (y0 <= y1) & (x1 >= 0) & (y1 >= 0) & (x0 < side) & (y0 < side)
    tx0, ty0 = np.clip(x0, 0, side - 1) // TILE, np.clip(y0, 0, side - 1) // TILE
    tx1, ty1 = np.clip(x1, 0, side - 1) // TILE + 1, np.clip(y1, 0, side - 1) // TILE + 1
    # the bare tiles counted over every box at once with the summed-area table
    bare_tiles = summed[ty1, tx1] - summed[ty0, tx1] - summed[ty1, tx0] + summed[ty0, tx0]
    return on_canvas & (bare_tiles > 0)


def _draw(side: int, shapes: np.ndarray, rectangle: np.ndarray, order: np.ndarray, first: int) -> np.ndarray:
    """A side x side label image of the leaves in order, drawn by PIL: each pixel is first + the index of the
    last leaf drawn over it, -1 where none is."""
    image = Image.new("I", (side, side), -1)
    draw = ImageDraw.Draw(image)
    for label, is_rectangle, shape in zip((first + order).tolist(), rectangle[order].tolist(),
                                          shapes[order].tolist()):
        if is_rectangle:
            draw.polygon(shape[4:], fill=label)
        else:
            draw.ellipse(shape[:4], fill=label)
    return np.asarray(image)


def dead_leaves(size: int, seed: int | Sequence[int]) -> np.ndarray:
    """A size x size RGB uint8 dead-leaves scene, the same for the same seed (an int or a sequence of ints).

    Leaves come from the random stream front to back in batches (BATCH, then doubling), each parameter of
    a batch's leaves drawn in one vectorised call. The leaves of a batch that can still show (their box
    meets bare ground) are drawn back to front by PIL into a label image, whose labels (leaf numbers) fill
    the bare pixels of the scene's label image; until the canvas is covered, or MAX_LEAVES, after which the
    few pixels still bare take the nearest leaf's. Then every pixel is shaded at once from its leaf's
    colour and slope and the surface texture.
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

    # Radii from the density r^-exponent on [r_min, r_max] by inverse transform, r = (low + u * span)^(1/a)
    # for a uniform draw u; centres uniform on [-r_max / 2, side + r_max / 2].
    a = 1.0 - exponent
    low, span = r_min ** a, r_max ** a - r_min ** a
    labels = np.full((side, side), -1, np.int32)  # each pixel's leaf, -1 where bare
    bare = np.ones((side, side), bool)
    leaves = []  # each batch's (cx, cy, slope x, slope y, hue, saturation, value)
    start = 0
    while start < MAX_LEAVES and bare.any():
        n = min(max(BATCH, start), MAX_LEAVES - start)  # doubling: the late batches are mostly culled
        radius = (low + rng.random(n) * span) ** (1.0 / a)
        cx, cy = rng.uniform(-r_max / 2, side + r_max / 2, (2, n))
        rectangle = rng.random(n) < rectangle_share
        angle, aspect = rng.uniform(0.0, np.pi, n), rng.uniform(0.4, 1.0, n)
        hue = (rng.choice(hues, n) + rng.normal(0.0, 0.03, n)) % 1.0
        leaf_saturation = np.clip(rng.normal(saturation, 0.15, n), 0.0, 1.0)
        value = np.clip(rng.beta(2.5, 2.0, n), 0.05, 1.0)
        lit = np.maximum(radius, 1.0)  # light falling across the leaf: a slope along x and along y
        slope_x, slope_y = rng.normal(0.0, 0.25, n) / lit, rng.normal(0.0, 0.25, n) / lit
        leaves.append((cx, cy, slope_x, slope_y, hue, leaf_saturation, value))

        shapes = _shapes(cx, cy, radius, rectangle, angle, aspect)
        order = np.flatnonzero(_can_show(bare, shapes[:, :4]))[::-1]  # back to front: the first ends on top
        labels = np.where(bare, _draw(side, shapes, rectangle, order, start), labels)
        bare = labels < 0
        start += n

    if bare.any():
        near_y, near_x = distance_transform_edt(bare, return_distances=False, return_indices=True)
        labels = labels[near_y, near_x]
    cx, cy, slope_x, slope_y, hue, leaf_saturation, value = (np.concatenate(values) for values in zip(*leaves))
    colour = (255.0 * _hsv_to_rgb(hue, leaf_saturation, value)).astype(np.float32)
    # shade = 1 + slope_x (x - cx) + slope_y (y - cy) + texture, the leaf's constant part in offset;
    # array.take(labels) is the fancy index array[labels], faster
    offset = (1.0 - slope_x * cx - slope_y * cy).astype(np.float32)
    slope_x, slope_y = slope_x.astype(np.float32), slope_y.astype(np.float32)
    pixels = np.arange(side, dtype=np.float32)
    shade = offset.take(labels) + slope_x.take(labels) * pixels + slope_y.take(labels) * pixels[:, None]
    shade += np.float32(texture_amplitude) * texture
    canvas = colour.take(labels, axis=0) * shade[..., None]
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
