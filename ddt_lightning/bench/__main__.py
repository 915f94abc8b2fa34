"""`python -m ddt_lightning.bench <bench> [options]`: the project's benchmarks, one module each, imported lazily.

- `vq`: the quantizer's training forward against vector-quantize-pytorch and faiss (`ddt_lightning.bench.vq`).
- `train`: tokenizer training throughput and model FLOP utilisation (`ddt_lightning.bench.train`).
- `generate`: text-to-image sampling with classifier-free guidance against plain `model.generate`
  (`ddt_lightning.bench.generate`).
"""

from __future__ import annotations

import importlib
import sys

from ddt_lightning.runtime import flush_denormals

BENCHES = {
    "vq": "ddt_lightning.bench.vq",
    "train": "ddt_lightning.bench.train",
    "generate": "ddt_lightning.bench.generate",
}


def main(argv: list[str] | None = None) -> int:
    flush_denormals()  # first: before torch starts its thread pool (runtime.py)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        got = f"unknown bench {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        print(f"{got}usage: python -m ddt_lightning.bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    result = importlib.import_module(BENCHES[argv[0]]).main(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
