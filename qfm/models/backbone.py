"""Any timm model as a token encoder: (global token, other tokens) at the backbone's own width.

ViT-like models (``forward_features`` gives (B, N, C)): the CLS token is the global token (the mean of the
patch tokens when the model has no class token) and the tokens after the model's ``num_prefix_tokens`` are
the patch tokens. CNNs (a (B, C, H, W) map, or NHWC where the model says so): the last feature map
flattened to H*W tokens, its spatial mean the global token.

Multi-stage (``stages``, CNNs only, as HyperIQA and TOPIQ draw on low-level features): the feature maps of
the chosen earlier stages (indices into timm's ``feature_info``) are average-pooled to the last map's grid
and concatenated with it along the channels, so every token carries low-level and semantic features.

Frozen blocks (``freeze_blocks``, timm models with a ``blocks`` list): the stem and the first N blocks keep
their pretrained weights and batch-norm statistics. Backward then stops before the largest feature maps,
which is where most of a CNN step's time goes on a CPU (benchmarks/README.md).
"""

from __future__ import annotations

import difflib

import timm
import torch
import torch.nn.functional as F
from torch import nn

from qfm.errors import ConfigError


def check_timm_name(name: str) -> None:
    """Fail with close matches when timm has no architecture of that name."""
    arch = name.split(".")[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close timm names: {', '.join(close)}." if close else ""
    raise ConfigError(f"backbone '{name}' is not a timm model.{hint} See timm.list_models() for all names.")


class Backbone(nn.Module):
    """Wraps a timm model (``net``, classifier removed); ``forward`` gives (global (B, C), tokens (B, N, C)).

    ``stages``: indices of earlier CNN stages whose maps join the last one; ``freeze_blocks``: how many of the
    first blocks (with the stem before them) stay frozen (see the module docstring)."""

    def __init__(self, net: nn.Module, stages: tuple[int, ...] = (), freeze_blocks: int = 0) -> None:
        super().__init__()
        self.net = net
        self.stages = tuple(int(i) for i in stages)
        self.frozen = _frozen_modules(net, freeze_blocks)
        for module in self.frozen:
            module.requires_grad_(False)
        if self.frozen:  # a ViT's own parameters (class token, position embedding) belong to its stem
            for param in net.parameters(recurse=False):
                param.requires_grad_(False)
        self.width = int(net.num_features) + _stage_width(net, self.stages)
        self.has_class_token = getattr(net, "cls_token", None) is not None
        self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0))
        self.channels_last_output = str(getattr(net, "output_fmt", "NCHW")) == "NHWC"
        self.data_config = timm.data.resolve_model_data_config(net)

    def train(self, mode: bool = True) -> Backbone:
        """As nn.Module.train, but frozen modules stay in eval mode (their batch-norm statistics are kept)."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stages:
            return self.net.forward_features(x)
        last, maps = self.net.forward_intermediates(x, indices=list(self.stages))
        grid = last.shape[-2:]
        return torch.cat([last, *(F.adaptive_avg_pool2d(m, grid) for m in maps)], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._features(x)
        if feats.dim() == 3:  # (B, N, C): prefix tokens (CLS, registers, ...) then patch tokens
            patches = feats[:, self.num_prefix_tokens:]
            glob = feats[:, 0] if self.has_class_token else patches.mean(dim=1)
        elif feats.dim() == 4:
            if self.channels_last_output:
                feats = feats.permute(0, 3, 1, 2)
            patches = feats.flatten(2).transpose(1, 2)
            glob = patches.mean(dim=1)
        else:
            raise ConfigError(
                f"backbone {type(self.net).__name__}: forward_features gave shape {tuple(feats.shape)}; "
                "expected tokens (B, N, C) or a feature map (B, C, H, W)"
            )
        if patches.shape[-1] != self.width:
            raise ConfigError(
                f"backbone {type(self.net).__name__}: features have width {patches.shape[-1]} but the model "
                f"reports num_features={self.width}; this timm model is not supported as a token encoder"
            )
        return glob, patches


def _frozen_modules(net: nn.Module, n_blocks: int) -> list[nn.Module]:
    """The stem (every child module registered before ``blocks``) and the first ``n_blocks`` blocks; a ConfigError
    for a count this backbone cannot give."""
    if n_blocks == 0:
        return []
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise ConfigError(f"backbone {type(net).__name__}: model_options.freeze_blocks needs a timm model with "
                          "a 'blocks' list (EfficientNet, MobileNet, ViT); leave it at 0 for this backbone")
    if not isinstance(n_blocks, int) or not 0 <= n_blocks < len(blocks):
        raise ConfigError(f"model_options.freeze_blocks={n_blocks!r}: give a whole number in 0..{len(blocks) - 1} "
                          f"(this backbone has {len(blocks)} blocks; at least the last one trains)")
    stem = []
    for name, child in net.named_children():
        if name == "blocks":
            break
        stem.append(child)
    return stem + list(blocks[:n_blocks])


def _stage_width(net: nn.Module, stages: tuple[int, ...]) -> int:
    """The channels the chosen stages add; a ConfigError for a model or index that cannot give them."""
    if not stages:
        return 0
    info = getattr(net, "feature_info", None)
    if not isinstance(info, list) or not hasattr(net, "forward_intermediates") or getattr(net, "cls_token", None) is not None:
        raise ConfigError(f"backbone {type(net).__name__}: model_options.stages needs a CNN with timm's "
                          "forward_intermediates; leave stages unset for this backbone")
    bad = [i for i in stages if not 0 <= i < len(info) - 1]
    if bad or len(set(stages)) != len(stages):
        raise ConfigError(f"model_options.stages={list(stages)}: give distinct earlier stage indices in "
                          f"0..{len(info) - 2} (this backbone's stages: "
                          f"{[(i, s['num_chs']) for i, s in enumerate(info)]} as (index, channels))")
    return sum(int(info[i]["num_chs"]) for i in stages)
