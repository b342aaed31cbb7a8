"""`moejax train-predictor`: fit a predictor on routing traces and write its directory."""

from __future__ import annotations

from pathlib import Path

from moejax.errors import MoejaxError
from moejax.outputs import check_output
from moejax.predictors import store
from moejax.predictors.data import concatenate, load_trace_data
from moejax.predictors.sida import SiDAPredictor, TrainingConfig
from moejax.tools.lab import parse_range


def train_predictor(kind: str, traces: list[Path], out_dir: Path, *, sequences: str | None = None,
                    config: TrainingConfig | None = None, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Fits a predictor of `kind` (`store.KINDS`) on `traces` (their sequences "A:B" when given)
    and writes it to `out_dir` (refused before any work if it exists and `overwrite` is not set). Returns
    the training summary."""
    if kind not in store.KINDS:
        raise MoejaxError(f"--kind {kind!r} is not one of {', '.join(store.KINDS)}")
    check_output(out_dir, traces, overwrite, store.PREDICTOR_OUTPUT)
    data = concatenate([load_trace_data(path) for path in traces])
    data = data.select(*parse_range(sequences, data.trace.num_sequences, "--sequences"))
    trace = data.trace
    cls = store.KINDS[kind]
    args = (trace.num_layers, trace.num_experts, trace.top_k)
    predictor = cls(*args, config) if issubclass(cls, SiDAPredictor) else cls(*args)
    summary = predictor.fit(data, show_progress=show_progress)
    summary = {"traces": [str(p) for p in traces], "sequences": sequences, **summary}
    store.save(predictor, out_dir, summary, overwrite, traces)
    return summary
