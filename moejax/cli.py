"""The `moejax` command: convert, export, info, generate, trace, lab, serve.

Every user error ends in one line on stderr ("moejax: error: ...") and exit status 2; the library's
errors name its parameters (`expert_budget`), shown here as the flags that set them (`--expert-budget`).
Notes the library logs (e.g. a budget capped at all experts) are lines "moejax: note: ..." on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from moejax import SHIPPED_CHECKPOINT, __version__
from moejax.errors import MoejaxError, plural
from moejax.interrupts import stop_like_ctrl_c
from moejax.outputs import check_output, refuse_overlap

DEFAULT_CHECKPOINT = SHIPPED_CHECKPOINT
# The flag that sets each parameter of the library's functions (moejax.load, GenerationConfig,
# SamplingParams, lab.replay, ...), for the errors that name a parameter.
FLAGS = {
    "offload": "--offload", "expert_budget": "--expert-budget", "cache_policy": "--cache-policy",
    "host_budget": "--host-budget", "expert_dir": "--expert-dir",
    "routing": "--routing", "prefetch": "--prefetch", "expert_compute": "--expert-compute",
    "prefetch_per_layer": "--prefetch-per-layer", "prefetch_per_step": "--prefetch-per-step",
    "prefetch_floor": "--prefetch-floor", "traces": "--traces", "max_seq_len": "--max-seq-len",
    "prefill_chunk": "--prefill-chunk", "expert_format": "--expert-format", "cpu_experts": "--cpu-experts",
    "layer_stream": "--layer-stream", "miss_copy": "--miss-copy",
    "devices": "--devices", "placement": "--placement",
    "placement_traces": "--placement-traces", "hot_replicas": "--hot-replicas", "slots": "the number of prompts (--batch-size for trace)",
    "max_new_tokens": "--max-new-tokens", "greedy": "--greedy", "temperature": "--temperature", "top_k": "--top-k",
    "top_p": "--top-p", "stop_token_ids": "--stop-ids", "target_lang": "--target-lang",
    "forced_bos_id": "--forced-bos-id", "dtype": "--dtype", "max_prompt_tokens": "--max-prompt-tokens",
    # lab.replay
    "trace": "--traces", "collection": "--fit", "capacity_fraction": "--capacity", "policy": "--policy",
    "lookahead_accuracy": "--lookahead-accuracy", "expert_bytes": "--expert-bytes",
    # serving.ServingLoop
    "scheduler": "--scheduler", "max_queue": "--max-queue", "max_batch": "--max-batch",
    # predictors
    "predicted": "--predictor", "predict_every": "--predict-every", "seed": "--seed",
}
FLOOR_HELP = ("trace prefetchers: propose only experts with at least this probability of use "
              "(default 0.02; higher: fewer, surer copies)")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors become MoejaxError, so they too are one line and exit status 2."""

    def error(self, message: str):
        raise MoejaxError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moejax", description="Serve Mixture-of-Experts models on small GPUs.")
    parser.add_argument("--version", action="version", version=f"moejax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a HuggingFace checkpoint (safetensors) to a moejax checkpoint")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="weights dtype (default: the source's)")
    p.add_argument("--expert-format", choices=("int8", "int4"),
                   help="store the routed experts compact (APPROXIMATE: weight-only, a scale per 64 input rows); "
                        "the checkpoint then loads in this format")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("export", help="write a moejax checkpoint as a HuggingFace checkpoint (safetensors)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace HF_DIR if it exists")
    p.add_argument("--max-shard-size", default="5GB",
                   help="most bytes of one safetensors file, e.g. 5GB (the default), 500MB, 2GiB")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("info", help="architecture, parameter counts and sizes of a checkpoint")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="generate text or token ids")
    p.add_argument("checkpoint", type=Path, nargs="?", default=DEFAULT_CHECKPOINT, help="(default: the shipped tiny-moe)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", type=_token_ids, help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample at this temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the k likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample only within this probability mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", type=_token_ids, default=[], help="extra stop token ids, comma-separated")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS tokens")
    add_offload_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text, timing and stats")
    p.add_argument("--task", help="a task label for the prompts (the trace prefetcher prefers traces of that task)")
    seq2seq = p.add_argument_group("encoder-decoder models (the prompt is the source)")
    seq2seq.add_argument("--target-lang", help="force this language code (a tokenizer token, e.g. fra_Latn) as first token")
    seq2seq.add_argument("--forced-bos-id", type=int, help="force this token id as the first target token")
    seq2seq.add_argument("--routing", choices=("dropless", "capacity", "predicted"),
                         help="capacity: transformers' token dropping; predicted (decoder models, with --predictor): "
                              "APPROXIMATE, the predictor's experts replace the routers' (SiDA)")
    p = sub.add_parser("trace", help="record the experts every token of a prompt file activates")
    p.add_argument("checkpoint", type=Path, nargs="?", default=DEFAULT_CHECKPOINT, help="(default: the shipped tiny-moe)")
    p.add_argument("--prompts", type=Path, required=True, help="JSONL: one object a line with 'prompt' (or 'prompt_ids') and optional 'task'")
    p.add_argument("--out", type=Path, required=True, help="directory for eams.npz, routing.npz, summary.json")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens generated after each prompt")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=int, help="trace only the first N prompts (N >= 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier trace in --out")
    p.add_argument("--max-prompt-tokens", type=int, help="keep the first N tokens of each prompt")
    p.add_argument("--router-probs", action="store_true",
                   help="also record the router's probability of each chosen expert (for `train-predictor`'s "
                        "distillation): a teacher-forced whole-model pass afterwards, with every expert in memory")
    add_offload_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_lab_parser(sub)
    add_serve_parser(sub)
    add_train_predictor_parser(sub)
    return parser


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP with an OpenAI-compatible API (needs moejax[serve])")
    p.add_argument("checkpoint", type=Path, nargs="?", default=DEFAULT_CHECKPOINT, help="(default: the shipped tiny-moe)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: a free one)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests running at once: the engine's KV slots (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more are answered 429 (default 64)")
    p.add_argument("--scheduler", choices=("fcfs", "slo"), default="fcfs",
                   help="admission order: fcfs (first come, first served) or slo (by deadline slack and task)")
    p.add_argument("--no-warmup", action="store_true",
                   help="start serving at once; the first requests then wait for their programs to compile")
    p.add_argument("--warmup-longest", type=int, metavar="N",
                   help="before listening, compile every program of requests up to N tokens (prompt + new): a slower "
                        "start, no compilation pauses while serving them (default: short prompts, every batch size)")
    p.add_argument("--routing", choices=("predicted",),
                   help="predicted (with --predictor): APPROXIMATE, the predictor's experts replace the routers' "
                        "(SiDA); /metrics and every answer's system_fingerprint say so")
    add_offload_arguments(p)


def add_train_predictor_parser(sub) -> None:
    from moejax.predictors.sida import TrainingConfig

    defaults = TrainingConfig()
    p = sub.add_parser("train-predictor", help="learn to predict the experts tokens (sida) or requests (emoe) use")
    p.add_argument("--kind", required=True, help="sida (per token) | emoe (per request) | frequency | token-table")
    p.add_argument("--traces", type=Path, nargs="+", required=True,
                   help="routing traces with their tokens: directories `moejax trace` wrote, or NAME.npz (experts "
                        "[layers, tokens, k] + seq_lens) with NAME_tokens.json beside it")
    p.add_argument("--sequences", help="train only on sequences A:B of the traces (together)")
    p.add_argument("--out", type=Path, required=True, help="directory to write the predictor to")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier predictor in --out")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--context", type=int, default=defaults.context, help="tokens the encoder reads at once")
    p.add_argument("--hidden", type=int, default=defaults.hidden, help="LSTM units per direction")
    p.add_argument("--layers", type=int, default=defaults.layers, help="stacked LSTMs")
    p.add_argument("--bidirectional", action="store_true", help="read the whole window, later tokens too (default: "
                   "only earlier ones, as the model's routing does)")
    p.add_argument("--unknown-rate", type=float, default=defaults.unknown_rate,
                   help="share of training tokens whose id is hidden, so the encoder learns unseen strings' spelling")
    p.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens, help="tokens per optimiser step")
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--validation", type=float, default=defaults.validation,
                   help="share of the sequences held out to pick the best epoch (the last ones)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def add_lab_parser(sub) -> None:
    p = sub.add_parser("lab", help="replay routing traces through cache policies and prefetchers (no model)")
    p.add_argument("--traces", type=Path, required=True,
                   help="routing trace: routing.npz or the directory `moejax trace` wrote, or any .npz with "
                        "experts [layers, tokens, k] and seq_lens")
    p.add_argument("--sequences", help="replay only sequences A:B of --traces")
    p.add_argument("--fit", type=Path, help="routing trace to build the EAM collection from, as --traces (default: none)")
    p.add_argument("--fit-sequences", help="use only sequences A:B of --fit")
    p.add_argument("--capacity", help="cache size as fractions of all (layer, expert) pairs: 0.25 or 0.1,0.25,0.5 "
                   "(required unless --predictor only measures a predictor)")
    p.add_argument("--policy", default="lru", help="lru | lfu | fifo | lifo | activation | belady")
    p.add_argument("--prefetch", default="none", help="none | lookahead | trace | trace+lookahead | predictor")
    p.add_argument("--predictor", type=Path, help="a predictor directory (`moejax train-predictor`), or 'lookahead' (the "
                   "trace's recorded guess): report its top-k recall and precision on --traces (which need their "
                   "tokens), and prefetch with it (--prefetch predictor)")
    p.add_argument("--prefetch-per-layer", type=int,
                   help="lookahead prefetchers: most experts fetched per MoE layer step (default: top-k)")
    p.add_argument("--prefetch-per-step", type=int,
                   help="trace prefetchers: most experts fetched when a step begins (default: 2 x top-k)")
    p.add_argument("--prefetch-floor", type=float, help=FLOOR_HELP)
    p.add_argument("--lookahead-accuracy", type=float,
                   help="simulate the lookahead router with this per-expert accuracy (default: the trace's recorded "
                        "lookahead, else 0.78)")
    p.add_argument("--expert-bytes", type=int, help="bytes of one expert (> 0), to report bytes moved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, help="also write a PNG of hit rate against capacity (needs matplotlib)")


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="positions of each sequence's KV cache: prompt + new tokens (default 2048, at most the model's)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="most prompt tokens one step prefills (default 512; a cache budget must hold their experts)")
    p.add_argument("--offload", default="resident", help="resident | cached | on-demand | dense-offload (default resident)")
    p.add_argument("--expert-budget", help="GPU memory for cached experts: a fraction of all expert bytes (0.25) or a size (12GiB)")
    p.add_argument("--host-budget", help="--offload cached: host memory for experts, a fraction of all expert bytes or a "
                   "size; the rest stays on local disk (--expert-dir) under a host cache of this size (default: all in host)")
    p.add_argument("--expert-dir", type=Path, help="--host-budget: the directory of per-expert files (default: "
                   "expert_files/ in the checkpoint, expert_files-int4/ etc. for another --expert-format; written on first use)")
    p.add_argument("--cache-policy", help="expert cache replacement policy (--offload cached): lru (default; serve with "
                   "--max-batch > 1: activation) | lfu | fifo | lifo | activation")
    p.add_argument("--prefetch", default="none", help="expert prefetcher (--offload cached): none | lookahead | trace | trace+lookahead | "
                   "predictor (with --predictor)")
    p.add_argument("--prefetch-per-layer", type=int,
                   help="lookahead prefetchers: most experts fetched per MoE layer step (default: top-k)")
    p.add_argument("--prefetch-per-step", type=int,
                   help="trace prefetchers: most experts fetched when a step begins (default: 2 x top-k)")
    p.add_argument("--prefetch-floor", type=float, help=FLOOR_HELP)
    p.add_argument("--traces", type=Path, help="activation matrices for --prefetch trace / --cache-policy activation "
                   "(eams.npz or the directory `moejax trace` wrote; default: learn from the run)")
    p.add_argument("--predictor", type=Path, help="a predictor directory (`moejax train-predictor`, on this model's "
                   "traces) run ahead of the steps on a host thread: --prefetch predictor fetches its experts early")
    p.add_argument("--predict-every", type=int, default=1,
                   help="an emoe (per-request) predictor runs for one prompt in N; the others reuse its prediction")
    p.add_argument("--expert-compute", default="auto",
                   help="how a step computes its experts: auto (default: grouped for many tokens; for a decode step's few, "
                   "inplace on one GPU with float experts, else union) | union | "
                   "grouped (dropless dynamic gating) | ragged (the same via lax.ragged_dot) | capacity (static capacity factor 2: "
                   "APPROXIMATE, drops tokens) | inplace (union's sums from Pallas kernels reading the experts in place, "
                   "no gathered copy; float experts only) | grouped-inplace (grouped's blocks through those kernels)")
    p.add_argument("--expert-format",
                   help="routed experts on the host, over the link and in the cache as: bf16 | int8 | int4 (APPROXIMATE: "
                   "weight-only, a scale per 64 input rows, dequantized in the expert compute; default: as stored)")
    p.add_argument("--cpu-experts", default="off",
                   help="auto (--offload cached): compute a missed expert routed few tokens on the CPU instead of copying "
                   "it (with --host-budget: from the host cache), when the cost model measured at load says that is "
                   "faster | auto-float32 (the same, the host computing from a float32 copy of the experts: host RAM "
                   "for twice their bf16 bytes more; faster on hosts whose float32 matmul reads >2x the bytes/s of "
                   "their bf16 one) | off (default)")
    p.add_argument("--layer-stream", default="auto",
                   help="auto (default; --offload cached, one device): a decode step of so many sequences, or a prompt "
                   "chunk of so many tokens, that it copies whole layers runs a program per layer, the host copying "
                   "the next such layer while the GPU computes (one more layer of GPU memory) | off: one program per "
                   "step, its copies in order with its compute")
    p.add_argument("--miss-copy", default="auto",
                   help="how a step moves a missed expert out of pinned host memory (--offload cached or "
                   "on-demand, one device, no --host-budget): auto (default: kernel on a GPU where the host keeps "
                   "each layer's experts as one array, else xla) | xla (fetched into a temporary, then written into "
                   "its slot) | kernel (a CUDA kernel built with nvcc on first use copies it straight into its "
                   "slot). The same outputs either way")
    p.add_argument("--devices", type=int, default=1,
                   help="expert parallelism: split the experts over the first N devices, the dense weights on each; "
                   "with --offload cached each device has its own cache of --expert-budget (default 1)")
    p.add_argument("--placement", default="round-robin",
                   help="--devices: which device holds each expert: round-robin (default) | balanced (by the measured "
                   "load of --placement-traces)")
    p.add_argument("--placement-traces", type=Path, help="--placement balanced: the measured routing (routing.npz, "
                   "eams.npz or the directory `moejax trace` wrote)")
    p.add_argument("--hot-replicas", type=int, default=0, help="--placement balanced: a second copy of each MoE layer's "
                   "N hottest experts on another device (default 0)")


def load_predictor(args, approximate_routing: bool = False, scheduler: str | None = None):
    """The predictor of --predictor (None without it), which goes with --prefetch predictor (or, for
    generate and serve, --routing predicted; for serve, --scheduler slo, which reads its expert profiles)."""
    if args.predict_every != 1 and args.prefetch != "predictor":
        raise MoejaxError("--predict-every paces the predictor of --prefetch predictor (an emoe --predictor): give them "
                          "too, or leave --predict-every out")
    needed = args.prefetch == "predictor" or approximate_routing
    if (args.predictor is None and needed) or (args.predictor is not None and not needed and scheduler != "slo"):
        raise MoejaxError("--predictor DIR goes with --prefetch predictor"
                          + (" or --routing predicted" if hasattr(args, "routing") else "")
                          + (" or --scheduler slo" if scheduler is not None else ""))
    if args.predictor is None:
        return None
    from moejax.predictors import store

    return store.load(args.predictor)


def use_predicted_routing(engine, predictor) -> None:
    """--routing predicted: the predictor's experts replace the routers' (approximate; said on stderr)."""
    from moejax.predictors.approximate import PredictedRouting

    engine.routing_override = PredictedRouting(predictor, engine.cfg.top_k)
    print("moejax: note: --routing predicted is APPROXIMATE: the predictor's experts replace the routers', "
          "so the output can differ from the model's", file=sys.stderr, flush=True)


def load_engine(args, slots: int = 1, predictor=None):
    """An Engine for the checkpoint and offloading flags of `args`, holding `slots` sequences at once; with
    --prefetch predictor, `predictor` runs ahead of its steps."""
    import moejax

    engine = moejax.load(
        args.checkpoint,
        offload=args.offload,
        expert_budget=args.expert_budget,
        host_budget=args.host_budget,
        expert_dir=args.expert_dir,
        cache_policy=args.cache_policy,
        routing=None if getattr(args, "routing", None) == "predicted" else getattr(args, "routing", None),
        slots=slots,
        max_seq_len=args.max_seq_len,
        prefill_chunk=args.prefill_chunk,
        prefetch=args.prefetch,
        prefetch_per_layer=args.prefetch_per_layer,
        prefetch_per_step=args.prefetch_per_step,
        prefetch_floor=args.prefetch_floor,
        traces=args.traces,
        expert_compute=args.expert_compute,
        expert_format=args.expert_format,
        cpu_experts=args.cpu_experts,
        layer_stream=args.layer_stream,
        miss_copy=args.miss_copy,
        devices=args.devices,
        placement=args.placement,
        placement_traces=args.placement_traces,
        hot_replicas=args.hot_replicas,
    )
    if predictor is not None and args.prefetch == "predictor":
        engine.use_predictor(predictor, args.predict_every)
    return engine


def cmd_convert(args) -> int:
    from moejax.convert.converter import convert

    cfg = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, show_progress=not args.quiet,
                  expert_format=args.expert_format)
    experts = f", experts {args.expert_format}" if args.expert_format else ""
    print(f"wrote {args.out_dir} ({cfg.family}, {cfg.num_layers} layers, {cfg.num_experts} experts, {cfg.dtype}{experts})")
    return 0


