"""The units of work of a study (a trained model, a pseudo-label table, a bank, an evaluation), stored by
fingerprint, so that a unit is shared wherever its inputs are equal and recomputed exactly when they change.

A unit lives in ``UNITS/<split>/<kind>-<key>/``. Its key is a SHA-256 (16 hex digits) of its kind, its
parameters (without execution-only ones such as DataLoader workers), the keys of the units it reads, and
the study's context: the data (the manifest's rows and the bytes of every image), the device type and the
code version (``code_version``). ``unit.json``, written last, marks a unit finished; a rerun reuses a
finished unit, resumes an unfinished training unit from its last checkpoint (same key, so the same
parameters and data), and redoes any other unfinished unit from scratch.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Self

import pandas as pd

import qfm
from qfm.data.manifest import read_manifest

MARKER = "unit.json"
LOCK = ".lock"
#: The modules whose code decides a unit's numbers (relative to the qfm package). A change to their syntax
#: tree (not to a comment or a docstring) gives every unit a new key.
RESULT_CODE = ("train", "models", "snm", "losses.py", "data/crops.py", "data/torch_dataset.py", "data/images.py",
               "data/distortions.py", "eval/metrics.py", "steps/common.py", "steps/teacher.py", "steps/student.py",
               "steps/pseudo_label.py", "steps/bank.py", "steps/evaluate.py")
RESULT_LIBRARIES = ("torch", "timm", "faiss-cpu", "numpy", "pillow", "scipy")


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_version() -> str:
    """A digest of the result-deciding modules' syntax trees (docstrings and comments left out) and of the
    installed versions of the libraries that compute with them."""
    package = Path(qfm.__file__).parent
    digest = hashlib.sha256()
    for entry in RESULT_CODE:
        path = package / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            tree = _without_docstrings(ast.parse(file.read_text(), str(file)))
            digest.update(f"{file.relative_to(package).as_posix()}\0{ast.dump(tree)}\n".encode())
    for name in RESULT_LIBRARIES:
        try:
            digest.update(f"{name}=={metadata.version(name)}\n".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} absent\n".encode())
    return digest.hexdigest()[:16]


def data_version(manifest_dir: str | Path) -> str:
    """A digest of the manifest's rows (ids, paths, scores, content, every split column) and of the bytes of
    every image it names."""
    manifest = read_manifest(manifest_dir)
    frame = manifest.frame
    columns = ["image_id", "path", "mos", "content_id", *manifest.split_columns]
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame[columns], index=False).to_numpy().tobytes())
    for path in frame["path"].astype(str):
        with open(manifest.image_path(path), "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Unit:
    kind: str
    key: str
    path: Path
    result: dict
    reused: bool
    seconds: float


class UnitStore:
    """The units of one split: ``run`` returns a finished unit, computing it only when no finished one has
    its key. Use it as a context manager: it holds the split's lock, so that two studies sharing a units
    folder never work on the same split at once (the second waits)."""

    def __init__(self, root: str | Path, context: Mapping[str, str]) -> None:
        self.root = Path(root)
        self.context = dict(context)
        self._lock = None

    def __enter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def key(self, kind: str, payload: Mapping) -> str:
        text = json.dumps({"kind": kind, "payload": payload, "context": self.context}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def run(self, kind: str, payload: Mapping, compute: Callable[[Path, bool], dict], *,
            resumable: bool = False) -> Unit:
        """The unit of this kind and payload: reused when finished, else computed by ``compute(folder,
        resume)`` (resume: a resumable unit's folder may hold its last checkpoint), which returns the small
        result dict kept in unit.json."""
        key = self.key(kind, payload)
        path = self.root / f"{kind}-{key}"
        marker = path / MARKER
        if marker.is_file():
            record = json.loads(marker.read_text())
            return Unit(kind, key, path, record["result"], reused=True, seconds=record["seconds"])
        if path.exists() and not resumable:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = compute(path, resumable)
        seconds = round(time.perf_counter() - started, 1)
        record = {"kind": kind, "key": key, "payload": payload, "context": self.context, "result": result,
                  "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = marker.with_name(MARKER + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        tmp.replace(marker)
        return Unit(kind, key, path, result, reused=False, seconds=seconds)
