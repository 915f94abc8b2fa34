"""LightningModule that trains a `DDTTokenizer`: it only wires loss, optimisation and logging.

Loss: rectified-flow loss of the decoder on the first k(t) tokens + the quantizer's commitment loss
(`DDTTokenizer.forward`). Validation and test run the shared `TokenizerEvaluator` (PSNR one-step and sampled,
SSIM, codebook usage and perplexity, the prefix curve, optional rFID) and hand the decoded images of their first
batch to callbacks (`ReconstructionGrids`) through the step output. Codebook restarts live in the
`DeadCodeRestart` callback, weight averaging in Lightning's `EMAWeightAveraging` callback.

Decoder-only phase (`decoder_only_from_step`): from that optimizer step on, the encoder and the codebook are frozen
(eval mode: no EMA update, no restart - `DeadCodeRestart` stands down while `codes_frozen`), and the decoder alone
trains on codes that no longer move, under a learning-rate schedule of its own (warm-up and cosine again, from
`decoder_only_lr_scale` x lr). Tokenizers often end with a decoder fine-tune on frozen codes (the SD VAE's ft-EMA
decoder, LlamaGen's); here it is the measured remedy for a decoder that draws less than the codes hold: 1,000 such
steps on the main pipeline's tokenizer took the checker's shape reading of its reconstructions from 48 % to 80 %
at the full lr (76 % at half of it; README, "Where shape is lost"). The phase is a function of the global step, so
a resumed run re-enters it exactly.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger

from ddt_lightning.evaluation import TokenizerEvaluator
from ddt_lightning.modules.optim import adamw_warmup_cosine, warmup_cosine
from ddt_lightning.tokenizer import DDTTokenizer, TokenizerConfig, check_data_resolution


class TokenizerModule(L.LightningModule):
    def __init__(
        self,
        tokenizer: TokenizerConfig | None = None,
        lr: float = 1e-3,
        min_lr_ratio: float = 0.05,
        warmup_steps: int = 100,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        grad_clip_norm: float | None = 1.0,
        decoder_only_from_step: int | None = None,
        decoder_only_lr_scale: float = 1.0,
        aux_start_step: int = 0,
        aux_warmup_steps: int = 0,
        sampler_steps: int = 8,
        guidance: float = 1.0,
        prefix_tokens: list[int] | None = None,
        fid: bool = False,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if decoder_only_from_step is not None and decoder_only_from_step < 0:
            raise ValueError(f"decoder_only_from_step must be >= 0 or null, got {decoder_only_from_step}")
        if decoder_only_lr_scale <= 0:
            raise ValueError(f"decoder_only_lr_scale must be > 0, got {decoder_only_lr_scale}")
        self.save_hyperparameters()
        self.config = tokenizer or TokenizerConfig()
        self.tokenizer = DDTTokenizer(self.config)
        if self.config.vae_path is not None:
            self.tokenizer.load_vae(self.config.vae_path)
        if self.config.perceptual_weight > 0 or self.config.distill_weight > 0:
            self.tokenizer.load_feature_net(self.config.feature_net)
        if compile:
            # In place (nn.Module.compile), so state_dict keys and exports are unchanged.
            self.tokenizer.encoder.compile()
            self.tokenizer.decoder.compile()
        evaluator = dict(
            num_tokens=self.config.num_tokens,
            codebook_size=self.config.codebook_size,
            sampler_steps=sampler_steps,
            guidance=guidance,
            prefix_tokens=prefix_tokens,
        )
        self.val_metrics = TokenizerEvaluator(**evaluator)
        self.test_metrics = TokenizerEvaluator(**evaluator, fid=fid)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        check_data_resolution(
            datamodule,
            self.config.image_size,
            "the tokenizer (TokenizerConfig)",
            "set data.init_args.resolution or model.init_args.tokenizer.image_size",
        )

        if self.hparams.decoder_only_from_step is not None:
            self._check_strategy_allows_frozen_codes()

    def _check_strategy_allows_frozen_codes(self) -> None:
        """DDP expects a gradient for every parameter at every step unless told otherwise; the decoder-only phase
        leaves the encoder's without one. Fail before training, naming the fix."""
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            raise ValueError(
                "decoder_only_from_step: the encoder gets no gradients in the decoder-only phase, which DDP only "
                "allows with find_unused_parameters (trainer.strategy: ddp_find_unused_parameters_true)"
            )

    # --------------------------------------------------------------------------------------------- training
    @property
    def codes_frozen(self) -> bool:
        """Whether this step is in the decoder-only phase (encoder and codebook frozen)."""
        start = self.hparams.decoder_only_from_step
        return start is not None and self.global_step >= start

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.codes_frozen:  # every step: Lightning puts the whole module back in train mode after validation
            for part in (self.tokenizer.encoder, self.tokenizer.quantizer):
                part.eval().requires_grad_(False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        images, b = batch["image"], batch["image"].shape[0]
        if "num_skipped" in batch:
            self.log("data/skipped", batch["num_skipped"].float(), reduce_fx="sum", batch_size=max(b, 1))
        if b == 0:  # every file of the batch was unreadable (counted above): nothing to learn from
            return None
        aux_scale = self.aux_scale()
        out = self.tokenizer(
            images, generator=self._step_generator(), aux_scale=aux_scale, codes_frozen=self.codes_frozen
        )
        self.log("train/loss", out.loss, prog_bar=True, batch_size=b)
        self.log("train/diffusion", out.diffusion, batch_size=b)
        self.log("train/commitment", out.commitment, batch_size=b)
        if self.tokenizer.config.edge_weight > 0 or self.tokenizer.config.perceptual_weight > 0:
            self.log("train/aux_scale", aux_scale, batch_size=b)
        if self.tokenizer.config.edge_weight > 0:
            self.log("train/edge", out.edge, batch_size=b)
        if self.tokenizer.config.entropy_weight > 0:
            self.log("train/entropy", out.entropy, batch_size=b)
        if self.tokenizer.config.perceptual_weight > 0:
            self.log("train/perceptual", out.perceptual, batch_size=b)
        if self.tokenizer.config.distill_weight > 0 and not self.codes_frozen:
            self.log("train/distill", out.distill, batch_size=b)
        return out.loss

    def aux_scale(self) -> float:
        """The factor on the auxiliary loss terms (`TokenizerConfig.edge_weight`, `perceptual_weight`) at this
        step: 0 before optimizer step `aux_start_step`, then ramped linearly to 1 over `aux_warmup_steps`.
        Measured (README): with either term from the start, some runs never take off - the decoder does not learn
        to read the tokens - so the terms can wait until the tokens are in use."""
        hp = self.hparams
        after = self.global_step - hp.aux_start_step
        return float(after >= 0) if hp.aux_warmup_steps <= 0 else min(max(after / hp.aux_warmup_steps, 0.0), 1.0)

    def _step_generator(self) -> torch.Generator:
        # Noise, times and dropouts are a function of (seed, step, rank) alone, so a run resumed from a checkpoint
        # draws exactly what the uninterrupted run drew, and ranks draw differently.
        seed = (self.hparams.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank
        return torch.Generator(self.device).manual_seed(seed)

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.tokenizer.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 and "pos" not in name and "queries" not in name else no_decay).append(param)
        total = self.trainer.estimated_stepping_batches
        start, factor = hp.decoder_only_from_step, None
        if start is not None and start < total:
            # Two schedules end to end: warm-up + cosine over the joint steps, then again over the decoder-only ones.
            joint = warmup_cosine(min(hp.warmup_steps, max(start, 1)), max(start, 1), hp.min_lr_ratio)
            alone = warmup_cosine(min(hp.warmup_steps, total - start), total - start, hp.min_lr_ratio)
            scale = hp.decoder_only_lr_scale

            def factor(step: int) -> float:
                return joint(step) if step < start else scale * alone(step - start)

        return adamw_warmup_cosine(decay, no_decay, hp, total, factor)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = self.hparams.grad_clip_norm if gradient_clip_val is None else gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ----------------------------------------------------------------------------------- validation / test
    def _eval_step(self, metrics: TokenizerEvaluator, batch: dict, batch_idx: int) -> dict:
        # Per-batch noise seeds: evaluation is reproducible and independent of batch order across ranks.
        generator = torch.Generator(self.device).manual_seed(self.hparams.seed * 100_003 + batch_idx)
        out = metrics.update(self.tokenizer, batch["image"], generator)
        return {"images": batch["image"], **out} if batch_idx == 0 else {}

    def _log_eval(self, metrics: TokenizerEvaluator, stage: str) -> dict:
        results = metrics.compute()
        metrics.reset()
        for key, value in results.items():
            if key == "prefix_psnr":
                for j, psnr in zip(results["prefix_tokens"], value):
                    self.log(f"{stage}/prefix_psnr_{j}", psnr, sync_dist=False)
            elif isinstance(value, float):
                self.log(f"{stage}/{key}", value, sync_dist=False)  # torchmetrics already synced the states
        # The per-position curves (usage and perplexity of each token position) as a JSON run artifact.
        per_position = {k: results[k] for k in ("usage_per_position", "perplexity_per_position")}
        for logger in self.loggers if self.trainer.is_global_zero else []:
            if isinstance(logger, MLFlowLogger):
                name = f"metrics/{stage}_per_position_step{self.global_step:07d}.json"
                logger.experiment.log_dict(logger.run_id, per_position, name)
        return results

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(self.val_metrics, batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.last_val_results = self._log_eval(self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(self.test_metrics, batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.last_test_results = self._log_eval(self.test_metrics, "test")