def cmd_export(args) -> int:
    from moejax.convert.export import export
    from moejax.sizes import parse_size

    max_shard_size = parse_size(args.max_shard_size, "--max-shard-size")
    cfg = export(args.checkpoint, args.hf_dir, overwrite=args.overwrite, show_progress=not args.quiet,
                 max_shard_size=max_shard_size)
    print(f"wrote {args.hf_dir} ({cfg.family}, {cfg.num_layers} layers, {cfg.num_experts} experts, {cfg.dtype})")
    return 0


def cmd_info(args) -> int:
    from moejax import checkpoint
    from moejax.models.decoder import kv_bytes_per_token
    from moejax.models.registry import kind_of

    from moejax.offload.expert_format import stored_format

    cfg = checkpoint.load_config(args.checkpoint)
    kind = kind_of(cfg)
    counts = kind.parameter_counts(cfg)
    kv = None if kind.encoder_decoder else kv_bytes_per_token(cfg)
    fmt = stored_format(args.checkpoint, cfg.dtype)
    if args.json:
        print(json.dumps({"config": cfg.to_json(), "parameters": counts, **fmt.describe(),
                          **({"kv_cache_bytes_per_token": kv} if kv else {})}))
        return 0
    print(f"{args.checkpoint}: {cfg.family}" + (" (encoder-decoder)" if kind.encoder_decoder else "") + f", {cfg.dtype}"
          + (f", experts {fmt.name} (approximate, group size {fmt.group_size})" if fmt.compact else ""))
    for line in kind.describe(cfg):
        print(f"  {line}")
    print(f"  parameters: total {counts['total']:,}, dense {counts['dense']:,}, experts {counts['experts']:,}, active/token {counts['active_per_token']:,}")
    print(f"  bytes: dense {_gib(counts['dense_bytes'])}, one expert {_mib(counts['one_expert_bytes'])}, all experts {_gib(counts['all_experts_bytes'])}")
    if kv:
        print(f"  KV cache per token: {kv['cached']:,} B" + (f" (compressed latent; full heads {kv['full_heads']:,} B, "
                                                             f"{kv['full_heads'] / kv['cached']:.1f}x)" if cfg.is_mla else ""))
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def cmd_generate(args) -> int:
    from moejax.engine.compilation import on_first_compile
    from moejax.engine.results import GenerationConfig
    from moejax.engine.slots import SamplingParams

    if not args.checkpoint.exists():
        raise MoejaxError(f"{args.checkpoint}: no such checkpoint directory")
    if args.temperature is None and (args.top_k != 0 or args.top_p != 1.0):
        raise MoejaxError("--top-k and --top-p filter sampling: give --temperature T too (greedy decoding ignores them)")
    sampling = SamplingParams(
        greedy=args.temperature is None,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        stop_token_ids=tuple(args.stop_ids),
        ignore_eos=args.ignore_eos,
    )
    seq2seq = is_encoder_decoder(args.checkpoint)
    if not seq2seq and (args.target_lang is not None or args.forced_bos_id is not None):
        raise MoejaxError("--target-lang and --forced-bos-id are for encoder-decoder models")
    prompts = args.prompt_ids or args.prompt
    if not prompts:
        raise MoejaxError("give --prompt TEXT or --prompt-ids 1,2,3")
    if args.task is not None and not (args.prefetch.startswith("trace") or args.cache_policy == "activation"):
        raise MoejaxError("--task labels the prompts for --prefetch trace / trace+lookahead and --cache-policy activation: "
                          "give one of them, or leave --task out")
    predicted_routing = args.routing == "predicted"
    if predicted_routing and seq2seq:
        raise MoejaxError("--routing predicted is for decoder models")
    predictor = load_predictor(args, approximate_routing=predicted_routing)
    engine = load_engine(args, slots=len(prompts), predictor=predictor)
    if predicted_routing:
        use_predicted_routing(engine, predictor)
    if args.prompt and engine.tokenizer is None:
        raise MoejaxError(f"{args.checkpoint}: no tokenizer.json: give token ids with --prompt-ids")
    if args.task is not None and args.traces is not None:
        check_task(args.task, engine.collection, args.traces)
    tasks = [args.task] * len(prompts)
    with on_first_compile(lambda: print("compiling...", file=sys.stderr, flush=True)):
        if seq2seq:
            result = engine.generate(prompts, config, target_lang=args.target_lang, forced_bos_id=args.forced_bos_id, tasks=tasks)
        else:
            result = engine.generate(prompts, config, tasks=tasks)
    engine.close()
    if args.json:
        print(json.dumps(result.to_json() | ({"routing": "predicted (approximate)"} if predicted_routing else {})))
        return 0
    for i, tokens in enumerate(result.tokens):
        shown = result.text[i] if result.text is not None else ",".join(map(str, tokens))
        print(f"[{i}] {shown}")
    from moejax.offload.stats import summary_line

    t = result.timing
    print(f"ttft {t.ttft_s * 1e3:.1f} ms, tpot {t.tpot_s * 1e3:.2f} ms, {t.tokens_per_s:.1f} tokens/s "
          f"(compilation apart: {t.compile_s:.2f} s)", file=sys.stderr)
    print(summary_line(result.stats, sum(len(tokens) for tokens in result.tokens)), file=sys.stderr)
    return 0


