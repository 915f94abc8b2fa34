"""DDT diffusion decoder: an MMDiT over noisy image patches and the visible DDT tokens (DDT paper, eq. 2-3).

`d(x_t, t, V_{<=k})` predicts `x0` (the paper) or the velocity `eps - x0` (Selftok). Tokens with index >= k
(0-based) are zeroed *and* removed from attention with a key mask: zeroing alone would still leak through the
token embedding's bias and position embedding (a test checks that masked tokens cannot change the output).
`k = 0` is the unconditional model used by classifier-free guidance.

With `token_adaln` the visible tokens also enter every block's AdaLN modulation, as SD3's MMDiT adds its pooled
text embedding to the timestep embedding: an MLP of the T zeroed-and-flattened codes (each position has its own
weights, a masked token contributes exactly nothing) is added to the time embedding. A global path that a decoder
learns to use within a few steps, unlike joint attention, which a decoder that denoises well enough from `x_t`
alone can leave unused (design.md section 6: the take-off).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ddt_lightning.models.mmdit import FinalLayer, JointBlock, PatchEmbed, unpatchify


class DDTDecoder(nn.Module):
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
        token_adaln: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.patch_size, self.num_tokens = in_channels, patch_size, num_tokens
        self.patch = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, dim)
        self.token_embed = nn.Linear(token_dim, dim)
        self.token_pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.token_cond = None
        if token_adaln:
            self.token_cond = nn.Sequential(nn.Linear(num_tokens * token_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # The last block only updates the image stream: the context's output is never read.
        self.blocks = nn.ModuleList(
            JointBlock(dim, heads, mlp_ratio, qk_norm, update_c=i < depth - 1) for i in range(depth)
        )
        self.final = FinalLayer(dim, patch_size**2 * in_channels)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, codes: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x_t: (B, C, H, W); t: (B,) in [0, 1]; codes: (B, T, m); visible: (B,) long in [0, T] -> (B, C, H, W)."""
        keep = torch.arange(self.num_tokens, device=codes.device)[None] < visible[:, None]  # (B, T)
        x = self.patch(x_t)  # (B, N, D)
        kept = codes * keep[..., None]  # (B, T, m), masked tokens zeroed
        c = self.token_embed(kept) + self.token_pos  # (B, T, D)
        cond = self.time_embed(self.time_proj(t * 1000).to(x.dtype))[:, None]  # (B, 1, D)
        if self.token_cond is not None:
            cond = cond + self.token_cond(kept.flatten(1))[:, None]
        image_keys = keep.new_ones(keep.shape[0], x.shape[1])
        attn_mask = torch.cat([image_keys, keep], dim=1)[:, None, None, :]  # (B, 1, 1, N + T)
        for block in self.blocks:
            x, c = block(x, c, cond, cond, attn_mask)
        return unpatchify(self.final(x, cond), self.patch_size, self.in_channels)


def guided(
    decoder: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    codes: torch.Tensor,
    visible: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """`decoder(x_t, t, codes, visible)` with classifier-free guidance against the all-dropped model (`visible = 0`)
    when guidance != 1; conditional and unconditional run as one batch. Any module with the decoder's call works."""
    if guidance == 1.0:
        return decoder(x_t, t, codes, visible)
    both = decoder(
        torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([codes, codes]), torch.cat([visible, 0 * visible])
    )
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)
