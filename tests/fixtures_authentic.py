"""Builders for tiny copies of the authentic-dataset releases, in each release's exact layout.

Every image is a real, decodable file (PIL), every score file a real .mat/.csv/.xlsx written with the
library the release format needs; names, columns and folders are those of the published releases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import scipy.io
from PIL import Image


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 30)) -> Path:
    """A small random RGB image; the format follows the suffix (.bmp, .jpg/.JPG, .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def mat_cell(strings: list[str]) -> np.ndarray:
    """A MATLAB n x 1 cell array of strings, as savemat writes it."""
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = s
    return cell


def make_livec(root: Path, entries: list[tuple[str, float, float]]) -> Path:
    """ChallengeDB_release/: the 7 rater-training entries first (trainingImages/t1..t7.bmp), then entries."""
    release = root / "ChallengeDB_release"
    training = [(f"trainingImages/t{i}.bmp", 50.0 + i, 10.0) for i in range(1, 8)]
    everything = training + entries
    for i, (name, _, _) in enumerate(everything):
        write_image(release / "Images" / name, seed=i)
    data = release / "Data"
    data.mkdir(parents=True)
    scipy.io.savemat(data / "AllImages_release.mat", {"AllImages_release": mat_cell([e[0] for e in everything])})
    scipy.io.savemat(data / "AllMOS_release.mat", {"AllMOS_release": np.array([[e[1] for e in everything]])})
    scipy.io.savemat(data / "AllStdDev_release.mat", {"AllStdDev_release": np.array([[e[2] for e in everything]])})
    return release


KONIQ_COLUMNS = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]


def make_koniq(root: Path, rows: list[tuple[str, float, float, float]],
               folders: tuple[str, ...] = ("1024x768",), sets: list[str] | None = None) -> Path:
    """koniq10k/: koniq10k_scores_and_distributions.csv (rows: name, MOS, SD, MOS_zscore) and image folders.

    With ``sets``, also koniq10k_distributions_sets.csv (its 'MOS' column is the z-score MOS, as published).
    """
    root.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        for i, (name, *_) in enumerate(rows):
            write_image(root / folder / name, seed=i)
    records = [[name, 0, 1, 2, 3, 1, 7, mos, sd, z] for name, mos, sd, z in rows]
    pd.DataFrame(records, columns=KONIQ_COLUMNS).to_csv(root / "koniq10k_scores_and_distributions.csv",
                                                        index=False)
    if sets is not None:
        frame = pd.DataFrame([[name, 0.0, 0.1, 0.3, 0.4, 0.2, 10, z, sd, s]
                              for (name, _, sd, z), s in zip(rows, sets)],
                             columns=["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"])
        frame.to_csv(root / "koniq10k_distributions_sets.csv", index=False)
    return root


SPAQ_COLUMNS = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]


def write_xlsx(path: Path, header: list[str], rows: list[list]) -> Path:
    """A one-sheet workbook with a header row, written with openpyxl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


def make_spaq(root: Path, rows: list[tuple[str, float]], header: list[str] = SPAQ_COLUMNS) -> Path:
    """SPAQ/: Annotations/MOS and Image attribute scores.xlsx and TestImage/<name>."""
    for i, (name, _) in enumerate(rows):
        write_image(root / "TestImage" / name, seed=i)
    write_xlsx(root / "Annotations" / "MOS and Image attribute scores.xlsx", header,
               [[name, mos, 50.0, 51.0, 52.0, 53.0, 54.0] for name, mos in rows])
    return root


def make_flive(root: Path, rows: list[tuple[str, float]]) -> Path:
    """FLIVE_Database/: database/labels_image.csv (name, mos) and database/<name> images."""
    database = root / "database"
    for i, (name, _) in enumerate(rows):
        write_image(database / name, seed=i)
    pd.DataFrame(rows, columns=["name", "mos"]).to_csv(database / "labels_image.csv", index=False)
    return root