def check_task(task: str, collection, traces: Path) -> None:
    """Refuses a --task that the collection loaded from --traces does not know (it would match nothing)."""
    known = sorted({t for t in collection.tasks if t is not None})
    if task not in known:
        raise MoejaxError(f"--task '{task}' is not a task of {traces}: "
                          + (f"its tasks are {', '.join(known)}" if known else "its sequences carry no task labels"))


def cmd_lab(args) -> int:
    from moejax.tools import lab
    from moejax.routing.traces import load_routing

    if args.capacity is None and args.predictor is None:
        raise MoejaxError("give --capacity (or --predictor to measure a predictor)")
    if args.prefetch == "predictor" and args.predictor is None:
        raise MoejaxError("--prefetch predictor needs --predictor DIR")
    if args.fit_sequences is not None and args.fit is None:
        raise MoejaxError("--fit-sequences selects sequences of --fit: give --fit too")
    try:
        capacities = [] if args.capacity is None else [float(c) for c in args.capacity.split(",")]
    except ValueError:
        raise MoejaxError(f"--capacity must be fractions separated by commas, got {args.capacity!r}") from None
    if args.plot is not None:
        refuse_overlap(args.plot, [args.traces, args.fit])
        lab.check_plot_path(args.plot)
    quality, predicted = {}, None
    if args.predictor is not None:
        from moejax.predictors import store
        from moejax.predictors.data import load_trace_data
        from moejax.predictors.quality import top_k_quality

        data = load_trace_data(args.traces)
        data = data.select(*lab.parse_range(args.sequences, data.trace.num_sequences, "--sequences"))
        predictor = lab.named_predictor(str(args.predictor), data) or store.load(args.predictor)
        quality = top_k_quality(predictor, data, show_progress=sys.stderr.isatty())
        if args.prefetch == "predictor":
            predicted = lab.predictor_probabilities(predictor, data, show_progress=sys.stderr.isatty())
        if not capacities:
            print_predictor_quality(quality, args.json)
            return 0
    trace = load_routing(args.traces)
    trace = trace.select(*lab.parse_range(args.sequences, trace.num_sequences, "--sequences"))
    collection = None
    if args.fit is not None:
        fit = load_routing(args.fit)
        collection = fit.select(*lab.parse_range(args.fit_sequences, fit.num_sequences, "--fit-sequences")).collection()
    results = [
        lab.replay(trace, capacity_fraction=c, policy=args.policy, prefetch=args.prefetch,
                   prefetch_per_layer=args.prefetch_per_layer, prefetch_per_step=args.prefetch_per_step,
                   prefetch_floor=args.prefetch_floor, collection=collection,
                   lookahead_accuracy=args.lookahead_accuracy, expert_bytes=args.expert_bytes, seed=args.seed,
                   predicted=predicted, show_progress=sys.stderr.isatty()) | quality
        for c in capacities
    ]
    print_lab_results(results, args.json)
    if args.plot is not None:
        label = args.policy + ("" if args.prefetch == "none" else f" + {args.prefetch}")
        lab.plot_curves({label: [(r["capacity_fraction"], r["hit_rate"]) for r in results]}, args.plot, str(args.traces.name))
    return 0


