"""The generic CSV adapter: any table of image paths and scores, columns and scale given as options.

Also the `demo` format, which is this adapter with the fixed options of the demo generator's scores.csv.
"""

from __future__ import annotations

import csv
import difflib
import math
from pathlib import Path, PurePosixPath

import pandas as pd

from qfm.data import demo
from qfm.data.adapters import register
from qfm.data.manifest import RawDataset, ScoreScale
from qfm.errors import ConfigError, DataError

HEADER_LINE = 1


def _number_option(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"csv format: option {name} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"csv format: option {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"csv format: option {name} must be a finite number, got {value!r}")
    return number


def _bool_option(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "1"}:
        return True
    if text in {"false", "no", "0"}:
        return False
    raise ConfigError(f"csv format: option {name} must be true or false, got {value!r}")


def _scale(score_min: object, score_max: object, higher_is_better: object) -> ScoreScale:
    missing = [name for name, value in (("score_min", score_min), ("score_max", score_max)) if value is None]
    if missing:
        raise ConfigError(
            f"csv format: the score range is not declared (missing option {' and '.join(missing)}). "
            "Give the range the scores were collected on, e.g. `qfm ingest --format csv "
            "--option score_min=1 --option score_max=5` (or under ingest.options in params.yaml); "
            "for scores where lower is better add --option higher_is_better=false")
    lo, hi = _number_option("score_min", score_min), _number_option("score_max", score_max)
    if not hi > lo:
        raise ConfigError(f"csv format: score_max ({hi}) must be greater than score_min ({lo})")
    return ScoreScale(lo, hi, _bool_option("higher_is_better", higher_is_better), "MOS")


def _read_rows(path: Path, label: str, separator: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, cells) of every non-blank row; a row of the wrong width fails."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=separator)
            header = [cell.strip() for cell in next(reader, [])]
            rows = [(reader.line_num, [cell.strip() for cell in cells]) for cells in reader
                    if any(cell.strip() for cell in cells)]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc}); save the score table as UTF-8 CSV") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc
    if not any(header):
        raise DataError(f"{path}: the file is empty; it needs a header line naming its columns")
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataError(f"{label} line {line}: {len(cells)} fields, but the header (line {HEADER_LINE}) "
                            f"has {len(header)}; check the separator (now {separator!r}) and quoting")
    return header, rows


def _check_columns(header: list[str], wanted: dict[str, str | None], path: Path, separator: str) -> None:
    """Every column named by an option must be in the header; name the option, the close matches."""
    problems = []
    for option, column in wanted.items():
        if column is not None and header.count(column) > 1:
            raise DataError(f"{path}: the header names column '{column}' (option {option}) more than once")
        if column is not None and column not in header:
            lowered = {name.lower(): name for name in header}
            close = difflib.get_close_matches(column.lower(), list(lowered), n=1, cutoff=0.6)
            hint = f" (did you mean '{lowered[close[0]]}'?)" if close else ""
            problems.append(f"column '{column}' (option {option}){hint}")
    if problems:
        other = next((s for s in ",;\t|" if s != separator and len(header) == 1 and s in header[0]), None)
        sep_hint = f" The header looks separated by {other!r}: pass separator={other!r}." if other else ""
        raise DataError(f"{path}: no {', no '.join(problems)}; the header has columns {header}. "
                        f"Name the right columns with the options image_column=, score_column=, ...{sep_hint}")


def _optional_number(text: str, what: str, where: str) -> float:
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where}: {what} {text!r} is not a number") from None


@register("csv", "any CSV of image paths and scores; declare the columns and the score range as options")
def read_csv_dataset(root: Path, scores_file: str = "scores.csv", image_column: str = "image",
                     score_column: str = "mos", score_min: float | None = None, score_max: float | None = None,
                     higher_is_better: bool = True, std_column: str | None = None,
                     content_column: str | None = None, distortion_type_column: str | None = None,
                     distortion_level_column: str | None = None, image_folder: str = "",
                     separator: str = ",") -> RawDataset:
    """Read root/scores_file: one row per image; image paths are relative to root/image_folder.

    The score range must be declared (score_min, score_max, and higher_is_better for DMOS-like scores).
    Optional columns: the score's standard deviation, the content (reference image) id, so the splits keep
    one content in one part, and the distortion type and level. A row's source is '<file> line N'
    (the header is line 1). Scores are checked later, by the manifest builder.
    """
    scale = _scale(score_min, score_max, higher_is_better)
    if len(separator) != 1:
        raise ConfigError(f"csv format: option separator must be one character, got {separator!r}")
    root = Path(root)
    path = root / scores_file
    if not path.is_file():
        raise DataError(f"csv format: score file {path} is missing; put it there or name it with the "
                        "option scores_file= (a path relative to --root)")
    label = PurePosixPath(scores_file).as_posix()
    header, rows = _read_rows(path, label, separator)
    wanted = {"image_column": image_column, "score_column": score_column, "std_column": std_column,
              "content_column": content_column, "distortion_type_column": distortion_type_column,
              "distortion_level_column": distortion_level_column}
    _check_columns(header, wanted, path, separator)
    if not rows:
        raise DataError(f"{path}: has a header but no rows: no scored images to ingest")
    index = {name: header.index(name) for name in header}
    folder = PurePosixPath(image_folder.replace("\\", "/")) if image_folder else PurePosixPath()
    records = []
    for line, cells in rows:
        where = f"{label} line {line}"
        image = cells[index[image_column]].replace("\\", "/")
        if not image:
            raise DataError(f"{where}: the image column '{image_column}' is empty")
        if PurePosixPath(image).is_absolute():
            raise DataError(f"{where}: image path {image!r} is absolute; write it relative to "
                            f"{root / image_folder} (the root and the option image_folder)")
        record = {"image_id": image, "path": (folder / image).as_posix(),
                  "mos_raw": cells[index[score_column]], "source": where}
        if std_column is not None:
            record["mos_std"] = _optional_number(cells[index[std_column]], f"std ('{std_column}')", where)
        if content_column is not None:
            record["content_id"] = cells[index[content_column]]
            if not record["content_id"]:
                raise DataError(f"{where}: the content column '{content_column}' is empty; every row needs "
                                "its content (reference image) id so splits can keep content apart")
        if distortion_type_column is not None:
            record["distortion_type"] = cells[index[distortion_type_column]] or None
        if distortion_level_column is not None:
            record["distortion_level"] = _optional_number(
                cells[index[distortion_level_column]], f"distortion level ('{distortion_level_column}')", where)
        records.append(record)
    notes = {"scores_file": label, "image_column": image_column, "score_column": score_column,
             "image_folder": image_folder, "columns": header}
    return RawDataset(dataset="csv", root=root, scale=scale, table=pd.DataFrame.from_records(records),
                      notes=notes)


@register("demo", "the built-in synthetic demo dataset written by `qfm demo-data`", synthetic=True)
def read_demo(root: Path) -> RawDataset:
    """The demo generator's scores.csv: synthetic simulated-opinion scores on 0-100, content = reference."""
    raw = read_csv_dataset(root, scores_file=demo.SCORES_FILE, image_column="image", score_column="mos",
                           score_min=demo.MOS_MIN, score_max=demo.MOS_MAX, content_column="ref",
                           distortion_type_column="distortion", distortion_level_column="level")
    raw.dataset, raw.synthetic = "demo", True
    raw.notes["scores"] = demo.SCORE_DESCRIPTION
    return raw
