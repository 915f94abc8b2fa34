"""`ddt`: the Lightning CLI of ddt-lightning (`ddt fit|validate|test|predict --config ...`), plus the commands
of `COMMANDS`: `ddt pipeline --config ...`, `ddt pretokenize --config ...`,
`ddt generate|caption|edit|evaluate --model EXPORT ...`.

Modules, DataModules, callbacks, strategy and accelerator are chosen by config (`class_path` / `init_args`), so an
ablation is a small override file (design.md section 3). Two run-level keys are added:

- `export_dir`: after `fit` (or `test`), rank 0 writes the tokenizer there with `save_pretrained` (loadable
  without Lightning) and logs it to the MLflow run;
- `test_after_fit`: after `fit`, evaluate on the held-out test split and print the figures (as `ddt test` does), the
  last line of standard output being one JSON object (`psnr_onestep`, `psnr_sampler`, `sampler_steps`, `usage`,
  `prefix_psnr`, `export`).

MLflow (`ddt_lightning.tracking.MLflowLogger`) is the default logger and the resolved config is a run artifact.
"""

from __future__ import annotations

import importlib
import json
import sys

import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from ddt_lightning.runtime import flush_denormals
from ddt_lightning.tracking import MLflowLogger

JSON_KEYS = ("psnr_onestep", "psnr_sampler", "sampler_steps", "usage", "prefix_psnr")


class LogConfigToMLflow(SaveConfigCallback):
    """Store the resolved config as `config.yaml` in every MLflow run (instead of a file in a log dir)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                logger.experiment.log_text(logger.run_id, text, "config.yaml")


class DDTCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LogConfigToMLflow,
            save_config_kwargs={"save_to_log_dir": False},
            trainer_defaults={"logger": {"class_path": "ddt_lightning.tracking.MLflowLogger"}},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str | None, default=None, help="write the trained tokenizer here")
        parser.add_argument("--test_after_fit", type=bool, default=False, help="evaluate on the test split after fit")

    def _export(self) -> str | None:
        """Rank 0 writes the tokenizer to `export_dir` (if set) and logs it to the MLflow run."""
        export, trainer = self.config[self.subcommand].export_dir, self.trainer
        if export:
            if trainer.is_global_zero:
                # A module with its own `save_pretrained` (the LLM: `export/lm/`) exports itself; the tokenizer
                # module exports its DDTTokenizer.
                own = hasattr(self.model, "save_pretrained")
                (self.model if own else self.model.tokenizer).save_pretrained(export)
                for logger in trainer.loggers:
                    if isinstance(logger, MLFlowLogger):
                        name = "llm" if own else "tokenizer"
                        logger.experiment.log_artifacts(logger.run_id, export, artifact_path=name)
            trainer.strategy.barrier("export")
        return export

    def after_fit(self) -> None:
        export = self._export()
        if self.config[self.subcommand].test_after_fit:
            # The held-out split, with the weights training ended with (the EMA average when that callback is used).
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            self._report(export, fitted=True)

    def after_test(self) -> None:
        self._report(self._export())

    def _report(self, export: str | None, fitted: bool = False) -> None:
        """Print where the run (and the export) are, then the held-out figures as the last line: one JSON object
        (kept as `self.summary`). After `fit`, also the optimizer steps taken (`steps`) and asked for (`max_steps`):
        `trainer.max_time` may stop a run before its `max_steps`."""
        if not self.trainer.is_global_zero:
            return
        results = self.model.last_test_results
        for logger in self.trainer.loggers:
            if isinstance(logger, MLflowLogger):
                print(logger.describe())
        if export:
            print(f"Exported: {export}")
        if all(key in results for key in JSON_KEYS):  # the tokenizer's figures, under the keys its issue gave them
            summary = {key: results[key] for key in JSON_KEYS} | {"export": export}
            summary |= {k: results[k] for k in ("ssim", "perplexity", "prefix_tokens", "rfid") if k in results}
        else:
            summary = dict(results) | {"export": export}
        if fitted:
            summary |= {"steps": self.trainer.global_step, "max_steps": self.trainer.max_steps}
        self.summary = summary
        sys.stdout.flush()
        print(json.dumps(summary), flush=True)


# `ddt <command>` beside Lightning's fit/validate/test/predict: jsonargparse entry points of their own modules.
COMMANDS = {
    "pipeline": "ddt_lightning.pipeline:main",
    "pretokenize": "ddt_lightning.pretokenize:main",
    "generate": "ddt_lightning.mllm.commands:main_generate",
    "caption": "ddt_lightning.mllm.commands:main_caption",
    "edit": "ddt_lightning.mllm.commands:main_edit",
    "evaluate": "ddt_lightning.mllm.commands:main_evaluate",
}


def main(args=None) -> None:
    flush_denormals()  # first: before torch starts its thread pool (runtime.py)
    argv = sys.argv[1:] if args is None else list(args)
    torch.set_float32_matmul_precision("high")
    if argv and argv[0] in COMMANDS:
        module, _, function = COMMANDS[argv[0]].partition(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    DDTCLI(args=argv)


if __name__ == "__main__":
    main()
