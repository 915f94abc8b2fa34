"""`DDTTokenizer`: images <-> T ordered discrete DDT tokens (DDT paper, section 3; design.md section 1).

    encode(images) -> LongTensor (B, T)       encoder -> EMA vector quantizer -> code ids
    decode(tokens, steps, guidance, prefix)   rectified-flow Euler sampling of the MMDiT decoder from noise

`forward(images)` is the training objective: the rectified-flow loss of the decoder conditioned on the first
k(t) tokens, plus the quantizer's commitment loss. It also applies classifier-free token dropout (all tokens
dropped with probability `p_uncond`) and prefix dropout (ours, after FlexTok's nested dropout: the visible
tokens are capped at a random `j < k(t)` with probability `p_prefix`, so decoding from a short prefix is a case
the decoder has trained on).

Pure PyTorch (no Lightning): an export loads with `DDTTokenizer.from_pretrained(dir)` from a safetensors file
and a JSON config. Size presets live in `PRESETS` below and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ddt_lightning.models.decoder import DDTDecoder, guided
from ddt_lightning.models.distill import FeatureHead, distill_loss, teacher_targets
from ddt_lightning.models.encoder import DDTEncoder
from ddt_lightning.models.quantizer import VectorQuantizer
from ddt_lightning.models.schedule import TokenMap, euler_sample, sample_time

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VAE_FOLDER = "vae"


@dataclass
class TokenizerConfig:
    """Everything that defines a DDT tokenizer. Defaults are the `tiny` CPU preset (pixel space, 32x32)."""

    image_size: int = 32  # pixels; with a VAE, the pixel size before the VAE's downsampling
    in_channels: int = 3
    patch_size: int = 4
    # Width 192 with 2 heads of 96: wide enough for CPU matmuls to run near peak (bench train: 0.54 of the fp32
    # peak vs 0.40 at width 128 with 3 + 4 blocks of 4 heads, at about the same images per second).
    encoder_dim: int = 192
    encoder_depth: int = 2
    encoder_heads: int = 2
    decoder_dim: int = 192
    decoder_depth: int = 3
    decoder_heads: int = 2
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    per_position_adaln: bool = True
    encoder_gate_init: float = 1.0  # residual gates of the encoder at init (0: AdaLN-Zero, image-blind at step 0)
    num_tokens: int = 32
    stage_tokens: list[int] | None = None  # None: the paper's uniform k(t) = ceil(t T); else Selftok-style stages
    codebook_size: int = 1024
    code_dim: int = 16
    cosine_codes: bool = True
    codebook_decay: float = 0.99
    commitment_weight: float = 0.25
    entropy_weight: float = 0.0  # the quantizer's code-entropy term (VectorQuantizer.entropy_weight); 0: off
    entropy_temperature: float = 0.01
    kmeans_init: bool = False
    prediction: Literal["x0", "velocity"] = "x0"
    time_shift: float = 3.0  # SD3 shift of the training time distribution
    sampler_shift: float = 3.0  # the same shift applied to the sampler's time grid
    p_uncond: float = 0.1
    p_prefix: float = 0.1
    edge_weight: float = 0.0  # weight of the x0 error's spatial differences in the loss (0: plain MSE; see forward)
    p_pure_noise: float = 0.0  # fraction of training samples at t = 1 (pure noise, all tokens): a take-off aid
    token_adaln: bool = False  # the visible tokens also modulate the decoder's AdaLN (DDTDecoder): a take-off aid
    # A frozen FeatureNet (models/perceptual.py; `python -m ddt_lightning.perceptual train FOLDER`), loaded from
    # the local folder `feature_net` for the two terms that use it (training only):
    feature_net: str | None = None
    # - an LPIPS-style distance of the x0 estimate to x0 through it; 0: off;
    perceptual_weight: float = 0.0
    # - feature distillation (models/distill.py): a head reads the quantized tokens and predicts the net's deepest
    #   feature map (`distill_dim` is its width), so the codes must carry what the net sees; 1 - cosine. 0: off.
    distill_weight: float = 0.0
    distill_dim: int = 64
    vae_path: str | None = None  # a local diffusers AutoencoderKL folder: work in its latent space
    vae_downsample: int = 8

    def __post_init__(self) -> None:
        checks = {
            "image_size": self.image_size > 0,
            "patch_size": self.latent_size % self.patch_size == 0,
            "num_tokens": self.num_tokens > 0,
            "codebook_size": self.codebook_size > 1,
            "p_uncond": 0 <= self.p_uncond < 1,
            "p_prefix": 0 <= self.p_prefix < 1,
            "edge_weight": self.edge_weight >= 0,
            "p_pure_noise": 0 <= self.p_pure_noise < 1,
            "perceptual_weight": self.perceptual_weight >= 0,
            "distill_weight": self.distill_weight >= 0,
            "distill_dim": self.distill_dim > 0,
            "time_shift": self.time_shift > 0,
            "sampler_shift": self.sampler_shift > 0,
            "prediction": self.prediction in ("x0", "velocity"),
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            key = bad[0]
            detail = (
                f"the model's input size {self.latent_size} is not divisible by patch_size={self.patch_size}"
                if key == "patch_size"
                else f"invalid value {getattr(self, key)!r}"
            )
            raise ValueError(f"TokenizerConfig.{key}: {detail}")
        for key in ("perceptual_weight", "distill_weight"):
            weight = getattr(self, key)
            if weight > 0 and not self.feature_net:
                raise ValueError(
                    f"TokenizerConfig.feature_net: {key}={weight} needs a feature network folder "
                    "(python -m ddt_lightning.perceptual train FOLDER)"
                )
            if weight > 0 and self.vae_path:
                raise ValueError(f"TokenizerConfig.{key}: the feature network works in pixel space, not with vae_path")
        TokenMap(self.num_tokens, self.stage_tokens)  # validates stage_tokens against num_tokens

    @property
    def latent_size(self) -> int:
        """Spatial size the transformers see: the image size, or the VAE latent size."""
        return self.image_size // self.vae_downsample if self.vae_path else self.image_size

    @classmethod
    def preset(cls, name: str, **overrides) -> TokenizerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, TokenizerConfig] = {
    # CPU: pixel space 32x32, patch 4 -> 64 image tokens; 5.8 M parameters.
    "tiny": TokenizerConfig(),
    # Tests: 16x16, T = 8, K = 64, one block each side - a forward pass in milliseconds.
    "micro": TokenizerConfig(
        image_size=16,
        patch_size=4,
        encoder_dim=32,
        encoder_depth=1,
        encoder_heads=2,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
        num_tokens=8,
        codebook_size=64,
        code_dim=8,
    ),
    # The paper's scale: 256x256 images in the 16-channel latent space of an AutoencoderKL (f8 -> 32x32),
    # K = 65,536 codes of m = 16. Widths follow SD3-medium for the decoder (1536 x 24) and a half-depth encoder
    # (ours); T = 256 tokens (ours).
    "paper": TokenizerConfig(
        image_size=256,
        in_channels=16,
        patch_size=2,
        encoder_dim=1024,
        encoder_depth=12,
        encoder_heads=16,
        decoder_dim=1536,
        decoder_depth=24,
        decoder_heads=24,
        num_tokens=256,
        codebook_size=65_536,
        code_dim=16,
        kmeans_init=True,
        vae_path="vae",
    ),
}


# Config keys renamed since exports were first written: old -> new (`from_pretrained` reads both).
RENAMED_KEYS = {"perceptual_net": "feature_net"}


def edge_loss(error: torch.Tensor) -> torch.Tensor:
    """Mean squared horizontal + vertical difference of an x0 error (B, C, H, W): the edge term of the loss."""
    return error.diff(dim=-1).pow(2).mean() + error.diff(dim=-2).pow(2).mean()


class TokenizerLosses(NamedTuple):
    loss: torch.Tensor  # total: diffusion + commitment + entropy (+ edge_weight x edge)
    diffusion: torch.Tensor
    commitment: torch.Tensor
    indices: torch.Tensor  # (B, T) code ids of the batch
    edge: torch.Tensor  # mean squared spatial difference of the x0 error (0 when edge_weight = 0)
    entropy: torch.Tensor  # the quantizer's weighted code-entropy term (0 when entropy_weight = 0)
    perceptual: torch.Tensor  # mean perceptual distance of the x0 estimate to x0 (0 when perceptual_weight = 0)
    distill: torch.Tensor  # 1 - mean cosine of the feature head's prediction to the net's features (0 when off)


def check_data_resolution(data: object, image_size: int, where: str, fix: str) -> None:
    """Fail, naming both sizes, when a DataModule's `resolution` (if it has one) is not the DDT tokenizer's
    `image_size` - before any training or writing. `where` names the tokenizer, `fix` says what to set."""
    resolution = getattr(data, "resolution", None)
    if resolution is not None and resolution != image_size:
        raise ValueError(f"data resolution {resolution} does not fit {where}: its image_size is {image_size} ({fix})")


class DDTTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or TokenizerConfig()
        size, channels = cfg.latent_size, cfg.in_channels
        common = dict(image_size=size, in_channels=channels, patch_size=cfg.patch_size, mlp_ratio=cfg.mlp_ratio)
        common |= dict(num_tokens=cfg.num_tokens, token_dim=cfg.code_dim, qk_norm=cfg.qk_norm)
        self.encoder = DDTEncoder(
            dim=cfg.encoder_dim,
            depth=cfg.encoder_depth,
            heads=cfg.encoder_heads,
            per_position_adaln=cfg.per_position_adaln,
            gate_init=cfg.encoder_gate_init,
            **common,
        )
        self.quantizer = VectorQuantizer(
            codebook_size=cfg.codebook_size,
            dim=cfg.code_dim,
            num_positions=cfg.num_tokens,
            decay=cfg.codebook_decay,
            commitment_weight=cfg.commitment_weight,
            cosine=cfg.cosine_codes,
            kmeans_init=cfg.kmeans_init,
            entropy_weight=cfg.entropy_weight,
            entropy_temperature=cfg.entropy_temperature,
        )
        self.decoder = DDTDecoder(
            dim=cfg.decoder_dim, depth=cfg.decoder_depth, heads=cfg.decoder_heads, token_adaln=cfg.token_adaln, **common
        )
        self.feature_head = None
        if cfg.distill_weight > 0:  # trained with the tokenizer (and resumed with it), never used at inference
            self.feature_head = FeatureHead(
                cfg.num_tokens,
                cfg.code_dim,
                grid=size // cfg.patch_size,
                out_dim=cfg.distill_dim,
                dim=cfg.encoder_dim,
                heads=cfg.encoder_heads,
            )
        self.token_map = TokenMap(cfg.num_tokens, cfg.stage_tokens)
        self.vae = None  # frozen, loaded by `load_vae`; never part of the trained state
        self.perceptual = None  # frozen PerceptualDistance, loaded by `load_feature_net`; likewise

    def load_feature_net(self, path: str | Path) -> None:
        """Load the frozen feature network of the perceptual and distillation terms from a local folder (training
        only: exports and inference never need it)."""
        from ddt_lightning.models.perceptual import FeatureNet, PerceptualDistance

        distance = PerceptualDistance(FeatureNet.from_pretrained(path))
        if distance.net.config.in_channels != self.config.in_channels:
            raise ValueError(
                f"feature network at {path} takes {distance.net.config.in_channels} channels but "
                f"TokenizerConfig.in_channels={self.config.in_channels}"
            )
        width = distance.net.config.widths[-1]
        if self.config.distill_weight > 0 and width != self.config.distill_dim:
            raise ValueError(
                f"feature network at {path} ends in {width} channels but TokenizerConfig.distill_dim="
                f"{self.config.distill_dim}"
            )
        object.__setattr__(self, "perceptual", distance)  # not a submodule: out of state_dict and optimiser

    # ----------------------------------------------------------------------------------------------- latents
    def load_vae(self, path: str | Path) -> None:
        """Load the frozen AutoencoderKL from a local folder (never from a hub)."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        if vae.config.latent_channels != self.config.in_channels:
            raise ValueError(
                f"VAE at {path} has latent_channels={vae.config.latent_channels} but TokenizerConfig.in_channels="
                f"{self.config.in_channels}"
            )
        vae.requires_grad_(False).eval()
        object.__setattr__(self, "vae", vae)  # not a registered submodule: kept out of state_dict and optimiser

    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the space the transformers work in (identity in pixel space)."""
        if self.config.vae_path is None:
            return images
        if self.vae is None:
            raise RuntimeError(f"this tokenizer works in a VAE latent space: call load_vae({self.config.vae_path!r})")
        self.vae.to(images.device)
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.mode()
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def from_latent(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.vae_path is None:
            return latents
        shift = self.vae.config.shift_factor or 0.0
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample

    # ---------------------------------------------------------------------------------------------- training
    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        aux_scale: float = 1.0,
        codes_frozen: bool = False,
    ) -> TokenizerLosses:
        """images: (B, C, H, W) in [-1, 1] -> losses. Noise, times and dropouts come from `generator`;
        `aux_scale` multiplies `config.edge_weight` and `config.perceptual_weight` for this step (the training
        module's schedule; a term whose weight is 0 is not computed). `codes_frozen`: the encoder and codebook are
        not trained this step (the module's decoder-only phase): they run without autograd, and the distillation
        term, which only trains the codes and their head, is skipped."""
        cfg = self.config
        edge_weight, perceptual_weight = cfg.edge_weight * aux_scale, cfg.perceptual_weight * aux_scale
        x0 = self.to_latent(images)
        b, device = x0.shape[0], x0.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and not codes_frozen):
            q = self.quantizer(self.encoder(x0))  # quantized (B, T, m), indices (B, T)

        t = sample_time(b, cfg.time_shift, device, generator)  # (B,)
        if cfg.p_pure_noise > 0:  # drawn only when on: runs without it keep their random streams
            # At t = 1 the decoder sees pure noise and all T tokens, so it can only reconstruct from the tokens
            # (a one-step autoencoder); elsewhere the noisy image lets it learn to do without them first.
            pure = torch.rand(b, device=device, generator=generator) < cfg.p_pure_noise
            t = torch.where(pure, torch.ones_like(t), t)
        visible = self.token_map(t)  # (B,) k(t)
        u = torch.rand(3, b, device=device, generator=generator)  # (3, B): uncond, prefix, prefix length
        prefix = (u[2] * visible).long()  # a random j < k(t)
        visible = torch.where(u[1] < cfg.p_prefix, prefix, visible)
        visible = torch.where(u[0] < cfg.p_uncond, torch.zeros_like(visible), visible)

        eps = torch.randn(x0.shape, device=device, generator=generator, dtype=x0.dtype)
        tb = t.to(x0.dtype)[:, None, None, None]
        x_t = tb * eps + (1 - tb) * x0
        pred = self.decoder(x_t, t, q.quantized, visible)
        target = x0 if cfg.prediction == "x0" else eps - x0
        diffusion = F.mse_loss(pred, target)
        loss = diffusion + q.commit_loss + q.entropy_loss
        edge = diffusion.new_zeros(())
        if edge_weight > 0:
            # A frequency weighting of the same regression: the MSE of the x0 error's horizontal and vertical
            # differences. Its minimiser is still E[x0 | x_t, tokens] (differencing is linear), so the decoder's
            # target is unchanged; what changes is the weight of edges, which the pixel MSE gives almost none at
            # small scale (an object's shape is a few border pixels) - so the tokens are pushed to carry them.
            error = pred - x0 if cfg.prediction == "x0" else tb * (target - pred)  # x0 error; v = eps - x0
            edge = edge_loss(error)
            loss = loss + edge_weight * edge
        perceptual = diffusion.new_zeros(())
        if perceptual_weight > 0:
            # LPIPS-style term on the x0 estimate, as VQGAN-family tokenizers and epsilon-VAE's diffusion decoder
            # train: unlike the pixel MSE it weighs a wrong shape far above a 1-pixel shift, so it asks the tokens
            # for what the MSE leaves out. It moves the minimiser away from E[x0 | x_t, tokens] (sharper, biased).
            if self.perceptual is None:
                raise RuntimeError(f"perceptual_weight > 0: call load_feature_net({cfg.feature_net!r}) first")
            x0_hat = pred if cfg.prediction == "x0" else x_t - tb * pred  # v = eps - x0
            perceptual = self.perceptual.to(x0.device)(x0_hat, x0).mean()
            loss = loss + perceptual_weight * perceptual
        distill = diffusion.new_zeros(())
        if cfg.distill_weight > 0 and not codes_frozen:
            # The codes themselves must let a second reader rebuild what the frozen network sees (shape); unlike
            # the perceptual term this leaves the decoder's regression target alone.
            if self.perceptual is None:
                raise RuntimeError(f"distill_weight > 0: call load_feature_net({cfg.feature_net!r}) first")
            with torch.no_grad():
                target = teacher_targets(self.perceptual.to(x0.device).net.features(x0)[-1], self.feature_head.grid)
            distill = distill_loss(self.feature_head(q.quantized), target)
            loss = loss + cfg.distill_weight * distill
        return TokenizerLosses(loss, diffusion, q.commit_loss, q.indices, edge, q.entropy_loss, perceptual, distill)

    @torch.no_grad()
    def token_gain(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """How much the decoder uses the tokens: 1 - MSE(with the first k(t) tokens) / MSE(with none), on the same
        noisy inputs and times, x0 errors (B,) -> () scalar. About 0 while the decoder ignores the tokens (a run
        that has not taken off), well above 0 once they carry the image. No state changes (the search alone)."""
        cfg = self.config
        x0 = self.to_latent(images)
        b = x0.shape[0]
        codes = self.quantizer.lookup(self.search_latent(x0)[1])  # (B, T, m)
        t = sample_time(b, cfg.time_shift, x0.device, generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        tb = t.to(x0.dtype)[:, None, None, None]
        x_t = tb * eps + (1 - tb) * x0
        visible = self.token_map(t)
        errors = [
            (self.predict_x0(x_t, t, codes, shown, guidance=1.0) - x0).pow(2).mean()
            for shown in (visible, torch.zeros_like(visible))
        ]
        return 1 - errors[0] / errors[1].clamp_min(1e-12)

    # --------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) in [-1, 1] -> LongTensor (B, T) code ids (training state untouched)."""
        return self.search_latent(self.to_latent(images))[1]

    @torch.no_grad()
    def search_latent(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-space images (B, C, H, W) -> the encoder's outputs as the code search sees them (B, T, m),
        l2-normalised for cosine codes, and their nearest code ids (B, T). The search alone: no EMA or usage
        statistics change."""
        z = self.encoder(x0)  # (B, T, m)
        if self.config.cosine_codes:
            z = F.normalize(z, dim=-1)
        return z, self.quantizer.nearest(z.flatten(0, 1)).view(z.shape[:2])

    def predict_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, codes: torch.Tensor, visible: torch.Tensor, guidance: float
    ) -> torch.Tensor:
        """The decoder's x0 estimate, with classifier-free guidance against the all-dropped model when
        guidance != 1 (conditional and unconditional run as one batch)."""
        out = guided(self.decoder, x_t, t, codes, visible, guidance)
        if self.config.prediction == "velocity":
            out = x_t - t.to(out.dtype)[:, None, None, None] * out  # x0 = x_t - t v
        return out

    @torch.no_grad()
    def decode(
        self,
        tokens: torch.Tensor,
        steps: int = 8,
        guidance: float = 1.0,
        prefix: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """tokens: (B, T) code ids -> images (B, C, H, W) in [-1, 1], sampled from noise in `steps` Euler steps
        (diffusers' FlowMatchEulerDiscreteScheduler). k(t) is recomputed at every step; with `prefix=j` only
        the first j tokens are visible at any step (the paper's progressive decoding)."""
        cfg = self.config
        if prefix is not None and not 0 <= prefix <= cfg.num_tokens:
            raise ValueError(f"prefix={prefix} must be in [0, {cfg.num_tokens}]")
        codes = self.quantizer.lookup(tokens)  # (B, T, m)
        b, size = tokens.shape[0], cfg.latent_size
        x = torch.randn(b, cfg.in_channels, size, size, generator=generator, device=tokens.device)

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            visible = self.token_map(t)  # k(t), recomputed at every step
            if prefix is not None:
                visible = visible.clamp(max=prefix)
            return self.predict_x0(x_t, t, codes, visible, guidance)

        x = euler_sample(x, steps, cfg.sampler_shift, predict)
        return self.from_latent(x).clamp(-1, 1)

    # ------------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` (+ the VAE under `vae/`): loadable without Lightning."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.asdict(self.config)
        if self.vae is not None:
            self.vae.save_pretrained(directory / VAE_FOLDER)
            cfg["vae_path"] = VAE_FOLDER
        (directory / CONFIG_NAME).write_text(json.dumps({"format": "ddt-tokenizer/1", **cfg}, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> DDTTokenizer:
        from safetensors.torch import load_file

        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"no DDT tokenizer export at {directory}: {CONFIG_NAME} is missing")
        raw = json.loads(config_file.read_text())
        raw.pop("format", None)
        for old, new in RENAMED_KEYS.items():  # exports written before a key was renamed
            if old in raw and new not in raw:
                raw[new] = raw.pop(old)
        known = {f.name for f in dataclasses.fields(TokenizerConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown keys {unknown}")
        tokenizer = cls(TokenizerConfig(**raw))
        tokenizer.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(map_location)))
        if tokenizer.config.vae_path is not None:
            vae_dir = Path(tokenizer.config.vae_path)
            tokenizer.load_vae(vae_dir if vae_dir.is_absolute() else directory / vae_dir)
        return tokenizer.eval()