def print_predictor_quality(quality: dict, as_json: bool) -> None:
    """One JSON object, or a line with the means and a line per MoE layer."""
    if as_json:
        print(json.dumps(quality), flush=True)
        return
    print(f"{quality['predictor']} predictor, top-{quality['k']} over {plural(quality['tokens'], 'token')}: recall "
          f"{quality['predictor_recall']:.3f}, precision {quality['predictor_precision']:.3f} (mean over MoE layers)")
    ahead = quality.get("per_layer_next_token_recall")
    if ahead is not None:
        print(f"  the next token's experts, from the tokens before it (decode's run-ahead): recall "
              f"{quality['next_token_recall']:.3f}")
    for layer, (r, p) in enumerate(zip(quality["per_layer_recall"], quality["per_layer_precision"], strict=True)):
        print(f"  MoE layer {layer}: recall {r:.3f}, precision {p:.3f}"
              + (f", next token's recall {ahead[layer]:.3f}" if ahead is not None else ""))


def print_lab_results(results: list[dict], as_json: bool) -> None:
    """One JSON object (with several results, {"results": [...]}), or one line per result."""
    if as_json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}), flush=True)
        return
    for r in results:
        line = (f"{r['policy']}" + ("" if r["prefetch"] == "none" else f" + {r['prefetch']}")
                + f", capacity {r['capacity_fraction']:g} ({plural(r['capacity_experts'], 'expert')}): "
                + f"hit rate {r['hit_rate'] * 100:.1f}%, {r['experts_moved'] / max(r['tokens'], 1):.2f} experts moved/token")
        if r["prefetch"] != "none":
            line += f", prefetch precision {r['prefetch_precision'] * 100:.1f}% recall {r['prefetch_recall'] * 100:.1f}%"
        print(line, flush=True)


