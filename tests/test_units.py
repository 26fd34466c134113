"""The keys of study units (qfm.steps.units): every input's bytes, the code each unit kind imports, the device;
a change re-keys exactly the units that depend on it. Keys are computed without training (study.row_keys)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qfm
from qfm.config import load_params
from qfm.steps.study import PLAIN, Row, row_keys, run_split, study_context
from qfm.steps.units import (
    ENTRIES,
    CodeChangedError,
    UnitStore,
    check_code,
    code_context,
    device_key,
    git_state,
    imported_modules,
    unit_key,
)

REPO = Path(__file__).resolve().parents[1]
FULL: dict = {}  # params.yaml's student: QCC, pseudo-labels, a bank with the pool's pseudo-labels
PLAIN_ROW = {k: json.loads(json.dumps(v)) for k, v in PLAIN.items()}
ROLES = {"teacher", "pseudo", "bank", "model", "test"}


def _params(overrides: dict) -> dict:
    return load_params(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def _changed(before: dict, after: dict) -> set[str]:
    assert set(before) == set(after)
    return {role for role in before if before[role] != after[role]}


@pytest.fixture
def demo(tiny_demo, tmp_path) -> Path:
    """A private copy of the tiny demo (dataset and manifest): its pool may be edited. Returns the manifest."""
    shutil.copytree(tiny_demo.parent, tmp_path / "d", ignore=shutil.ignore_patterns("units", "run*"))
    return tmp_path / "d" / "manifest"


@pytest.fixture
def package(tmp_path) -> Path:
    """A copy of the qfm package whose code a test may edit."""
    shutil.copytree(Path(qfm.__file__).parent, tmp_path / "qfm", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "qfm"


# What keys the code -----------------------------------------------------------------------------------------

# One fresh interpreter imports the third-party libraries once, then forks a child per entry that imports the
# entry and reports the qfm modules it loaded (a fresh interpreter per entry spent ~7 s each re-importing torch).
LOADED_BY_ENTRY = """
import importlib, json, os, sys
for name in ("numpy", "pandas", "scipy.stats", "PIL.Image", "yaml", "torch", "torchvision", "timm", "mlflow",
             "faiss", "matplotlib.pyplot", "safetensors.torch", "onnxruntime", "boto3"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
assert not any(m == "qfm" or m.startswith("qfm.") for m in sys.modules), "a third-party import loaded qfm"
loaded = {}
for kind, entry in json.loads(sys.argv[1]).items():
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        importlib.import_module(entry)
        qfm_modules = sorted(m for m in sys.modules if m == "qfm" or m.startswith("qfm."))
        with os.fdopen(write, "w") as out:
            out.write(json.dumps(qfm_modules))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        loaded[kind] = json.loads(answer.read() or "null")
    _, status = os.wait()
    assert status == 0 and loaded[kind] is not None, f"importing {entry} failed (status {status})"
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def loaded_by_entry() -> dict[str, set[str]]:
    """Each kind's entry imported in a fresh interpreter (forked after the third-party imports): the qfm
    modules it loaded."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOADED_BY_ENTRY, json.dumps(ENTRIES)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {kind: set(modules) for kind, modules in json.loads(done.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize("kind", sorted(ENTRIES))
def test_each_kind_is_keyed_by_every_qfm_module_its_entry_loads(kind, loaded_by_entry):
    """Every qfm module importing the entry loads must be in the kind's key (the hand list this replaced
    missed qfm.runtime, qfm.data.manifest, qfm.data.splits and qfm.inference)."""
    loaded = loaded_by_entry[kind]
    keyed = set(imported_modules(ENTRIES[kind]))
    assert ENTRIES[kind] in loaded and not loaded - keyed, sorted(loaded - keyed)
    if kind == "train":  # a lazy import (inside a function) is keyed though importing the entry does not load it
        assert "qfm.storage.s3" in keyed and "qfm.storage.s3" not in loaded


def test_import_graph_follows_relative_submodule_and_lazy_imports(tmp_path):
    files = {"__init__.py": "", "steps/__init__.py": "", "steps/unused.py": "", "lazy.py": "",
             "steps/teacher.py": ("from . import common\nfrom qfm.data import images\nfrom qfm.data.manifest import "
                                  "read\n\n\ndef later():\n    from ..models import factory\n    import qfm.lazy\n"),
             "steps/common.py": "X = 1\n", "data/__init__.py": "", "data/images.py": "",
             "data/manifest.py": "def read():\n    pass\n", "data/other.py": "", "models/__init__.py": "",
             "models/factory.py": "", "plugins/__init__.py": ("import importlib\n\nfor name in ('a',):\n"
                                                            "    importlib.import_module(f'{__name__}.{name}')\n"),
             "plugins/a.py": "", "plugins/b.py": "from qfm.steps import unused\n"}
    for name, text in files.items():
        (tmp_path / "qfm" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "qfm" / name).write_text(text)
    assert imported_modules("qfm.steps.teacher", tmp_path / "qfm") == sorted(
        ["qfm", "qfm.steps", "qfm.steps.teacher", "qfm.steps.common", "qfm.data", "qfm.data.images",
         "qfm.data.manifest", "qfm.models", "qfm.models.factory", "qfm.lazy"])
    # a package importing its modules by computed name counts all of them, and what they import
    (tmp_path / "qfm" / "steps" / "teacher.py").write_text("import qfm.plugins\n")
    assert imported_modules("qfm.steps.teacher", tmp_path / "qfm") == sorted(
        ["qfm", "qfm.steps", "qfm.steps.teacher", "qfm.plugins", "qfm.plugins.a", "qfm.plugins.b",
         "qfm.steps.unused"])


def test_a_module_edit_rekeys_exactly_the_units_that_import_it(demo, package):
    """Fails on the old code: one code version for every unit (an edit of steps/evaluate.py re-keyed every
    teacher) from a hand list (an edit of runtime.py re-keyed nothing)."""
    data, device = study_context(demo, "cpu")["data"], device_key("cpu")
    full, plain = _params(FULL), _params(PLAIN_ROW)

    def keys() -> tuple[dict, dict]:
        context = {"data": data, **code_context(package), "device": device}
        return row_keys(demo, full, context), row_keys(demo, plain, context)

    base_full, base_plain = keys()
    assert set(base_full) == ROLES and set(base_plain) == {"teacher", "model", "test"}
    assert base_plain["model"] == base_plain["teacher"]  # the plain row's model is the teacher unit
    assert code_context(package)["code"] == code_context()["code"]  # the same code, wherever it lies

    def edit(module: str, text: str) -> tuple[set, set]:
        path = package / module
        original = path.read_text()
        path.write_text(original + text)
        try:
            after_full, after_plain = keys()
        finally:
            path.write_text(original)
        return _changed(base_full, after_full), _changed(base_plain, after_plain)

    assert edit("steps/bank.py", "\n# a comment\n") == (set(), set())
    assert edit("steps/bank.py", "\n_EDITED = 1\n") == ({"bank", "model", "test"}, set())
    assert edit("steps/student.py", "\n_EDITED = 1\n") == ({"model", "test"}, set())
    assert edit("steps/pseudo_label.py", "\n_EDITED = 1\n") == ({"pseudo", "bank", "model", "test"}, set())
    assert edit("steps/evaluate.py", "\n_EDITED = 1\n") == ({"test"}, {"test"})
    assert edit("runtime.py", "\n_EDITED = 1\n") == (ROLES, {"teacher", "model", "test"})


def test_a_worker_refuses_code_that_changed_under_the_study(demo, package, tmp_path):
    context = {"data": "d", **code_context(package), "device": device_key("cpu")}
    check_code(context, package)  # unchanged: no complaint
    (package / "snm" / "mining.py").write_text((package / "snm" / "mining.py").read_text() + "\n_EDITED = 1\n")
    with pytest.raises(CodeChangedError, match=r"changed: qfm\.snm\.mining.*rerun the study") as error:
        check_code(context, package)
    assert "the code of the bank, student, train unit(s)" in str(error.value)  # pseudo, evaluate: no mining
    # a spawned split process checks before its first unit: nothing is trained under a stale key
    study = study_context(demo, "cpu")
    study["code"]["train"] = "0" * 16
    study["modules"]["qfm.steps.teacher"] = "0" * 16
    with pytest.raises(CodeChangedError, match=r"train unit\(s\).*changed: qfm\.steps\.teacher"):
        run_split(str(demo), str(tmp_path / "units"), None, ["run.device=cpu"], [Row("a", ())], "split_0", study,
                  1, False)
    assert not [p for p in (tmp_path / "units" / "split_0").iterdir() if p.is_dir()]


# What keys the inputs ---------------------------------------------------------------------------------------

def test_a_pool_image_edit_rekeys_exactly_the_units_that_read_the_pool(demo):
    """Fails on the old code: the pool was keyed by its name only."""
    context = study_context(demo, "cpu")
    full, plain, no_pool = _params(FULL), _params(PLAIN_ROW), _params({"build_bank.include_pseudo": False,
                                                                        "train_student.use_pseudo_labels": False})
    before = [row_keys(demo, p, context) for p in (full, plain, no_pool)]
    assert "pseudo" not in before[2] and before[2]["bank"] != before[0]["bank"]
    image = min((demo.parent / "demo" / "pool").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    assert study_context(demo, "cpu")["data"] == context["data"]  # the manifest's images did not change
    after = [row_keys(demo, p, context) for p in (full, plain, no_pool)]
    assert _changed(before[0], after[0]) == {"pseudo", "bank", "model", "test"}
    assert after[1] == before[1] and after[2] == before[2]
    # the listing counts too: the same images listed in another order make another pool
    listing = demo.parent / "demo" / "pool.csv"
    header, *lines = listing.read_text().splitlines()
    listing.write_text("\n".join([header, *reversed(lines)]) + "\n")
    assert _changed(after[0], row_keys(demo, full, context)) == {"pseudo", "bank", "model", "test"}


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_weights_byte_rekeys_exactly_the_units_trained_from_it(demo, tmp_path):
    """Fails on the old code: model_options.weights was keyed by its text."""
    weights = tmp_path / "backbone.pt"
    weights.write_bytes(os.urandom(4096))
    context = study_context(demo, "cpu")
    option = {"weights": str(weights)}
    rows = {"student": _params(FULL | {"train_student.model_options": option}),
            "teacher": _params(PLAIN_ROW | {"train_teacher.model_options": option}),
            "other": _params(FULL)}
    before = {name: row_keys(demo, p, context) for name, p in rows.items()}
    _flip_one_byte(weights)
    after = {name: row_keys(demo, p, context) for name, p in rows.items()}
    assert _changed(before["student"], after["student"]) == {"model", "test"}
    assert _changed(before["teacher"], after["teacher"]) == {"teacher"}  # the plain model's recipe has none
    assert after["other"] == before["other"]


@pytest.mark.usefixtures("s3_env")
def test_s3_weights_are_keyed_by_the_objects_bytes(demo):
    """Fails on the old code: an s3:// URI was keyed by its text, so a new object under it reused units."""
    from qfm.storage.s3 import make_client

    client = make_client()
    client.create_bucket(Bucket="weights")
    data = bytearray(os.urandom(2048))
    client.put_object(Bucket="weights", Key="backbone.pt", Body=bytes(data))
    context = study_context(demo, "cpu")
    params = _params(FULL | {"train_student.model_options": {"weights": "s3://weights/backbone.pt"}})
    first = row_keys(demo, params, context)
    assert row_keys(demo, params, context) == first
    data[100] ^= 1
    client.put_object(Bucket="weights", Key="backbone.pt", Body=bytes(data))
    assert _changed(first, row_keys(demo, params, context)) == {"model", "test"}
    data[100] ^= 1
    client.put_object(Bucket="weights", Key="backbone.pt", Body=bytes(data))
    assert row_keys(demo, params, context) == first


