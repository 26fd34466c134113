"""train-final: the model to ship, the recipe on every labelled image but a carved validation part (as
`qfm train-final`), in this step's pod."""

from typing import NamedTuple

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import load_section, local_manifest, log_training_metrics, note_summary, qfm_component


@qfm_component
def train_final(manifest: Input[Dataset], dataset: Input[Dataset], train_teacher: str, pseudo_label: str,
                build_bank: str, train_student: str, run: str, final: str, tracking: str, model: Output[Model],
                data: Output[Dataset], metrics: Output[Metrics]) -> NamedTuple("Outputs", [("val_srcc", float),
                                                                                         ("run", str)]):
    """Train the final model into `model` (best.safetensors, model.onnx, final.json, ...); `data` holds the
    manifest with its split column 'final' (train / val), which promote gates it on. Returns the chosen
    epoch's validation SRCC and the run section with split 'final' (promote's run parameter)."""
    import dataclasses
    import json
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from qfm.steps.final import DATA_DIR, FINAL_SPLIT
    from qfm.steps.final import train_final as train

    texts = {"train_teacher": train_teacher, "pseudo_label": pseudo_label, "build_bank": build_bank,
             "train_student": train_student, "run": run, "final": final, "tracking": tracking}
    sections = {name: load_section(name, text) for name, text in texts.items()}
    record = train(local_manifest(manifest.path, dataset.path), model.path, sections, progress=False)
    shutil.copytree(Path(model.path) / DATA_DIR, data.path, dirs_exist_ok=True)
    summary = {"best_epoch": record["best_epoch"], "val": record["val"]}
    log_training_metrics(metrics, summary)
    note_summary(model, {k: v for k, v in record.items() if k not in ("val", "recipe", "params", "scale")})
    final_run = json.dumps(dataclasses.asdict(dataclasses.replace(sections["run"], split=FINAL_SPLIT)),
                           sort_keys=True)
    outputs = namedtuple("Outputs", ["val_srcc", "run"])
    return outputs(float(record["val"]["srcc"]), final_run)
