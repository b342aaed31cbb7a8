"""moejax: serve Mixture-of-Experts language models on GPUs too small to hold them.

    import moejax
    engine = moejax.load(moejax.SHIPPED_CHECKPOINT)
    result = engine.generate("Once upon a time", max_new_tokens=32, temperature=0.8)
    print(result.text[0], result.timing.tpot_s)

Heavy modules (JAX, Flax, orbax) load on first use, not at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The small MoE shipped inside the package (package data): the CLI's default checkpoint.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "tiny-moe"

if TYPE_CHECKING:
    from moejax.config import ModelConfig
    from moejax.errors import MoejaxError
    from moejax.runtime.engine import Engine, GenerationConfig, GenerationResult
    from moejax.runtime.loading import load
    from moejax.runtime.sampling import SamplingParams
    from moejax.runtime.seq2seq import Seq2SeqEngine

_EXPORTS = {
    "load": "moejax.runtime.loading",
    "Engine": "moejax.runtime.engine",
    "GenerationConfig": "moejax.runtime.engine",
    "GenerationResult": "moejax.runtime.engine",
    "SamplingParams": "moejax.runtime.sampling",
    "Seq2SeqEngine": "moejax.runtime.seq2seq",
    "ModelConfig": "moejax.config",
    "MoejaxError": "moejax.errors",
}

__all__ = sorted(_EXPORTS) + ["SHIPPED_CHECKPOINT", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moejax' has no attribute {name!r}")
