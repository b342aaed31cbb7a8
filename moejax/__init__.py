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
    from moejax.engine.engine import Engine
    from moejax.engine.loading import load
    from moejax.engine.results import GenerationConfig, GenerationResult
    from moejax.engine.slots import SamplingParams
    from moejax.errors import MoejaxError
    from moejax.offload.config import OffloadConfig
    from moejax.engine.seq2seq import Seq2SeqEngine

_EXPORTS = {
    "load": "moejax.engine.loading",
    "Engine": "moejax.engine.engine",
    "GenerationConfig": "moejax.engine.results",
    "GenerationResult": "moejax.engine.results",
    "SamplingParams": "moejax.engine.slots",
    "OffloadConfig": "moejax.offload.config",
    "Seq2SeqEngine": "moejax.engine.seq2seq",
    "ModelConfig": "moejax.config",
    "MoejaxError": "moejax.errors",
}

__all__ = sorted(_EXPORTS) + ["SHIPPED_CHECKPOINT", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moejax' has no attribute {name!r}")