def cmd_trace(args) -> int:
    from moejax.engine.results import GenerationConfig
    from moejax.tools.tracing import TRACE_OUTPUT, prepare_prompts, read_prompts, trace_prompts, write_traces

    for flag, value in (("--batch-size", args.batch_size), ("--max-prompt-tokens", args.max_prompt_tokens),
                        ("--limit", args.limit)):
        if value is not None and value < 1:
            raise MoejaxError(f"{flag} must be >= 1 (got {value})")
    inputs = (args.checkpoint, args.prompts, args.traces)
    check_output(args.out, inputs, args.overwrite, TRACE_OUTPUT)
    if args.router_probs and is_encoder_decoder(args.checkpoint):
        raise MoejaxError(f"--router-probs is for decoder models, not {args.checkpoint} (encoder-decoder)")
    prompts = read_prompts(args.prompts)[: args.limit]
    engine = load_engine(args, slots=args.batch_size, predictor=load_predictor(args))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    prompts = prepare_prompts(engine, prompts, args.prompts, args.max_new_tokens, args.max_prompt_tokens)
    trace, collection, summary = trace_prompts(engine, prompts, config, args.batch_size, show_progress=not args.quiet)
    if args.router_probs:
        from moejax.tools.tracing import router_probabilities

        trace.router_probs = router_probabilities(args.checkpoint, trace.token_ids, trace.seq_lens, trace.experts)
    write_traces(args.out, trace, collection, summary, args.overwrite, inputs)
    accuracy = summary.get("lookahead_accuracy")
    print(f"wrote {args.out}: {plural(summary['sequences'], 'sequence')}, {plural(summary['tokens'], 'token')} x "
          f"{plural(summary['moe_layers'], 'MoE layer')}"
          + ("" if accuracy is None else f"; lookahead guess accuracy {accuracy * 100:.1f}%"))
    return 0


