"""`moejax.load`: a checkpoint directory -> an Engine with the chosen execution mode."""

from __future__ import annotations

from pathlib import Path

from moejax import checkpoint
from moejax.encdec_config import EncDecConfig
from moejax.errors import MoejaxError
from moejax.runtime.engine import Engine
from moejax.runtime.executors import ResidentExecutor, WholeModelExecutor
from moejax.runtime.seq2seq import load_seq2seq
from moejax.tokenizer import load_tokenizer

OFFLOAD_MODES = ("resident",)


def load(path: str | Path, *, offload: str = "resident", whole_model: bool = False, device=None,
         routing: str | None = None) -> Engine:
    """Loads a moejax checkpoint (an encoder-decoder one as a Seq2SeqEngine).

    offload: where experts live ('resident': all on the device).
    whole_model: compile the whole forward pass as one program (reference path; resident only).
    routing: encoder-decoder models only: 'dropless' (default) or 'capacity' (token dropping).
    """
    path = Path(path)
    cfg = checkpoint.load_config(path)
    if offload not in OFFLOAD_MODES:
        raise MoejaxError(f"--offload '{offload}' is not one of {', '.join(OFFLOAD_MODES)}")
    if isinstance(cfg, EncDecConfig):
        return load_seq2seq(path, cfg, whole_model=whole_model, routing=routing, device=device)
    if routing not in (None, "dropless"):
        raise MoejaxError(f"--routing {routing}: {cfg.family} routing is always dropless (capacity is for encoder-decoder models)")
    globals_ = checkpoint.load_globals(path)
    layers = [checkpoint.load_layer(path, i) for i in range(cfg.num_layers)]
    experts = [checkpoint.load_stacked_experts(path, cfg, i) if cfg.moe_layers[i] else None for i in range(cfg.num_layers)]
    executor_cls = WholeModelExecutor if whole_model else ResidentExecutor
    executor = executor_cls(cfg, globals_, layers, experts, device)
    return Engine(cfg, executor, load_tokenizer(path), path)
