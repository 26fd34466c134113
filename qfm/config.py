"""params.yaml: one section per pipeline stage, checked against a schema (unknown keys and wrong types
are rejected with the key named)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qfm.errors import ConfigError


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0
    n_scenes: int = 80                  # procedural dead-leaves scenes (each distortion at one level)
    n_references: int = 0               # 0..19 packaged images: the 14 natural photographs first, then scientific ones
    n_levels: int = 4                   # distortion levels per type
    pool_levels: int = 3                # levels of the unlabelled pool's distortions (0: no pool)
    image_size: int = 384


@dataclass(frozen=True)
class IngestParams:
    format: str = "demo"
    root: str = "artifacts/demo"
    options: dict = field(default_factory=dict)
    skip_invalid: bool = False


@dataclass(frozen=True)
class SplitParams:
    n_splits: int = 10
    test_fraction: float = 0.2
    val_fraction: float = 0.125
    seed: int = 2024


@dataclass(frozen=True)
class ValidateParams:
    min_width: int = 224
    min_height: int = 224


@dataclass(frozen=True)
class RunParams:
    """What every training-time step shares: the split column it works on and the device."""

    split: str = "split_0"
    device: str = "auto"                # auto = CUDA when present, else CPU
    threads: int = 0                    # torch's CPU threads; 0 = torch's default (every core)


@dataclass(frozen=True)
class TrainParams:
    """The DEIQT recipe on one split; the teacher uses it as is, the student adds the QCC fields."""

    model: str = "qfm_mobilenetv2"
    model_options: dict = field(default_factory=dict)  # e.g. {d: 256, weights: path-or-s3-uri}
    epochs: int = 4
    batch_size: int = 8                 # images per batch (each gives n_crops crops)
    n_crops: int = 4
    crop_size: int = 224
    test_grid: str = "3x3"
    test_flip: bool = False             # also score each test crop mirrored (validation, test and scoring)
    resize: str | None = None           # e.g. "512x384" for KonIQ/SPAQ, "short_side=384"
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    clip_grad: float = 5.0
    select_metric: str = "srcc"         # chosen on the validation part, never on test
    select: str = "best"                # best: the epoch best on val; last: the last epoch (a fixed schedule);
                                        # average: the mean weights of the last average_epochs epochs
    average_epochs: int = 2
    workers: int | str = "auto"         # DataLoader workers; auto: from the device and core count (qfm/runtime.py)
    seed: int = 0
    amp: bool = True                    # bf16 autocast on GPU; ignored on CPU


@dataclass(frozen=True)
class StudentParams(TrainParams):
    """QCC student: partners from the SNM pair table, DLE pseudo-labels, optional contrastive / distillation."""

    qcc: bool = True
    alpha: float = 0.1                  # T' = T + alpha * N (chosen on clive-dev val parts)
    qcc_mode: str = "label"             # label | clean | both
    lambda_qcc: float = 0.5
    lambda_con: float = 0.0
    lambda_pl: float = 0.5
    lambda_kd: float = 0.0
    temperature: float = 0.1
    positive_gap: float = 0.05          # contrastive positives: crops whose quality differs by at most this
    resample_partners: bool = True      # a new random partner for each anchor every epoch; false: its nearest
                                        # free partner in the pair table's rank order
    use_pseudo_labels: bool = True      # DLE: train on the kept pseudo-labels (lambda_pl 0 also leaves them out)
    allow_empty_pairs: bool = False     # train without QCC when the pair table is empty


@dataclass(frozen=True)
class PseudoLabelParams:
    """DLE: the frozen teacher scores an unlabelled pool; the most confident predictions are kept."""

    pool: str = "pool.csv"              # CSV (image[, content_id]) or folder under the dataset root; "synthetic":
                                        # distorted copies of the split's train images; "" = no DLE
    synthetic_per_image: int = 1        # pool: synthetic -> this many distorted copies per train image
    keep_quantile: float = 0.5          # keep this share of the pool with the lowest crop spread
    max_uncertainty: float | None = None  # and/or an absolute cap on the crop spread
    skip_unreadable: bool = False       # true: list unreadable pool images and go on; false: stop naming them
    batch_size: int = 16
    workers: int | str = "auto"


@dataclass(frozen=True)
class BankParams:
    """SNM: teacher-encoder embeddings of the training images, a faiss index, noise-partner mining."""

    rule: str = "aliasing"              # aliasing | semantic (see docs/method.md)
    descriptor: str = "teacher"         # teacher: the fine-tuned teacher's backbone; backbone: the pretrained
                                        # encoder before fine-tuning (semantic, ImageNet features)
    k: int = 32
    tau: float = 0.2                    # aliasing: |quality gap| >= tau
    delta: float = 0.05                 # semantic: |quality gap| <= delta
    max_partners: int = 4
    index: str = "auto"                 # auto | exact | ivf | hnsw
    ann_threshold: int = 50000          # auto: exact below, IVF above (recall measured and reported)
    include_pseudo: bool = True
    batch_size: int = 16
    workers: int | str = "auto"


@dataclass(frozen=True)
class TrackingParams:
    """MLflow tracking of every step (qfm/tracking.py). Off unless a params file turns it on, so the library
    and ad-hoc commands run without MLflow; $MLFLOW_TRACKING_URI, when set, overrides `uri`."""

    enabled: bool = False
    uri: str = "sqlite:///mlflow.db"    # relative to the working folder (the project root under dvc repro)
    artifacts: str = "mlartifacts"      # artifact folder of a new experiment in a local (sqlite/file) store
    experiment: str = "qfm"
    log_checkpoints: bool = False       # false: log each checkpoint's path and SHA-256; true: upload the file
    pipeline_run: str = ""              # groups one pipeline run's stages; "" = $QFM_PIPELINE_RUN, else derived
                                        # from the git commit and all parameters


@dataclass(frozen=True)
class PromoteParams:
    """Registry and gated promotion (qfm promote): the student becomes `challenger`, and `champion` only if
    its validation metric beats the champion's, on the same data, by `margin`."""

    model_name: str = "qfm-iqm"
    metric: str = "srcc"                # a validation metric of the training summary: srcc, krcc, plcc_raw, ...
    margin: float = 0.01                # required improvement (lower-is-better metrics such as rmse: decrease)