def is_encoder_decoder(checkpoint: Path) -> bool:
    """Whether the moejax checkpoint holds an encoder-decoder model (its config read; MoejaxError if it cannot be)."""
    from moejax.checkpoint import load_config
    from moejax.models.registry import kind_of

    return kind_of(load_config(checkpoint)).encoder_decoder


def cmd_serve(args) -> int:
    from moejax.serving.http import require_serve_extra

    require_serve_extra()
    from moejax.serving.http.app import build_app, listen, run, url
    from moejax.serving.http.chat import ChatTemplate
    from moejax.engine.compilation import on_first_compile
    from moejax.serving.loop import ServingLoop, serving_cache_policy

    if not args.checkpoint.exists():
        raise MoejaxError(f"{args.checkpoint}: no such checkpoint directory")
    if is_encoder_decoder(args.checkpoint):  # before listening and loading
        raise MoejaxError(f"{args.checkpoint}: an encoder-decoder model; serve takes decoder-only models")
    longest = [] if args.warmup_longest is None else [("--warmup-longest", args.warmup_longest)]
    for flag, value in [("--max-batch", args.max_batch), ("--max-queue", args.max_queue), *longest]:
        if value < 1:
            raise MoejaxError(f"{flag} must be >= 1 (got {value})")
    if not 0 <= args.port <= 65535:
        raise MoejaxError(f"--port must be in 0..65535 (got {args.port})")
    try:  # before loading, so a port in use is reported at once
        sock = listen(args.host, args.port)
    except OSError as err:
        raise MoejaxError(f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror or err})") from None
    predicted_routing = args.routing == "predicted"
    predictor = load_predictor(args, approximate_routing=predicted_routing, scheduler=args.scheduler)
    args.cache_policy = serving_cache_policy(args.offload, args.cache_policy, args.max_batch)
    with sock:
        engine = load_engine(args, slots=args.max_batch, predictor=predictor)
        if predicted_routing:
            use_predicted_routing(engine, predictor)
        template = ChatTemplate.from_checkpoint(args.checkpoint, engine.tokenizer)
        loop = ServingLoop(engine, scheduler=args.scheduler, max_queue=args.max_queue, max_batch=args.max_batch,
                           predictor=predictor if args.scheduler == "slo" else None)
        if not args.no_warmup:
            with on_first_compile(lambda: print("moejax: compiling the first programs (--no-warmup skips this)...",
                                                file=sys.stderr, flush=True)):
                engine.warm_up(longest=args.warmup_longest)
                if predictor is not None and args.scheduler == "slo":  # requests' profiles: predicted at submission
                    predictor.warm_up()
        model = args.checkpoint.resolve().name
        app = build_app(loop, engine.tokenizer, model, context=engine.max_seq_len, chat_template=template)
        approximate = "; APPROXIMATE routing: the predictor's experts replace the routers'" if predicted_routing else ""
        print(f"moejax: serving {model} at {url(sock)}/v1 ({template.kind} chat template{approximate}); SIGTERM or "
              "Ctrl-C stops it once the requests in flight are done", file=sys.stderr, flush=True)
        run(app, sock)
    return 0


