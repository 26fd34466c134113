"""The attention-panel decoder (DEIQT): P panel queries cross-attend to the image tokens, each is scored.

Follows DEIQT's public code (``Experts_MOS`` in narthchin/DEIQT models/deiqt.py): the queries start as a
learnable panel embedding plus the global token; one pre-norm transformer decoder layer (self-attention
among the queries, cross-attention to the other tokens, a GELU MLP of width 4d, no final norm); one
bias-free linear scorer shared by every query; the score is the mean over queries.
"""

from __future__ import annotations

import torch
from torch import nn

from qfm.errors import ConfigError


class PanelDecoderLayer(nn.Module):
    """One pre-norm decoder layer: [self-attention], cross-attention to the tokens, MLP."""

    def __init__(self, d: int, n_heads: int, dropout: float = 0.0, self_attn: bool = True) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(d) if self_attn else None
        self.self_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True) if self_attn else None
        self.norm_cross = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = queries
        if self.self_attn is not None:
            h = self.norm_self(x)
            x = x + self.drop(self.self_attn(h, h, h, need_weights=False)[0])
        h = self.norm_cross(x)
        x = x + self.drop(self.cross_attn(h, memory, memory, need_weights=False)[0])
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class AttentionPanelDecoder(nn.Module):
    """Scores projected tokens (B, N, d), global token at index 0, the rest the memory it attends to."""

    def __init__(
        self, d: int, n_queries: int = 6, n_heads: int | None = None, dropout: float = 0.0, self_attn: bool = True
    ) -> None:
        super().__init__()
        n_heads = n_heads or max(1, d // 64)  # DEIQT: 6 heads of width 64 at d=384
        if n_queries < 1:
            raise ConfigError(f"n_queries={n_queries}: the decoder needs at least one panel query")
        if d % n_heads:
            raise ConfigError(f"d={d} is not divisible by n_heads={n_heads}; pick d as a multiple of n_heads")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout} must be in [0, 1)")
        self.d, self.n_queries, self.n_heads = d, n_queries, n_heads
        self.panel = nn.Parameter(torch.zeros(1, n_queries, d))
        self.layer = PanelDecoderLayer(d, n_heads, dropout=dropout, self_attn=self_attn)
        self.scorer = nn.Linear(d, 1, bias=False)
        nn.init.trunc_normal_(self.panel, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def query_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoded panel queries (B, P, d)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.d or tokens.shape[1] < 2:
            raise ValueError(
                f"tokens must be (batch, n_tokens >= 2, {self.d}) with the global token first; got {tuple(tokens.shape)}"
            )
        queries = self.panel + tokens[:, :1]
        return self.layer(queries, tokens[:, 1:])

    def forward(
        self, tokens: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) = mean over queries of the shared scorer; with return_features also the mean query (B, d)."""
        feats = self.query_features(tokens).mean(dim=1)
        scores = self.scorer(feats).squeeze(-1)  # linear and bias-free: equals the mean of per-query scores
        return (scores, feats) if return_features else scores
