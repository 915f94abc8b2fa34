"""MMDiT joint-attention transformer blocks (Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3).

Two token streams - here image patches `x` and a context `c` (DDT query tokens in the encoder, DDT tokens in the
decoder) - keep their own weights but attend jointly over the concatenated sequence. Each stream is modulated by
AdaLN-Zero (DiT, Peebles & Xie 2023): shift/scale/gate vectors computed from a conditioning vector. The
conditioning may differ per token position, which gives the per-position AdaLN of the DDT/Selftok encoder.

Written here rather than taken from diffusers: `diffusers.models.attention.JointTransformerBlock` ignores
attention masks (diffusers issue 8673) - the DDT decoder's prefix masking needs them - and its AdaLN modulates
per sample only, not per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (B, L, D); shift/scale: (B or 1, 1 or L, D)
    return torch.addcmul(shift, x, 1 + scale)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU: 4x cheaper than the tanh form on CPU


class StreamIn(nn.Module):
    """Per-stream pre-attention half: AdaLN modulation and the q, k, v projections."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, with_output: bool, gate_init: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        # Modulation vectors: (shift, scale, gate) for attention, and again for the MLP when the stream is updated.
        self.num_mod = 6 if with_output else 2
        self.ada = nn.Linear(dim, self.num_mod * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # A key/value-only stream (not updated in this block) has no queries: no q projection, no q norm.
        self.num_proj = 3 if with_output else 2
        self.qkv = nn.Linear(dim, self.num_proj * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm and with_output else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        if with_output:  # gates are modulation vectors 2 (attention) and 5 (MLP); shifts and scales start at 0
            with torch.no_grad():
                self.ada.bias.view(self.num_mod, dim)[[2, 5]] = gate_init

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x: (B, L, D); cond: (B or 1, 1 or L, D)
        mods = self.ada(F.silu(cond)).chunk(self.num_mod, dim=-1)
        h = modulate(self.norm(x), mods[0], mods[1])
        # unbind, not indexing: its backward stacks the three gradients instead of zero-filling a buffer per slice.
        proj = rearrange(self.qkv(h), "b l (n h d) -> n b h l d", n=self.num_proj, h=self.heads).unbind(0)
        q = self.q_norm(proj[0]) if self.num_proj == 3 else None
        return q, self.k_norm(proj[-2]), proj[-1], mods[2:]


class StreamOut(nn.Module):
    """Per-stream post-attention half: gated residual for attention, then a gated, modulated MLP."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attn: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        gate_attn, shift, scale, gate_mlp = mods
        x = torch.addcmul(x, gate_attn, self.proj(attn))  # x + gate * proj(attn), one fused op
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm(x), shift, scale)))


class JointBlock(nn.Module):
    """One MMDiT block over (x, c).

    `update_x=False` / `update_c=False` make a stream key/value-only in this block (the SD3 "context_pre_only"
    idea): the decoder's last block need not update the context, the encoder's last block need not update the
    image stream, since neither output is read.

    `gate_init` is the initial value of the residual gates. 0 is AdaLN-Zero: every block starts as the identity,
    which suits the denoiser. A stream whose output must carry information from the start - the encoder's queries -
    needs open gates: with closed ones the encoder's output is the same for every image until the gates grow.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        update_x: bool = True,
        update_c: bool = True,
        gate_init: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.update_x, self.update_c = update_x, update_c
        self.x_in = StreamIn(dim, heads, qk_norm, update_x, gate_init)
        self.c_in = StreamIn(dim, heads, qk_norm, update_c, gate_init)
        self.x_out = StreamOut(dim, mlp_ratio) if update_x else None
        self.c_out = StreamOut(dim, mlp_ratio) if update_c else None

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        x_cond: torch.Tensor,
        c_cond: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D) image stream; c: (B, M, D) context; *_cond: (B or 1, 1 or L, D);
        attn_mask: (B, 1, 1, N + M) bool, True where a key may be attended to (or None)."""
        n = x.shape[1]
        qx, kx, vx, mods_x = self.x_in(x, x_cond)
        qc, kc, vc, mods_c = self.c_in(c, c_cond)
        # Only the streams that are updated have queries: a key/value-only stream is left out of the query side.
        q = torch.cat([q for q in (qx, qc) if q is not None], dim=2)  # (B, H, Lq, d)
        k = torch.cat([kx, kc], dim=2)  # (B, H, N + M, d)
        v = torch.cat([vx, vc], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = rearrange(out, "b h l d -> b l (h d)")
        # Queries are [x (if updated), c (if updated)]: split (backward: one cat) rather than slice each stream.
        sizes = [size for size, updated in ((n, self.x_out), (c.shape[1], self.c_out)) if updated is not None]
        parts = iter(out.split(sizes, dim=1))
        if self.x_out is not None:
            x = self.x_out(x, next(parts), mods_x)
        if self.c_out is not None:
            c = self.c_out(c, next(parts), mods_c)
        return x, c


class FinalLayer(nn.Module):
    """AdaLN-modulated projection from width to patch pixels, zero-initialised (DiT)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)
        for layer in (self.ada, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(F.silu(cond)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> width, with fixed 2-D sin-cos positions (diffusers' SD3/DiT embedding)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.proj = nn.Linear(in_channels * patch_size**2, dim)
        pos = get_2d_sincos_pos_embed(dim, self.grid, output_type="pt").float()  # (grid * grid, D)
        self.register_buffer("pos", pos[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)  # (B, N, C p p)
        return self.proj(x) + self.pos


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    grid = int(x.shape[1] ** 0.5)
    p = patch_size
    return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=grid, w=grid, c=channels, p=p, q=p)
