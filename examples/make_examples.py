"""Write the bundled example checkpoints: examples/tiny/{base,ft1,ft2}, Hugging Face folders of
a tiny Llama-shaped bf16 model (a base and two fine-tunes), a few hundred KB in all.

    python examples/make_examples.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmerge.testing import write_model_family

TINY = {"hidden": 64, "intermediate": 128, "layers": 2, "vocab": 128, "dtype": "BF16"}


def make(out_dir: Path) -> dict[str, Path]:
    """Write the tiny example family into `out_dir`; returns their paths by name."""
    return write_model_family(out_dir, **TINY, n_finetunes=2, layout="folder", seed=0)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "tiny"
    for name, path in make(target).items():
        print(f"{name}: {path}")