@dataclass(frozen=True)
class FinalParams:
    """The final model (qfm train-final): the recipe on every labelled image but a carved validation part."""

    val_fraction: float = 0.1           # share of the content kept to choose the epoch (content-disjoint)
    seed: int = 2024                    # seed of that carve


@dataclass(frozen=True)
class StorageParams:
    """S3 transfers (s3:// dataset roots, step folders, checkpoints). Credentials and region come only from
    the standard AWS settings (environment, ~/.aws, the machine's role), never from this file."""

    endpoint_url: str | None = None     # an S3-compatible store (MinIO, Ceph); null: AWS_ENDPOINT_URL, else AWS
    cache: str = ".qfm-cache"           # local mirror of s3:// folders, as CACHE/bucket/key
    workers: int = 16                   # parallel transfers
    max_attempts: int = 8               # tries per request (botocore standard retries) and per object read


SECTIONS: dict[str, type] = {
    "demo": DemoParams,
    "ingest": IngestParams,
    "splits": SplitParams,
    "validate": ValidateParams,
    "run": RunParams,
    "train_teacher": TrainParams,
    "pseudo_label": PseudoLabelParams,
    "build_bank": BankParams,
    "train_student": StudentParams,
    "tracking": TrackingParams,
    "promote": PromoteParams,
    "storage": StorageParams,
    "final": FinalParams,
}


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    base = origin or annotation
    return isinstance(value, base)


def parse_section(name: str, data: dict | None, source: str = "params.yaml") -> Any:
    """Build one section's dataclass from a mapping; unknown keys or wrong types raise ConfigError."""
    cls = SECTIONS[name]
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{name}.{key}'{hint}; allowed: {sorted(fields)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: '{name}.{key}' must be {getattr(hints[key], '__name__', hints[key])}, "
                              f"got {value!r} ({type(value).__name__})")
    return cls(**data)


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> dict[str, Any]:
    """Every known section of a params file (None: defaults only), validated, after applying overrides
    of the form 'section.key=value' (value read as YAML); missing sections take their defaults."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"parameters file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of stage sections")
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set '{item}' is not SECTION.KEY=VALUE (e.g. train_student.lambda_qcc=0)")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--set '{item}': section '{section}' is not a mapping")
        raw[section][key] = yaml.safe_load(value)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path or 'parameters'}: unknown section(s) {unknown}; known sections: {sorted(SECTIONS)}")
    source = str(path) if path is not None else "parameters"
    return {name: parse_section(name, raw.get(name), source) for name in SECTIONS}