# Context, device, source ------------------------------------------------------------------------------------

def test_a_unit_is_keyed_by_its_own_kinds_code_only(tmp_path):
    context = {"data": "d", "code": {kind: kind for kind in ENTRIES}, "modules": {"qfm.x": "1"},
               "device": {"type": "cpu"}}
    with UnitStore(tmp_path, context) as store:
        key = store.key("bank", {"params": {}})
    assert key == unit_key(context, "bank", {"params": {}})
    assert unit_key(context | {"modules": {"qfm.x": "2"}}, "bank", {"params": {}}) == key  # names, never keys
    assert unit_key(context | {"code": context["code"] | {"train": "t2"}}, "bank", {"params": {}}) == key
    assert unit_key(context | {"code": context["code"] | {"bank": "b2"}}, "bank", {"params": {}}) != key
    assert unit_key(context | {"device": {"type": "cpu", "cpu_capability": "x"}}, "bank", {"params": {}}) != key


def test_device_key_names_the_cpu_capability_and_the_faiss_build():
    import faiss

    key = device_key("cpu")
    assert key["type"] == "cpu" and key["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"faiss {faiss.__version__}" in key["faiss"] and "GPU(s)" in key["faiss"] and "gpu" not in key
    if torch.cuda.is_available():
        cuda = device_key("cuda")
        assert cuda["gpu"] == torch.cuda.get_device_name() and cuda["cuda"] == torch.version.cuda
        assert cuda["cudnn"] == torch.backends.cudnn.version()


def test_git_state_records_the_commit_and_a_dirty_tree(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("A = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("A = 2\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}
