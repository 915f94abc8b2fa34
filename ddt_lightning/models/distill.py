"""Feature distillation into the DDT tokens: a small head predicts a frozen network's feature map from the codes.

A diffusion decoder trained with pixel MSE asks the tokens for what the MSE weighs, and the MSE weighs an object's
shape about as much as a 1-pixel shift (README, "Where shape is lost"). Semantic tokenizers add a second reader of
the codes whose only job is to reproduce a frozen teacher's features - BEiT v2's VQ-KD reconstructs CLIP features
from its codes, ImageFolder and VA-VAE align their tokenizers with DINO - so that the codes must carry what the
teacher sees. Here the teacher is the project's `FeatureNet` (models/perceptual.py; no DINO weights exist
offline) and the reader is `FeatureHead`: one learned query per cell of the teacher's grid cross-attends to the
T quantized tokens (all of them: the head reads the whole sequence, the decoder its prefixes), twice, and each
query's output is compared with the teacher's feature vector at its cell by cosine similarity. The head is
trained with the tokenizer and unused at inference; its gradient reaches the encoder through the quantizer's
straight-through estimator, and it never touches the decoder, so the diffusion loss is left as it was.

Written by hand: no kept library has a cross-attention readout of a token set (diffusers' attention blocks are
built around a spatial residual stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class _ReadBlock(nn.Module):
    """Pre-norm cross-attention of the queries to the tokens, then a pre-norm MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class FeatureHead(nn.Module):
    """(B, T, m) token vectors -> (B, grid * grid, out_dim) predicted teacher features, row-major over the grid."""

    def __init__(
        self, num_tokens: int, token_dim: int, grid: int, out_dim: int, dim: int, heads: int, depth: int = 2
    ) -> None:
        super().__init__()
        self.grid = grid
        self.token_in = nn.Linear(token_dim, dim)
        self.token_pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        self.blocks = nn.ModuleList(_ReadBlock(dim, heads, 4.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        kv = self.token_in(codes) + self.token_pos
        q = self.queries.expand(codes.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return self.out(self.norm(q))


def teacher_targets(features: torch.Tensor, grid: int) -> torch.Tensor:
    """A teacher's feature map (B, D, H, W) -> (B, grid * grid, D): average-pooled to the head's grid, row-major."""
    return rearrange(F.adaptive_avg_pool2d(features, grid), "b d h w -> b (h w) d")


def distill_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - the mean cosine similarity of predicted and target feature vectors (both (B, N, D)): in [0, 2]."""
    return 1 - F.cosine_similarity(predicted, target, dim=-1).mean()
