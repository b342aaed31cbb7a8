"""Trains the small Mixtral-style MoE shipped as moejax/assets/tiny-moe, with moejax's own model code.

    PYTHONPATH=. python3 scripts/train_small_moe.py --max-seconds 450 \\
        --corpus .data/corpus --corpus .data/prompts/tasks.jsonl --corpus .data/python-docs \\
        --checkpoint /tmp/tiny-moe --overwrite --artifacts "$OUT"

Steps: read the corpus (documents split train/valid/test by checksum, see moejax.train.corpus),
train a byte-level BPE tokenizer on the train split, pack token streams, train with AdamW on
cross-entropy + the router load-balancing loss until the time budget (or the epoch cap) is
spent, keep the weights with the best validation loss, save them as a moejax checkpoint
(bfloat16 by default) with the tokenizer, check its size, reload it with `moejax.load` and
generate a sample. With --artifacts DIR it also writes DIR/<name>.tar.gz (the checkpoint
directory) and DIR/<name>.train.json (configuration, data, loss and load-balance history).

--max-seconds bounds the whole run from start to end: tokenizer, compilation, training and
saving; the training loop stops --reserve-seconds before it to leave time for saving.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import moejax
from moejax.checkpoint import CHECKPOINT_OUTPUT, save_checkpoint
from moejax.config import ModelConfig
from moejax.errors import MoejaxError
from moejax.models.decoder import init_params, parameter_counts
from moejax.outputs import atomic_file, check_output
from moejax.progress import Progress
from moejax.train.bpe import BOS_ID, EOS_ID, train_bpe_tokenizer, write_tokenizer_files
from moejax.train.corpus import pack, read_documents, split_documents, windows
from moejax.train.objective import cast_params
from moejax.train.step import learning_rate, make_eval_step, make_optimizer, make_train_step

SAMPLE_PROMPT = "The history of"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--corpus", action="append", required=True,
                      help="file, directory or glob of text (.txt .rst .md .jsonl); repeatable")
    data.add_argument("--vocab-size", type=int, default=4096)
    model = p.add_argument_group("model (Mixtral family)")
    model.add_argument("--layers", type=int, default=8)
    model.add_argument("--experts", type=int, default=16)
    model.add_argument("--top-k", type=int, default=2)
    model.add_argument("--hidden", type=int, default=192)
    model.add_argument("--expert-ffn", type=int, default=64, help="intermediate size of one expert")
    model.add_argument("--heads", type=int, default=6)
    model.add_argument("--kv-heads", type=int, default=2)
    model.add_argument("--head-dim", type=int, default=32)
    model.add_argument("--seq-len", type=int, default=512, help="training window; also max_position_embeddings")
    model.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                       help="compute and checkpoint dtype (master weights are float32)")
    train = p.add_argument_group("training")
    train.add_argument("--max-seconds", type=float, default=450.0, help="wall-clock budget of the whole run")
    train.add_argument("--reserve-seconds", type=float, default=60.0, help="part of the budget kept for saving")
    train.add_argument("--max-epochs", type=float, default=16.0, help="stop after this many passes over the train tokens")
    train.add_argument("--batch", type=int, default=32, help="windows per step")
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    train.add_argument("--warmup-steps", type=int, default=200)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--aux-coef", type=float, default=0.01, help="weight of the load-balancing loss")
    train.add_argument("--eval-every", type=float, default=30.0, help="seconds between validation passes")
    train.add_argument("--eval-windows", type=int, default=64, help="validation windows per pass (at most)")
    train.add_argument("--log-every", type=float, default=15.0, help="seconds between progress lines")
    train.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--checkpoint", type=Path, default=moejax.SHIPPED_CHECKPOINT)
    out.add_argument("--overwrite", action="store_true", help="replace --checkpoint if it exists")
    out.add_argument("--max-mb", type=float, default=16.0, help="size limit of the checkpoint, in 10^6 bytes")
    out.add_argument("--artifacts", type=Path, help="also write <name>.tar.gz and <name>.train.json here")
    return p.parse_args(argv)


def model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        family="mixtral",
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_intermediate_size=args.expert_ffn,
        moe_layers=(True,) * args.layers,
        sliding_windows=(None,) * args.layers,
        rms_norm_eps=1e-5,
        max_position_embeddings=args.seq_len,
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
        dtype=args.dtype,
    )


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_tar(src_dir: Path, tar_path: Path) -> None:
    """A gzipped tar of src_dir (gzip mostly shrinks the headers and padding of its many small files)."""
    with atomic_file(tar_path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(src_dir, arcname=src_dir.name)


def load_stats(load: np.ndarray) -> dict:
    """Summary of routing shares [moe_layers, E]: the largest and smallest share of any expert, and
    how many (layer, expert) pairs get under a quarter of the uniform share."""
    uniform = 1.0 / load.shape[1]
    return {
        "max_share": float(load.max()),
        "min_share": float(load.min()),
        "starved_experts": int((load < uniform / 4).sum()),
        "uniform_share": uniform,
    }


def validation(eval_step, params, val_windows: np.ndarray, batch: int) -> dict:
    """Mean cross-entropy (nats/token), balance loss and load [moe_layers, E] over the validation windows."""
    ce, balance, load = [], [], []
    for start in range(0, len(val_windows), batch):
        chunk = jnp.asarray(val_windows[start : start + batch])
        c, b, l = eval_step(params, chunk)
        ce.append(float(c) * len(chunk))
        balance.append(float(b) * len(chunk))
        load.append(np.asarray(l) * len(chunk))
    n = len(val_windows)
    return {"cross_entropy": sum(ce) / n, "balance": sum(balance) / n, "load": sum(load) / n}


def log(message: str) -> None:
    print(message, flush=True)


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    deadline = start + args.max_seconds - args.reserve_seconds
    check_output(args.checkpoint, args.corpus, args.overwrite, CHECKPOINT_OUTPUT)
    log(f"devices: {jax.devices()}")

    docs = split_documents(read_documents(args.corpus))
    tokenizer = train_bpe_tokenizer([d.text for d in docs["train"]], args.vocab_size)
    streams = {name: pack(tokenizer, split_docs, BOS_ID, EOS_ID) for name, split_docs in docs.items()}
    data_stats = {
        name: {"documents": len(docs[name]), "tokens": int(len(streams[name])), "characters": sum(len(d.text) for d in docs[name])}
        for name in docs
    }
    data_stats["sources"] = sorted({d.source for split_docs in docs.values() for d in split_docs})
    log(f"data: {json.dumps({k: v for k, v in data_stats.items() if k != 'sources'})} from {len(data_stats['sources'])} files "
        f"({time.perf_counter() - start:.0f}s)")
    for split in ("train", "valid"):
        if len(streams[split]) <= args.seq_len + 1:
            raise MoejaxError(f"the {split} split has {len(streams[split])} tokens, fewer than one window of "
                              f"{args.seq_len + 1}: give more text (--corpus) or a smaller --seq-len")
    val_windows = windows(streams["valid"], args.seq_len, args.eval_windows)

    cfg = model_config(args, tokenizer.get_vocab_size())
    counts = parameter_counts(cfg)
    limit = int(args.max_mb * 1e6)
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_files(tokenizer, Path(tok_dir), args.seq_len)
        tokenizer_bytes = directory_bytes(Path(tok_dir))
        estimate = counts["total"] * cfg.dtype_bytes + tokenizer_bytes
        log(f"model: {cfg.num_layers} layers x {cfg.num_experts} experts (top-{cfg.top_k}), hidden {cfg.hidden_size}, "
            f"expert FFN {cfg.expert_intermediate_size}, vocab {cfg.vocab_size}; {counts['total']:,} parameters "
            f"({counts['active_per_token']:,} active per token); weights + tokenizer {estimate / 1e6:.2f} MB "
            f"uncompressed (limit {args.max_mb} MB)")
        if estimate > limit:
            raise MoejaxError(f"the model needs {estimate / 1e6:.2f} MB before compression, over --max-mb {args.max_mb}")

        history, validations, best, final_stats = train(args, cfg, streams, val_windows, deadline)

        globals_, layers, experts = cast_params(best["params"], jnp.float32)
        save_checkpoint(args.checkpoint, cfg, globals_, layers, experts, tokenizer_dir=Path(tok_dir), overwrite=args.overwrite)
    size = directory_bytes(args.checkpoint)
    log(f"checkpoint: {args.checkpoint} ({size / 1e6:.2f} MB in {sum(1 for _ in args.checkpoint.rglob('*'))} entries, "
        f"limit {args.max_mb} MB); best validation at step {best['step']}")
    if size > limit:
        raise MoejaxError(f"{args.checkpoint}: {size / 1e6:.2f} MB is over --max-mb {args.max_mb}")

    engine = moejax.load(args.checkpoint)
    room = cfg.max_position_embeddings - len(engine.encode(SAMPLE_PROMPT)[0])
    sample = engine.generate(SAMPLE_PROMPT, max_new_tokens=max(1, min(32, room)))
    log(f"sample (greedy): {SAMPLE_PROMPT}{sample.text[0]}")

    if args.artifacts:
        args.artifacts.mkdir(parents=True, exist_ok=True)
        name = args.checkpoint.name
        write_tar(args.checkpoint, args.artifacts / f"{name}.tar.gz")
        record = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": str(jax.devices()[0]),
            "jax_version": jax.__version__,
            "config": cfg.to_json(),
            "parameters": counts,
            "data": data_stats,
            "history": history,
            "validation": validations,
            "best_step": best["step"],
            "final": final_stats,
            "checkpoint_bytes": size,
            "sample": {"prompt": SAMPLE_PROMPT, "greedy_text": sample.text[0]},
            "total_seconds": time.perf_counter() - start,
        }
        with atomic_file(args.artifacts / f"{name}.train.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        log(f"artifacts: {args.artifacts / (name + '.tar.gz')}, {args.artifacts / (name + '.train.json')}")
    log(f"done in {time.perf_counter() - start:.0f}s")
    return 0


def train(args, cfg: ModelConfig, streams: dict, val_windows: np.ndarray, deadline: float):
    """The training loop. Returns (history, validations, best (step, cross_entropy, params), final stats)."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(args.seed))
    params = init_params(cfg.replace(dtype="float32"), init_key)
    optimizer = make_optimizer(args.weight_decay)
    opt_state = optimizer.init(params)
    train_step = make_train_step(cfg, optimizer, args.batch, args.seq_len, args.aux_coef)
    eval_step = make_eval_step(cfg)
    stream = jnp.asarray(streams["train"])
    tokens_per_step = args.batch * args.seq_len
    token_budget = args.max_epochs * len(streams["train"])

    train_start = time.perf_counter()
    budget = max(deadline - train_start, 1e-3)
    progress = Progress("train", budget, unit="s", interval=0.0, stream=sys.stdout)
    history, validations = [], []
    best = {"cross_entropy": float("inf"), "step": -1, "params": None}
    step, last_time, last_tokens, last_eval = 0, train_start, 0, train_start
    compile_seconds = None
    while True:
        now = time.perf_counter()
        fraction = max((now - train_start) / budget, step * tokens_per_step / token_budget)
        lr = learning_rate(step, fraction, args.lr, args.warmup_steps)
        params, opt_state, metrics = train_step(params, opt_state, stream, data_key, step, lr)
        loss = float(metrics["loss"])  # also waits for the step, so the clock reads device time
        if not np.isfinite(loss):
            raise MoejaxError(f"training diverged at step {step} (loss {loss}); lower --lr")
        step += 1
        now = time.perf_counter()
        if compile_seconds is None:
            compile_seconds = now - train_start
            log(f"first step (compile + run): {compile_seconds:.1f}s")
            last_time, last_eval, last_tokens = now, now, step * tokens_per_step
        done = now >= deadline or step * tokens_per_step >= token_budget
        if now - last_time >= args.log_every or done:
            tokens = step * tokens_per_step
            record = {
                "step": step,
                "seconds": now - train_start,
                "tokens": tokens,
                "epochs": tokens / len(streams["train"]),
                "lr": lr,
                "loss": loss,
                "cross_entropy": float(metrics["cross_entropy"]),
                "balance": float(metrics["balance"]),
                "grad_norm": float(metrics["grad_norm"]),
                "tokens_per_s": (tokens - last_tokens) / (now - last_time) if now > last_time else 0.0,
                **load_stats(np.asarray(metrics["load"])),
            }
            history.append(record)
            progress.advance(
                now - train_start - progress.done,
                note=f"step {step} ep {record['epochs']:.1f} loss {loss:.3f} ce {record['cross_entropy']:.3f} "
                f"lb {record['balance']:.3f} {record['tokens_per_s'] / 1e3:.0f}k tok/s lr {lr:.2e} "
                f"share max {record['max_share']:.1%} min {record['min_share']:.1%}",
            )
            last_time, last_tokens = now, tokens
        if now - last_eval >= args.eval_every or done:
            val = validation(eval_step, params, val_windows, args.batch)
            validations.append({"step": step, "cross_entropy": val["cross_entropy"], "perplexity": float(np.exp(val["cross_entropy"])),
                                "balance": val["balance"], **load_stats(val["load"])})
            is_best = val["cross_entropy"] < best["cross_entropy"]
            if is_best:
                best = {"cross_entropy": val["cross_entropy"], "step": step, "params": jax.tree_util.tree_map(jnp.copy, params)}
            log(f"validation step {step}: cross-entropy {val['cross_entropy']:.3f} (perplexity {np.exp(val['cross_entropy']):.1f})"
                f", balance {val['balance']:.3f}{' (best)' if is_best else ''}")
            last_eval = time.perf_counter()
            if done:
                final = {"final_validation_load": val["load"].tolist(), "steps": step, "compile_seconds": compile_seconds,
                         "train_seconds": now - train_start, "best_validation_cross_entropy": best["cross_entropy"]}
                progress.close()
                return history, validations, best, final


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoejaxError as err:
        print(f"train_small_moe: error: {err}", file=sys.stderr)
        sys.exit(2)
