"""The image a step runs is keyed on the code's commit: `qfm --version`, compile --image and submit's --image,
and a KFP-style cache key that changes with the commit (so a rebuilt image never meets cached results of
other code) and stays put at one commit (so caching still works)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import submit
from pipelines.compile import compile_pipeline, compile_study_pipeline
from qfm.errors import ConfigError
from qfm.version import commit_image, git_commit, keyed_image, version_string

A = "0123456789abcdef0123456789abcdef01234567"
REPO = Path(__file__).resolve().parents[1]
B = "fedcba9876543210fedcba9876543210fedcba98"


def cache_keys(path, arguments: dict | None = None) -> dict[str, str]:
    """Each root task's cache key, computed as the KFP v2 driver does for a container task: a hash of the
    task's resolved input parameters, its outputs' names and its container's image, command and args
    (the image string resolved with the inputs)."""
    spec = yaml.safe_load_all(path.read_text()).__next__()
    root = spec["root"]
    values = {name: p.get("defaultValue") for name, p in root["inputDefinitions"]["parameters"].items()}
    values |= arguments or {}
    keys = {}
    for name, task in root["dag"]["tasks"].items():
        executor = spec["components"][task["componentRef"]["name"]].get("executorLabel")
        if executor is None or "container" not in spec["deploymentSpec"]["executors"][executor]:
            continue  # the importer and the condition's sub-DAG: no container of their own
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        inputs = {}
        for key, source in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in source:
                inputs[key] = values[source["componentInputParameter"]]
            elif "runtimeValue" in source:
                inputs[key] = source["runtimeValue"]["constant"]
        image = container["image"]
        for key, value in inputs.items():
            image = image.replace(f"{{{{$.inputs.parameters['{key}']}}}}", str(value))
        fingerprint = {"inputs": inputs, "outputs": sorted(spec["components"][task["componentRef"]["name"]]
                                                          .get("outputDefinitions", {}).get("artifacts", {})),
                       "image": image, "cmd": container.get("command", []) + container.get("args", [])}
        keys[name] = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return keys


def _image_default(path) -> str:
    spec = next(yaml.safe_load_all(path.read_text()))
    return spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"]


@pytest.mark.parametrize("compile_", [compile_pipeline, compile_study_pipeline])
def test_compiling_at_two_commits_gives_two_images_and_two_cache_keys(compile_, tmp_path):
    at_a = compile_(tmp_path / "a.yaml", image="registry.example.com/qfm:0.1.0-cuda", commit=A)
    again = compile_(tmp_path / "a2.yaml", image="registry.example.com/qfm:0.1.0-cuda", commit=A)
    at_b = compile_(tmp_path / "b.yaml", image="registry.example.com/qfm:0.1.0-cuda", commit=B)
    assert _image_default(at_a) == "registry.example.com/qfm:0.1.0-cuda-0123456789ab"
    assert _image_default(at_b) == "registry.example.com/qfm:0.1.0-cuda-fedcba987654"
    keys_a, keys_b = cache_keys(at_a), cache_keys(at_b)
    assert len(keys_a) >= 1 and keys_a == cache_keys(again)  # one commit: the cache still hits
    assert all(keys_a[task] != keys_b[task] for task in keys_a)  # another commit: every step misses
    unkeyed = compile_(tmp_path / "plain.yaml")  # the committed form: the image is given at run time
    assert _image_default(unkeyed) == "qfm:0.1.0-cuda"
    assert cache_keys(unkeyed, {"image": "r/qfm:0.1.0-cuda-0123456789ab"}) != cache_keys(
        unkeyed, {"image": "r/qfm:0.1.0-cuda-fedcba987654"})


def test_commit_image_keys_tags_and_leaves_pinned_images_alone():
    assert commit_image("qfm:0.1.0-cuda", A) == "qfm:0.1.0-cuda-0123456789ab"
    assert commit_image("registry:5000/team/qfm:0.1.0-cpu", A + "-dirty") == \
        "registry:5000/team/qfm:0.1.0-cpu-0123456789ab-dirty"
    assert commit_image("registry:5000/qfm", A) == "registry:5000/qfm:latest-0123456789ab"
    keyed = "reg/qfm:0.1.0-cuda-fedcba987654"
    assert commit_image(keyed, A) == keyed
    digest = "reg/qfm@sha256:" + "ab" * 32
    assert commit_image(digest, A) == digest
    with pytest.raises(ValueError, match="is not a git commit hash"):
        commit_image("qfm:0.1.0-cuda", "main")


def test_keyed_image_needs_a_known_commit(monkeypatch):
    monkeypatch.setattr("qfm.version.git_commit", lambda root=None: None)
    with pytest.raises(ConfigError, match="the code's commit is unknown"):
        keyed_image("reg/qfm:0.1.0-cuda")
    assert keyed_image("reg/qfm@sha256:" + "0" * 64) == "reg/qfm@sha256:" + "0" * 64


def test_submit_runs_the_image_of_this_commit(capsys, monkeypatch):
    monkeypatch.setenv("QFM_GIT_COMMIT", B)
    args = ["--host", "http://127.0.0.1:9", "--dataset-uri", "s3://data/demo", "--pipeline-root", "s3://runs/qfm",
            "--image", "registry.example.com/qfm:0.1.0-cuda", "--dry-run"]
    assert submit.main(args) == 0
    assert json.loads(capsys.readouterr().out)["arguments"]["image"] == "registry.example.com/qfm:0.1.0-cuda-fedcba987654"


def test_version_names_the_commit(monkeypatch):
    monkeypatch.setenv("QFM_GIT_COMMIT", A)
    assert version_string() == f"qfm 0.1.0 (commit {A})"
    monkeypatch.delenv("QFM_GIT_COMMIT")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit() in (head, head + "-dirty")
    shown = subprocess.run([sys.executable, "-m", "qfm", "--version"], check=False, capture_output=True, text=True,
                           timeout=120, env={"QFM_GIT_COMMIT": A, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert shown.returncode == 0 and shown.stdout.strip() == f"qfm 0.1.0 (commit {A})"