def cmd_train_predictor(args) -> int:
    from moejax.predictors.sida import TrainingConfig
    from moejax.predictors.training import train_predictor

    for flag, value in (("--epochs", args.epochs), ("--context", args.context), ("--hidden", args.hidden),
                        ("--layers", args.layers), ("--batch-tokens", args.batch_tokens)):
        if value < 1:
            raise MoejaxError(f"{flag} must be >= 1 (got {value})")
    for flag, value in (("--validation", args.validation), ("--unknown-rate", args.unknown_rate)):
        if not 0 <= value < 1:
            raise MoejaxError(f"{flag} must be in [0, 1) (got {value})")
    if not 0 < args.learning_rate < float("inf"):
        raise MoejaxError(f"--learning-rate must be a finite number > 0 (got {args.learning_rate})")
    if args.seed < 0:
        raise MoejaxError(f"--seed must be >= 0 (got {args.seed})")
    config = TrainingConfig(epochs=args.epochs, context=args.context, hidden=args.hidden, layers=args.layers,
                            causal=not args.bidirectional, batch_tokens=args.batch_tokens,
                            learning_rate=args.learning_rate, validation=args.validation, seed=args.seed,
                            unknown_rate=args.unknown_rate)
    untrained = args.kind in ("frequency", "token-table")
    given = [f"--{name.replace('_', '-')}" if name != "causal" else "--bidirectional"
             for name, value in dataclasses.asdict(config).items() if value != getattr(TrainingConfig(), name)]
    if untrained and given:
        raise MoejaxError(f"{', '.join(given)} set how sida and emoe predictors learn; --kind {args.kind} counts "
                          "routing instead: leave them out")
    summary = train_predictor(args.kind, args.traces, args.out, sequences=args.sequences, config=config,
                              overwrite=args.overwrite, show_progress=not args.quiet)
    last = summary.get("epochs", [{}])[-1] if summary.get("epochs") else {}
    best = max((e.get("validation_recall", 0.0) for e in summary.get("epochs", [])), default=None)
    print(f"wrote {args.out}: {args.kind} predictor" + (f", {plural(len(summary['epochs']), 'epoch')}, loss {last['loss']}"
                                                       if last else "")
          + (f", best validation top-k recall {best:.3f}" if best else ""))
    return 0


