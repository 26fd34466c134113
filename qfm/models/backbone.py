"""Any timm model as a token encoder: (global token, other tokens) at the backbone's own width.

ViT-like models (``forward_features`` gives (B, N, C)): the CLS token is the global token (the mean of the
patch tokens when the model has no class token) and the tokens after the model's ``num_prefix_tokens`` are
the patch tokens. CNNs (a (B, C, H, W) map, or NHWC where the model says so): the last feature map
flattened to H*W tokens, its spatial mean the global token.
"""

from __future__ import annotations

import difflib

import timm
import torch
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
    """Wraps a timm model (``net``, classifier removed); ``forward`` gives (global (B, C), tokens (B, N, C))."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.width = int(net.num_features)
        self.has_class_token = getattr(net, "cls_token", None) is not None
        self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0))
        self.channels_last_output = str(getattr(net, "output_fmt", "NCHW")) == "NHWC"
        self.data_config = timm.data.resolve_model_data_config(net)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.net.forward_features(x)
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
