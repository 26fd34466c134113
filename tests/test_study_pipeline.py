"""The study pipeline (pipelines/qfm_study_pipeline.py): the compiled spec (the two ParallelFor loops, the
fan-ins, the artifact types, the GPU requests), the committed YAML, the plan's checks, and the whole DAG under
kfp.local on the tiny demo, loops included. No Kubernetes cluster exists here: what a cluster does with the
loops is asserted on the compiled spec only."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import yaml
from kfp import compiler, components
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics
from test_kfp_components import TINY, out

import components as qc
from pipelines.compile import STUDY_OUTPUT, compile_study_pipeline
from pipelines.qfm_study_pipeline import STUDY_SECTIONS, rows_argument, study_arguments
from qfm.config import load_params
from qfm.errors import ConfigError
from qfm.steps.study import PLAIN, _payload, study_context
from qfm.steps.units import UnitStore

REPO = Path(__file__).resolve().parents[1]
GPU_STEPS = {"study-units", "study-row"}
CPU_STEPS = {"ingest", "validate", "study-plan", "study-gather", "study-report"}
ROWS = {"reference": "baseline",
        "rows": {"baseline": {"train_student.qcc": False, "train_student.use_pseudo_labels": False},
                 "qcc": {"train_student.use_pseudo_labels": False, "build_bank.include_pseudo": False,
                         "train_student.alpha": 0.5}}}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict, dict]:
    path = compile_study_pipeline(tmp_path_factory.mktemp("compiled") / "qfm_study_pipeline.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    return path, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_study_yaml_is_up_to_date(compiled):
    # parsed, not as text: kfp's header comment prints dict defaults in protobuf's (unstable) key order
    assert list(yaml.safe_load_all(STUDY_OUTPUT.read_text())) == list(yaml.safe_load_all(compiled[0].read_text())), \
        "pipelines/qfm_study_pipeline.yaml is stale: run `python -m pipelines.compile` and commit the result"


def test_compiled_yaml_round_trips_and_carries_the_default_rows(compiled, tmp_path):
    path, spec, _ = compiled
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "qfm-study"
    compiler.Compiler().compile(loaded, str(tmp_path / "again.yaml"))
    assert list(yaml.safe_load_all((tmp_path / "again.yaml").read_text())) == list(yaml.safe_load_all(path.read_text()))
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(STUDY_SECTIONS) <= set(inputs) and "promote" not in inputs and "default" not in inputs["dataset_uri"]
    assert json.loads(inputs["rows"]["defaultValue"]) == {"rows": {"baseline": PLAIN, "qfm": {}},
                                                          "reference": "baseline"}
    assert inputs["study_splits"]["defaultValue"] == [] and inputs["study_splits"]["parameterType"] == "LIST"
    assert json.loads(inputs["train_student"]["defaultValue"])["epochs"] == 4


def test_parallel_for_over_splits_then_rows_with_two_fan_ins(compiled):
    _, spec, _ = compiled
    root, comps = spec["root"]["dag"]["tasks"], spec["components"]
    assert set(root) == {"importer", "ingest", "validate", "study-plan", "for-loop-1", "study-report"}
    splits_loop = root["for-loop-1"]
    assert splits_loop["taskInfo"]["name"] == "for-each-split"
    assert splits_loop["parameterIterator"] == {"itemInput": "pipelinechannel--study-plan-Output-loop-item",
                                                "items": {"inputParameter": "pipelinechannel--study-plan-Output"}}
    assert root["study-plan"]["dependentTasks"] == ["importer", "ingest", "validate"]  # after the data checks
    per_split = comps["comp-for-loop-1"]["dag"]["tasks"]
    assert set(per_split) == {"study-units", "for-loop-2", "study-gather"}
    assert per_split["study-units"]["inputs"]["parameters"]["split"] == {
        "componentInputParameter": "pipelinechannel--study-plan-Output-loop-item"}
    rows_loop = per_split["for-loop-2"]
    assert rows_loop["taskInfo"]["name"] == "for-each-row" and rows_loop["dependentTasks"] == ["study-units"]
    assert rows_loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--study-units-Output"}
    row = comps["comp-for-loop-2"]["dag"]["tasks"]["study-row"]["inputs"]
    for key in ("split", "row"):  # both from the inner item, {"split": ..., "row": ...}
        assert row["parameters"][key] == {"componentInputParameter": "pipelinechannel--study-units-Output-loop-item",
                                          "parameterExpressionSelector": f'parseJson(string_value)["{key}"]'}
    assert row["artifacts"]["units"] == {"componentInputArtifact": "pipelinechannel--study-units-units"}
    # fan-in 1: the rows of one split (dsl.Collected inside the split loop) -> study-gather
    assert comps["comp-for-loop-2"]["dag"]["outputs"]["artifacts"]["pipelinechannel--study-row-result"] == {
        "artifactSelectors": [{"outputArtifactKey": "result", "producerSubtask": "study-row"}]}
    assert per_split["study-gather"]["inputs"]["artifacts"]["results"] == {"taskOutputArtifact": {
        "outputArtifactKey": "pipelinechannel--study-row-result", "producerTask": "for-loop-2"}}
    # fan-in 2: every split's gathered results -> study-report
    assert comps["comp-for-loop-1"]["dag"]["outputs"]["artifacts"]["pipelinechannel--study-gather-split_results"] == {
        "artifactSelectors": [{"outputArtifactKey": "split_results", "producerSubtask": "study-gather"}]}
    assert root["study-report"]["inputs"]["artifacts"]["splits"] == {"taskOutputArtifact": {
        "outputArtifactKey": "pipelinechannel--study-gather-split_results", "producerTask": "for-loop-1"}}
    for name, key in (("comp-study-gather", "results"), ("comp-study-report", "splits")):
        assert comps[name]["inputDefinitions"]["artifacts"][key]["isArtifactList"] is True


def test_output_artifact_types(compiled):
    _, spec, _ = compiled
    types = {name: {key: a["artifactType"]["schemaTitle"] for key, a in
                    spec["components"][f"comp-{name}"]["outputDefinitions"]["artifacts"].items()}
             for name in ("study-plan", "study-units", "study-row", "study-gather", "study-report")}
    assert types == {"study-plan": {"plan": "system.Artifact"}, "study-units": {"units": "system.Artifact"},
                     "study-row": {"result": "system.Dataset", "metrics": "system.Metrics"},
                     "study-gather": {"split_results": "system.Dataset"},
                     "study-report": {"study": "system.Dataset", "report": "system.Markdown",
                                      "plot": "system.HTML", "metrics": "system.Metrics"}}
    returns = {name: spec["components"][f"comp-{name}"]["outputDefinitions"]["parameters"]["Output"]["parameterType"]
               for name in ("study-plan", "study-units", "study-report")}
    assert returns == {"study-plan": "LIST", "study-units": "LIST", "study-report": "NUMBER_INTEGER"}


def test_training_steps_request_gpus_inside_the_loops(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{s}" for s in GPU_STEPS | CPU_STEPS} | {"exec-importer"}
    for step in GPU_STEPS | CPU_STEPS:
        container, k8s = executors[f"exec-{step}"]["container"], platform[f"exec-{step}"]
        assert container["image"] == "{{$.inputs.parameters['pipelinechannel--image']}}"
        names = {e["secretNameParameter"]["componentInputParameter"].removeprefix("pipelinechannel--")
                 for e in k8s["secretAsEnv"]}
        assert names == {"s3_secret", "mlflow_secret"} and "env" not in container
        if step in GPU_STEPS:
            assert container["resources"]["accelerator"] == {
                "resourceCount": "{{$.inputs.parameters['pipelinechannel--gpu_count']}}",
                "resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}"}
            assert k8s["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter":
                                                                "pipelinechannel--gpu_node_selector"}}
            assert k8s["tolerations"] == [{"tolerationJson": {"componentInputParameter":
                                                              "pipelinechannel--gpu_tolerations"}}]
            assert k8s["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "2Gi",
                                              "volumeName": "dshm"}]
        else:
            assert "resources" not in container and "nodeSelector" not in k8s and "emptyDirMounts" not in k8s


def test_every_channel_a_task_reads_is_an_input_of_its_loop(compiled):
    """The resource placeholders of a task inside a loop read pipelinechannel--gpu_count and --accelerator_type:
    each loop must declare them (kfp 2.17 does not by itself; the pipeline registers them)."""
    _, spec, _ = compiled
    for name in ("comp-for-loop-1", "comp-for-loop-2"):
        declared = set(spec["components"][name]["inputDefinitions"]["parameters"])
        for task in spec["components"][name]["dag"]["tasks"].values():
            for param in task["inputs"].get("parameters", {}).values():
                source = param.get("componentInputParameter")
                assert source is None or source in declared, (name, source)
        assert {"pipelinechannel--gpu_count", "pipelinechannel--accelerator_type"} <= declared


def test_study_arguments_carry_the_rows_file_and_the_splits(tmp_path):
    rows = tmp_path / "rows.yaml"
    rows.write_text(yaml.safe_dump(ROWS, sort_keys=False))
    args = study_arguments(load_params(None, overrides=["train_student.epochs=7"]), str(rows), ["split_3"])
    assert json.loads(args["rows"]) == ROWS and args["study_splits"] == ["split_3"]
    assert json.loads(args["train_student"])["epochs"] == 7 and set(args) == {*STUDY_SECTIONS, "rows", "study_splits"}
    rows.write_text(yaml.safe_dump({"rows": {"a": {"run.split": "split_1"}}}))
    with pytest.raises(ConfigError, match="sets 'run.split'"):
        rows_argument(str(rows))


# study-plan, called as a function: what it refuses, and the context it records --------------------------------

def _plan(tiny_demo, tmp_path, rows, splits=(), *overrides):
    sections = study_arguments(load_params(None, overrides=[*TINY, *overrides]))
    return qc.study_plan.python_func(
        manifest=Dataset(name="manifest", uri=str(tiny_demo)), dataset=Dataset(name="dataset", uri=str(
            tiny_demo.parent / "demo")), rows=rows, study_splits=list(splits),
        plan=out(Artifact, tmp_path / "plan"), **{k: sections[k] for k in (
            "run", "train_teacher", "pseudo_label", "build_bank", "train_student")})


def test_plan_checks_rows_and_splits_naming_the_parameter(tiny_demo, tmp_path):
    bad = [("not json", "pipeline parameter 'rows' is not JSON"),
           (json.dumps({"rows": {}}), "pipeline parameter 'rows': needs 'rows:'"),
           (json.dumps({"rows": {"a/b": {}}}), r"row name\(s\) \['a/b'\] may use only"),
           (json.dumps({"rows": {"a": {"train_student.alhpa": 1}}}), "row 'a'.*did you mean 'alpha'"),
           (json.dumps({"rows": {"a": {}}, "reference": "b"}), "reference 'b' is not one of the rows")]
    for rows, message in bad:
        with pytest.raises(ConfigError, match=message):
            _plan(tiny_demo, tmp_path, rows)
    with pytest.raises(ConfigError, match=r"'study_splits': split\(s\) \['split_7'\] are not in the manifest"):
        _plan(tiny_demo, tmp_path, json.dumps(ROWS), ["split_7"])


def test_plan_records_the_splits_rows_and_the_context_of_qfm_study(tiny_demo, tmp_path):
    splits = _plan(tiny_demo, tmp_path, json.dumps(ROWS))
    assert splits == ["split_0", "split_1"]  # none given: all of the manifest's
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    context = study_context(tiny_demo, "cpu")
    # the units' keys of `qfm study` (the device is each worker's own)
    assert plan["context"] == {k: v for k, v in context.items() if k != "device"}
    assert set(plan["context"]["code"]) == {"train", "pseudo", "bank", "student", "evaluate"}
    assert set(plan["source"]) == {"commit", "dirty"}
    assert plan["rows"] == ["baseline", "qcc"] and plan["reference"] == "baseline"
    assert yaml.safe_load((tmp_path / "plan" / "rows.yaml").read_text()) == ROWS
    assert yaml.safe_load((tmp_path / "plan" / "params.yaml").read_text())["train_teacher"]["epochs"] == 1


# The whole DAG under kfp.local ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_study(tiny_demo, tmp_path_factory):
    """The study pipeline on the tiny demo: 2 splits x 2 rows (baseline, qcc), one epoch each."""
    from pipelines.local_run import run_study_local

    tmp = tmp_path_factory.mktemp("kfp-study")
    rows = tmp / "rows.yaml"
    rows.write_text(yaml.safe_dump(ROWS, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # see test_kfp_components.one_thread
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(tmp)
        run_dir = run_study_local(load_params(None, overrides=TINY), tiny_demo.parent / "demo", tmp / "kfp", rows)
    return run_dir


def _executor_output(folder: Path) -> dict:
    return json.loads((folder / "executor_output.json").read_text())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner:UserWarning")
def test_local_run_publishes_the_paired_study(local_study):
    report = local_study / "study-report"
    folder = report / "study"
    study = json.loads((folder / "study.json").read_text())
    assert study["splits"] == ["split_0", "split_1"] and study["reference"] == "baseline"
    rows = {r["row"]: r for r in study["rows"]}
    assert set(rows) == {"baseline", "qcc"} and not rows["qcc"]["errors"] and not rows["baseline"]["errors"]
    vs = rows["qcc"]["vs_reference"]["test_srcc"]
    per_split = [rows["qcc"]["test_srcc"]["per_split"][s] - rows["baseline"]["test_srcc"]["per_split"][s]
                 for s in study["splits"]]
    assert vs["n"] == 2 and vs["differences"] == pytest.approx(per_split)
    assert rows["qcc"]["vs_reference"]["image_bootstrap"]["srcc"]["n_images"] > 0
    assert (report / "report").read_text() == (folder / "study.md").read_text()
    assert "| qcc | test SRCC | 2 |" in (report / "report").read_text()
    html = (report / "plot").read_text()
    png = base64.b64decode(html.split("base64,")[1].split('"')[0])
    assert png == (folder / "study_differences.png").read_bytes() and png.startswith(b"\x89PNG")
    for split, results in study["per_split"].items():  # predictions travel with the study, relative to it
        for result in results.values():
            assert (folder / result["predictions"]).is_file() and result["predictions"].startswith(f"runs/{split}/")
    logged = _executor_output(report)["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["failed_runs"] == 0 and _executor_output(report)["parameterValues"]["Output"] == 0
    assert logged["qcc_test_srcc_diff_mean"] == pytest.approx(vs["mean"])
    assert [logged["qcc_test_srcc_diff_ci_corrected_low"],
            logged["qcc_test_srcc_diff_ci_corrected_high"]] == pytest.approx(vs["ci_corrected"])
    for name, entry in rows.items():
        assert logged[f"{name}_test_srcc_median"] == pytest.approx(entry["test_srcc"]["median"])
        assert logged[f"{name}_val_srcc_median"] == pytest.approx(entry["val_srcc"]["median"])


def _units_of(run_dir: Path, split_index: int) -> Path:
    return run_dir / f"for-loop-1-iteration-{split_index}" / "study-units" / "units"


@pytest.mark.slow
def test_shared_units_are_trained_once_per_split_and_keyed_as_qfm_study_keys_them(local_study, tiny_demo):
    study = json.loads((local_study / "study-report" / "study" / "study.json").read_text())
    params = load_params(None, overrides=TINY)
    with UnitStore(local_study / "unused", study_context(tiny_demo, "cpu")) as store:  # `qfm study`'s context
        teacher_key = store.key("train", {"params": _payload(params["train_teacher"])})
    for index, split in enumerate(study["splits"]):
        units = sorted(p.name for p in _units_of(local_study, index).iterdir() if p.is_dir())
        chains = {row: result["units"] for row, result in study["per_split"][split].items()}
        assert units == sorted([f"bank-{chains['qcc']['bank']}", f"train-{teacher_key}"])  # one teacher, one bank
        assert chains["baseline"] == {"teacher": teacher_key, "model": teacher_key}  # the plain row is the teacher
        assert chains["qcc"]["teacher"] == teacher_key and chains["qcc"]["model"] != teacher_key


@pytest.mark.slow
def test_a_failing_row_is_recorded_and_reported_not_fatal(local_study, tiny_demo, tmp_path):
    """A row that breaks at run time (an unknown model passes the schema) is listed in the report; the others
    are compared as usual."""
    plan = tmp_path / "plan"
    shutil.copytree(local_study / "study-plan" / "plan", plan)
    rows = yaml.safe_load((plan / "rows.yaml").read_text())
    rows["rows"]["broken"] = {**PLAIN, "train_student.model": "no_such_model"}
    (plan / "rows.yaml").write_text(yaml.safe_dump(rows, sort_keys=False))
    planned = json.loads((plan / "plan.json").read_text()) | {"splits": ["split_0"]}
    (plan / "plan.json").write_text(json.dumps(planned))
    manifest = Dataset(name="manifest", uri=str(local_study / "ingest" / "manifest"))
    dataset = Dataset(name="dataset", uri=str(tiny_demo.parent / "demo"))  # what the importer imported
    result = out(Dataset, tmp_path / "broken")
    qc.study_row.python_func(manifest=manifest, dataset=dataset, plan=Artifact(name="plan", uri=str(plan)),
                             units=Artifact(name="units", uri=str(_units_of(local_study, 0))), split="split_0",
                             row="broken", result=result, metrics=out(Metrics, tmp_path / "broken-metrics"))
    recorded = json.loads((tmp_path / "broken" / "row.json").read_text())
    assert "unknown model 'no_such_model'" in recorded["result"]["error"] and result.metadata["failed"] is True
    finished = [Dataset(name="result", uri=str(p / "study-row" / "result"))
                for p in sorted((local_study / "for-loop-1-iteration-0").glob("for-loop-2-iteration-*"))]
    gathered = out(Dataset, tmp_path / "split_0")
    qc.study_gather.python_func(split="split_0", results=[*finished, result], split_results=gathered)
    study = out(Dataset, tmp_path / "study")
    failed = qc.study_report.python_func(plan=Artifact(name="plan", uri=str(plan)), splits=[gathered], study=study,
                                         report=out(Markdown, tmp_path / "report.md"),
                                         plot=out(HTML, tmp_path / "plot.html"),
                                         metrics=out(Metrics, tmp_path / "metrics"))
    markdown = (tmp_path / "report.md").read_text()
    assert failed == 1 and "## Failed" in markdown and "- `broken` on split_0: " in markdown
    saved = {r["row"]: r for r in json.loads((tmp_path / "study" / "study.json").read_text())["rows"]}
    assert saved["qcc"]["splits_done"] == ["split_0"] and saved["broken"]["splits_done"] == []


def test_local_run_command_checks_the_study_options(tiny_demo, tmp_path, capsys):
    from pipelines import local_run

    with pytest.raises(SystemExit) as exit_code:
        local_run.main(["--rows", str(tmp_path / "rows.yaml")])
    assert exit_code.value.code == 2 and "add --study" in capsys.readouterr().err
    code = local_run.main(["--study", "--rows", str(tmp_path / "none.yaml"), "--params", str(REPO / "params.yaml"),
                           "--dataset", str(tiny_demo.parent / "demo"), "--out", str(tmp_path / "kfp")])
    assert code == 2 and f"rows file {tmp_path / 'none.yaml'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "kfp").exists()  # refused before kfp.local started


# pipelines.submit --study without a cluster -----------------------------------------------------------------

def _submit(*extra: str) -> list[str]:
    return ["--host", "http://127.0.0.1:9", "--dataset-uri", "s3://data/demo", "--pipeline-root", "s3://runs/qfm",
            "--image", "registry.example.com/qfm:0.1.0-cuda", "--params", str(REPO / "params.yaml"), *extra]


def test_submit_study_dry_run_carries_the_rows_and_splits(tmp_path, capsys):
    from pipelines import submit

    rows = tmp_path / "rows.yaml"
    rows.write_text(yaml.safe_dump(ROWS, sort_keys=False))
    assert submit.main(_submit("--study", "--rows", str(rows), "--splits", "split_0,split_2", "--dry-run",
                               "--set", "train_student.epochs=9")) == 0
    sent = json.loads(capsys.readouterr().out)
    args = sent["arguments"]
    assert json.loads(args["rows"]) == ROWS and args["study_splits"] == ["split_0", "split_2"] and sent["study"]
    assert json.loads(args["train_student"])["epochs"] == 9 and sent["run_name"].startswith("qfm-demo-study-")
    assert not {"min_val_srcc", "nodes", "gpus_per_node", "training_pod_gpus", "promote"} & set(args)
    bad = [(["--rows", str(rows)], "--rows and --splits belong to the study pipeline: add --study"),
           (["--study", "--nodes", "2"], "the study pipeline trains each row in its own pod"),
           (["--study", "--rows", str(tmp_path / "none.yaml")], f"rows file {tmp_path / 'none.yaml'} does not exist")]
    for extra, message in bad:
        assert submit.main(_submit(*extra, "--dry-run")) == 2
        assert message in capsys.readouterr().err


def test_submit_study_sends_the_study_pipeline(monkeypatch):
    import kfp

    from pipelines import submit

    sent = {}

    class Client:  # stands in for the KFP API: records what would be created
        def __init__(self, host, namespace):
            sent["host"] = host

        def create_run_from_pipeline_package(self, package, arguments, **options):
            sent["spec"] = next(yaml.safe_load_all(Path(package).read_text()))
            sent["arguments"], sent["options"] = arguments, options
            return type("Run", (), {"run_id": "run-1"})()

    monkeypatch.setattr(submit, "check_host", lambda host, timeout: host)
    monkeypatch.setattr(kfp, "Client", Client)
    assert submit.main(_submit("--study", "--run-name", "study-1")) == 0
    assert sent["spec"]["pipelineInfo"]["name"] == "qfm-study"
    assert set(sent["arguments"]) <= set(sent["spec"]["root"]["inputDefinitions"]["parameters"])
    assert sent["options"]["run_name"] == "study-1" and sent["options"]["pipeline_root"] == "s3://runs/qfm"


def test_a_row_whose_shared_units_fail_is_recorded_and_reported_not_fatal(tiny_demo, tmp_path):
    """study-units on one split with a row whose teacher cannot be built (first, so it fails before anything
    trains): the step goes on and makes the other row's units; that row's study-row records the units' error
    without a second try; the report lists it, compares the rest, and does not fail with "no results"."""
    rows = {"reference": "plain",
            "rows": {"broken": {**PLAIN, "train_teacher.model": "no_such_model"}, "plain": PLAIN}}
    assert _plan(tiny_demo, tmp_path, json.dumps(rows), ["split_0"]) == ["split_0"]
    plan = Artifact(name="plan", uri=str(tmp_path / "plan"))
    manifest, dataset = Dataset(name="manifest", uri=str(tiny_demo)), Dataset(name="dataset", uri=str(
        tiny_demo.parent / "demo"))
    units = out(Artifact, tmp_path / "units")
    items = qc.study_units.python_func(manifest=manifest, dataset=dataset, plan=plan, split="split_0", units=units)
    assert items == [{"split": "split_0", "row": "broken"}, {"split": "split_0", "row": "plain"}]
    failures = json.loads((tmp_path / "units" / "failed_rows.json").read_text())
    assert list(failures) == ["broken"] and "unknown model 'no_such_model'" in failures["broken"]
    assert units.metadata["failed_rows"] == 1 and units.metadata["units"] == 1  # the plain row's teacher

    results = []
    for row in ("broken", "plain"):
        results.append(out(Dataset, tmp_path / row))
        qc.study_row.python_func(manifest=manifest, dataset=dataset, plan=plan, units=units, split="split_0",
                                 row=row, result=results[-1], metrics=out(Metrics, tmp_path / f"{row}-metrics"))
    recorded = json.loads((tmp_path / "broken" / "row.json").read_text())["result"]
    assert recorded == {"error": failures["broken"]} and results[0].metadata["failed"] is True
    assert "test" in json.loads((tmp_path / "plain" / "row.json").read_text())["result"]
    gathered = out(Dataset, tmp_path / "split_0")
    qc.study_gather.python_func(split="split_0", results=results, split_results=gathered)
    failed = qc.study_report.python_func(plan=plan, splits=[gathered], study=out(Dataset, tmp_path / "study"),
                                         report=out(Markdown, tmp_path / "report.md"),
                                         plot=out(HTML, tmp_path / "plot.html"),
                                         metrics=out(Metrics, tmp_path / "metrics"))
    markdown = (tmp_path / "report.md").read_text()
    assert failed == 1 and "## Failed" in markdown and "- `broken` on split_0: " in markdown
    assert "unknown model 'no_such_model'" in markdown
    saved = {r["row"]: r for r in json.loads((tmp_path / "study" / "study.json").read_text())["rows"]}
    assert saved["plain"]["splits_done"] == ["split_0"] and saved["broken"]["splits_done"] == []
