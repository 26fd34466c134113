"""Procedural dead-leaves scenes: deterministic, distinct per seed, covered, with a natural 1/f spectrum."""

from __future__ import annotations

import numpy as np

from qfm.data.dead_leaves import dead_leaves


def spectral_slope(image: np.ndarray) -> float:
    """The log-log slope of the radially averaged power spectrum of the luma (natural photographs: about -2)."""
    luma = image.astype(float).mean(axis=2)
    luma -= luma.mean()
    window = np.hanning(luma.shape[0])[:, None] * np.hanning(luma.shape[1])
    power = np.abs(np.fft.fftshift(np.fft.fft2(luma * window))) ** 2
    n = luma.shape[0]
    y, x = np.indices(power.shape)
    radius = np.hypot(y - n // 2, x - n // 2).astype(int)
    radial = np.bincount(radius.ravel(), power.ravel()) / np.bincount(radius.ravel())
    freqs = np.arange(4, n // 4)
    return float(np.polyfit(np.log(freqs), np.log(radial[freqs]), 1)[0])


def test_same_seed_same_scene_other_seed_other_content():
    first, again, other = dead_leaves(96, (0, 1)), dead_leaves(96, (0, 1)), dead_leaves(96, (0, 2))
    assert first.shape == (96, 96, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 20  # another content, not another noise


def test_scenes_are_covered_coloured_and_have_a_natural_spectrum():
    for seed in range(6):
        scene = dead_leaves(128, (0, seed))
        assert scene.std() > 15, seed  # leaves of many colours, not one flat fill
        assert len(np.unique(scene.reshape(-1, 3), axis=0)) > 500, seed
        assert -3.0 < spectral_slope(scene) < -1.0, seed  # scale invariance, as in photographs
