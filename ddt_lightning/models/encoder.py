"""DDT encoder: a clean image -> T ordered continuous token vectors (DDT paper, section 3.1; design.md section 1).

Two MMDiT streams with joint attention: patch embeddings of `x0` and T learnable query tokens. Only the query
outputs are kept, then `LayerNorm -> Linear(d, m)` gives the vectors the quantizer snaps to codes. With
`per_position_adaln` each query index gets its own AdaLN modulation (as Selftok's encoder does); otherwise all
queries share one learned modulation. The encoder has no time input: the image stream is modulated by a learned
constant, which makes AdaLN an ordinary learned LayerNorm affine plus gates. Its gates start open (`gate_init`):
under AdaLN-Zero the queries would pass every block unchanged at initialisation, so every image would get the same
tokens, and the quantizer's commitment loss (the only gradient the encoder gets until the decoder's own gates open)
pulls towards exactly that collapse.
"""

from __future__ import annotations

import torch
from torch import nn

from ddt_lightning.models.mmdit import JointBlock, PatchEmbed


class DDTEncoder(nn.Module):
    def __init__(
        self,
        image_size: int,
        in_channels: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        num_tokens: int,
        token_dim: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        per_position_adaln: bool = True,
        gate_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.patch = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.queries = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.x_cond = nn.Parameter(torch.zeros(1, 1, dim))
        self.c_cond = nn.Parameter(torch.randn(1, num_tokens if per_position_adaln else 1, dim) * 0.02)
        # The last block only needs to update the query stream: the image stream's output is never read.
        self.blocks = nn.ModuleList(
            JointBlock(dim, heads, mlp_ratio, qk_norm, update_x=i < depth - 1, gate_init=gate_init)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, token_dim)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """x0: (B, C, H, W) -> (B, T, m) pre-quantisation token vectors."""
        x = self.patch(x0)  # (B, N, D)
        c = self.queries.expand(x.shape[0], -1, -1)  # (B, T, D)
        for block in self.blocks:
            x, c = block(x, c, self.x_cond, self.c_cond)
        return self.out(self.norm(c))