COMMANDS = {
    "train-predictor": cmd_train_predictor,
    "convert": cmd_convert, "export": cmd_export, "info": cmd_info, "generate": cmd_generate, "trace": cmd_trace, "lab": cmd_lab,
    "serve": cmd_serve,
}


class _NoteHandler(logging.Handler):
    """Prints the library's log records (warnings: notes for the user) as 'moejax: note: ...' on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"moejax: note: {record.getMessage()}", file=sys.stderr)


@contextlib.contextmanager
def notes_on_stderr() -> Iterator[None]:
    """While the command runs, the library's notes go to stderr as 'moejax: note: ...' lines, and only
    there (not also through a handler some dependency put on the root logger)."""
    logger = logging.getLogger("moejax")
    handler = _NoteHandler(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with stop_like_ctrl_c():  # SIGTERM and SIGHUP clean up as Ctrl-C does
            args = build_parser().parse_args(argv)
            with notes_on_stderr():
                return COMMANDS[args.command](args)
    except MoejaxError as err:
        print(f"moejax: error: {err.render(FLAGS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print("moejax: interrupted" if signum == signal.SIGINT else f"moejax: stopped by {stop}", file=sys.stderr)
        return 128 + signum


def run() -> None:
    """The `moejax` command: `main`, then exit with its status. A command stopped by a signal has cleaned up by
    then, and leaves without the interpreter's finalization, during which work still running in XLA's threads
    (a training step dispatched before the signal) could crash the process (exit 139 instead of 128 + signal)."""
    status = main()
    if status >= 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
