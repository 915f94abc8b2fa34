"""`GenerationSamples`: what DDT-LLaMA draws and says during training, as MLflow run artifacts.

At the end of each validation (design.md section 3: "MLflow tracking with metrics and image grids"), for the
first `num_samples` held-out examples of the first validation batch:

- `val/samples` (PNG): the DDT tokenizer's reconstruction of each held-out image (row 1: the best an LM that
  emits the right codes can draw) over the LM's text-to-image sample for the same caption (row 2, with
  classifier-free guidance; absent for `token_order.shuffle: random`, whose codes cannot be put back in order);
- `val/samples` (text): one line per example, `caption<TAB>generated caption` when the run trains image-to-text
  (the generated caption is left empty otherwise).

Sampling draws only from the callback's own seeded generator and restores the LM's train/eval mode: a run with
this callback ends with the same weights as one without (tested). It runs on
global rank zero alone: with DDP that is the unwrapped module's plain forward (no collective); a sharded
strategy would need every rank in each forward, so it is refused at setup.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ddt_lightning.images import log_image, log_text, make_grid


class GenerationSamples(L.Callback):
    """Args:
    num_samples: held-out examples per validation (from the first validation batch; it must have `caption`).
    guidance: classifier-free guidance of the LM's image tokens (1: none).
    decode_steps, decode_guidance: the DDT decoder's Euler steps and guidance.
    temperature, top_k: sampling of the image tokens.
    seed: the generator every validation starts from (same seed: the samples differ only by training).
    """

    def __init__(
        self,
        num_samples: int = 8,
        guidance: float = 3.0,
        decode_steps: int = 1,  # mllm.model.DEFAULT_DECODE_STEPS (kept equal by a test)
        decode_guidance: float = 1.0,  # mllm.model.DEFAULT_DECODE_GUIDANCE (likewise)
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        if decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps} must be >= 1")
        self.num_samples = num_samples
        self.guidance = guidance
        self.decode_steps = decode_steps
        self.decode_guidance = decode_guidance
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self._held_out: dict[str, Any] | None = None
        self._warned = False  # about a validation batch without captions, once
        self.last_samples: dict[str, Any] | None = None  # the last logged grid, captions and generated captions

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(
                f"GenerationSamples samples on rank 0 alone, which a sharded strategy "
                f"({type(trainer.strategy).__name__}) cannot do: remove it from trainer.callbacks"
            )
        if pl_module.ddt is None and not pl_module.hparams.get("tokenizer_path"):
            raise ValueError(
                "GenerationSamples decodes with the DDT tokenizer: set model.init_args.tokenizer_path (an export)"
            )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or not trainer.is_global_zero or trainer.sanity_checking:
            return
        captions = batch.get("caption")
        if not captions:
            self._held_out = None
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"GenerationSamples: the validation batch has no 'caption' (it has {sorted(batch)}): no samples"
                )
            return
        n = min(self.num_samples, len(captions))
        if "codes" in batch:
            codes = batch["codes"][:n]
        else:
            codes = pl_module.frozen_ddt().encode(batch["image"][:n].to(pl_module.device))
        self._held_out = {"captions": list(captions[:n]), "codes": codes.detach().clone()}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        held_out, self._held_out = self._held_out, None
        if held_out is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        from ddt_lightning.mllm.model import DDTLlama

        lm = pl_module.lm
        was_training = lm.training
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        try:
            model = DDTLlama(
                lm,
                pl_module.vocab,
                pl_module.frozen_ddt(),
                pl_module.order,
                max_text_tokens=pl_module.hparams.max_text_tokens,
                decode_steps=self.decode_steps,
            )  # sets lm.eval()
            with torch.inference_mode():
                reference = model.decode(held_out["codes"], guidance=self.decode_guidance, generator=generator)
                sampled = reference[:0]  # a randomly shuffled order cannot be put back into DDT's: no samples
                if not pl_module.order.is_random:
                    sampled = model.text_to_image(
                        held_out["captions"],
                        guidance=self.guidance,
                        temperature=self.temperature,
                        top_k=self.top_k,
                        decode_guidance=self.decode_guidance,
                        generator=generator,
                    )
                said = [""] * len(held_out["captions"])
                if "i2t" in pl_module.mix.active:
                    said = model.caption_codes(held_out["codes"])  # greedy
        finally:
            lm.train(was_training)
        step = trainer.global_step
        grid = make_grid(torch.cat([reference, sampled]).float().cpu(), nrow=len(held_out["captions"]))
        log_image(trainer.loggers, "val/samples", grid, step)
        lines = "".join(f"{caption}\t{text}\n" for caption, text in zip(held_out["captions"], said))
        self.last_samples = {"grid": grid, "captions": held_out["captions"], "generated_captions": said}
        log_text(trainer.loggers, "val/samples", lines, step)
