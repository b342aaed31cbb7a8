"""Quality of the shipped small MoE (or any moejax checkpoint trained by train_small_moe.py), on CPU.

    PYTHONPATH=. python3 scripts/eval_small_moe.py [CKPT] --corpus PATH [--corpus PATH ...] --tasks tasks.jsonl

Measures, and prints as Markdown tables:
1. held-out perplexity and bits per byte on the test split of each corpus path (documents the
   training script never saw: the split is by checksum, moejax.train.corpus);
2. sample generations, greedy and sampled with a seed, through `moejax.load` (the inference path);
3. expert usage per task of tasks.jsonl: for every MoE layer, the share of each task's routing
   choices (top-k, prompt tokens) that goes to each expert, and the Jensen-Shannon divergence
   between tasks against the divergence between two halves of the same task's prompts. Routing
   that depends on the task shows as between-task divergence well above the within-task one.
   Different tasks use different tokens, so even random routers separate tasks somewhat: the same
   statistics for a randomly initialised model of the same shape are the baseline to beat.
Writes everything as JSON (default: CKPT.eval.json beside the checkpoint).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import moejax
from moejax import checkpoint
from moejax.config import ModelConfig
from moejax.errors import MoejaxError
from moejax.models.decoder import empty_kv_caches, forward_with_router_logits, init_params
from moejax.progress import Progress
from moejax.engine.slots import SamplingParams
from moejax.train.corpus import pack, read_documents, split_documents, windows

SAMPLE_PROMPTS = [
    "The history of",
    "In 1998, the band released",
    "def fibonacci(n):",
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
    "Translate English to French:\nThe weather is nice today.\nFrench:",
]
BATCH = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", default=moejax.SHIPPED_CHECKPOINT)
    p.add_argument("--corpus", action="append", required=True, help="corpus paths as given to training; repeatable")
    p.add_argument("--tasks", required=True, type=Path, help="JSON lines with 'task' and 'prompt' (e.g. tasks.jsonl)")
    p.add_argument("--ppl-tokens", type=int, default=12288, help="held-out tokens scored per corpus path (at most)")
    p.add_argument("--prompts-per-task", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=40, help="tokens generated per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="output JSON (default: CKPT.eval.json)")
    return p.parse_args(argv)


@functools.partial(jax.jit, static_argnames=("cfg",))
def score(cfg: ModelConfig, params, tokens, valid):
    """tokens [B, T + 1]; valid [B, T + 1] bool. -> (summed target NLL in nats [B], top-k ids [moe_layers, B * T, k]).

    A target counts when it and its input are valid; routing is of the inputs [:, :-1].
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, length = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    logits, _, router_logits = forward_with_router_logits(cfg, *params, inputs, empty_kv_caches(cfg, batch, length), positions)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    nll = jnp.sum(jnp.where(valid[:, 1:] & valid[:, :-1], nll, 0.0), axis=-1)
    ids = jnp.stack([jax.lax.top_k(r.astype(jnp.float32), cfg.top_k)[1] for r in router_logits])
    return nll, ids


def hf_tokenizer(ckpt: Path):
    """The checkpoint's `tokenizers.Tokenizer` (batch encoding for packing held-out text)."""
    from tokenizers import Tokenizer

    path = ckpt / "tokenizer.json"
    if not path.is_file():
        raise MoejaxError(f"{ckpt}: has no tokenizer.json")
    return Tokenizer.from_file(str(path))


def load_params(ckpt: Path, cfg: ModelConfig):
    globals_ = checkpoint.load_globals(ckpt)
    layers = [checkpoint.load_layer(ckpt, i) for i in range(cfg.num_layers)]
    experts = [checkpoint.load_stacked_experts(ckpt, cfg, i) if cfg.moe_layers[i] else None for i in range(cfg.num_layers)]
    return jax.device_put((globals_, layers, experts))


def held_out_perplexity(cfg, params, tokenizer, corpus_path: str, max_tokens: int, length: int) -> dict:
    """Perplexity and bits per byte over (at most) max_tokens targets of the path's test split."""
    test_docs = split_documents(read_documents([corpus_path]))["test"]
    if not test_docs:
        return {"corpus": corpus_path, "documents": 0, "tokens": 0}
    bos, eos = cfg.bos_token_id, cfg.eos_token_ids[0]
    stream = pack(tokenizer, test_docs, bos, eos)
    chunks = windows(stream, length, max(1, max_tokens // length))
    total_nll, total_bytes = 0.0, 0
    for start in range(0, len(chunks), BATCH):
        batch = chunks[start : start + BATCH]
        padded = np.zeros((BATCH, length + 1), np.int32)
        padded[: len(batch)] = batch
        valid = np.zeros((BATCH, length + 1), bool)
        valid[: len(batch)] = True
        nll, _ = score(cfg, params, padded, valid)
        total_nll += float(np.asarray(nll).sum())
        total_bytes += sum(len(tokenizer.decode(w[1:].tolist()).encode()) for w in batch)
    tokens = len(chunks) * length
    return {
        "corpus": corpus_path,
        "documents": len(test_docs),
        "tokens": tokens,
        "cross_entropy": total_nll / tokens,
        "perplexity": math.exp(total_nll / tokens),
        "bits_per_byte": total_nll / math.log(2) / total_bytes,
    }


def task_prompts(path: str, per_task: int) -> dict[str, list[str]]:
    prompts: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise MoejaxError(f"--tasks {path}: cannot read ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            task, prompt = record["task"], record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MoejaxError(f"{path}:{number}: expected a JSON object with 'task' and 'prompt'") from None
        if len(prompts.setdefault(task, [])) < per_task:
            prompts[task].append(prompt)
    return prompts


def routing_counts(cfg, params, tokenizer, prompts: list[str]) -> np.ndarray:
    """Routing choices per prompt: [prompts, moe_layers, E] counts over each prompt's tokens."""
    limit = cfg.max_position_embeddings
    encoded = [tokenizer.encode(p).ids[:limit] for p in prompts]
    moe_layers = sum(cfg.moe_layers)
    counts = np.zeros((len(encoded), moe_layers, cfg.num_experts), np.int64)
    for start in range(0, len(encoded), BATCH):
        group = encoded[start : start + BATCH]
        length = min(limit, 128 * math.ceil(max(len(ids) for ids in group) / 128))
        tokens = np.zeros((BATCH, length + 1), np.int32)
        valid = np.zeros((BATCH, length + 1), bool)
        for row, ids in enumerate(group):
            tokens[row, : len(ids)] = ids
            valid[row, : len(ids)] = True
        _, ids = score(cfg, params, tokens, valid)
        ids = np.asarray(ids).reshape(moe_layers, BATCH, length, cfg.top_k)
        for row, prompt_ids in enumerate(group):
            chosen = ids[:, row, : len(prompt_ids)]  # [moe_layers, len, k]
            for layer in range(moe_layers):
                counts[start + row, layer] = np.bincount(chosen[layer].ravel(), minlength=cfg.num_experts)
    return counts


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two distributions over the last axis (0 to 1)."""
    m = (p + q) / 2

    def kl(a, b):
        nonzero = a > 0
        return float(np.sum(a[nonzero] * np.log2(a[nonzero] / b[nonzero])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def shares(counts: np.ndarray) -> np.ndarray:
    """[..., moe_layers, E] counts summed over leading prompts -> per-layer shares [moe_layers, E]."""
    total = counts.reshape(-1, *counts.shape[-2:]).sum(axis=0).astype(np.float64)
    return total / total.sum(axis=-1, keepdims=True)


def mean_layer_js(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([js_divergence(x, y) for x, y in zip(a, b)]))


def expert_usage(counts_by_task: dict[str, np.ndarray], top_k: int) -> dict:
    """Per-task shares, between-task and within-task (halves) divergences, averaged over layers."""
    task_shares = {task: shares(c) for task, c in counts_by_task.items()}
    tasks = sorted(task_shares)
    between = {f"{a}|{b}": mean_layer_js(task_shares[a], task_shares[b]) for a, b in itertools.combinations(tasks, 2)}
    within = {task: mean_layer_js(shares(c[0::2]), shares(c[1::2])) for task, c in counts_by_task.items()}
    return {
        "shares": {task: s.tolist() for task, s in task_shares.items()},
        "tokens": {task: int(c[:, 0].sum()) // top_k for task, c in counts_by_task.items()},
        "js_between_tasks": between,
        "js_within_task_halves": within,
        "mean_js_between": float(np.mean(list(between.values()))),
        "mean_js_within": float(np.mean(list(within.values()))),
    }


def sample_generations(ckpt: Path, new_tokens: int, seed: int) -> list[dict]:
    engine = moejax.load(ckpt)
    greedy = engine.generate(SAMPLE_PROMPTS, max_new_tokens=new_tokens)
    sampled = engine.generate(
        SAMPLE_PROMPTS, max_new_tokens=new_tokens, seed=seed, sampling=SamplingParams(greedy=False, temperature=0.8, top_p=0.95)
    )
    return [
        {"prompt": p, "greedy": g, "sampled": s, "sampling": {"temperature": 0.8, "top_p": 0.95, "seed": seed}}
        for p, g, s in zip(SAMPLE_PROMPTS, greedy.text, sampled.text)
    ]


def print_report(result: dict, cfg: ModelConfig) -> None:
    out = sys.stdout
    out.write("\n## Held-out perplexity (test split)\n\n| corpus | documents | tokens | perplexity | bits/byte |\n|---|---|---|---|---|\n")
    for row in result["perplexity"]:
        if row["tokens"]:
            out.write(f"| {row['corpus']} | {row['documents']} | {row['tokens']} | {row['perplexity']:.2f} | {row['bits_per_byte']:.3f} |\n")
        else:
            out.write(f"| {row['corpus']} | 0 | 0 | - | - |\n")
    out.write("\n## Samples (greedy, then sampled T=0.8 top-p 0.95)\n\n")
    for s in result["samples"]:
        out.write(f"- {s['prompt']!r}\n  - greedy: {s['greedy']!r}\n  - sampled: {s['sampled']!r}\n")
    usage = result["expert_usage"]
    k = cfg.top_k
    out.write(f"\n## Expert usage per task ({cfg.num_experts} experts, top-{k}; top-3 experts and their share of the "
              "layer's routing choices)\n\n")
    layers = sorted({0, len(cfg.moe_layer_ids) // 2, len(cfg.moe_layer_ids) - 1})
    out.write("| task | tokens | " + " | ".join(f"MoE layer {layer}" for layer in layers) + " | JS within (halves) |\n")
    out.write("|---|---|" + "---|" * len(layers) + "---|\n")
    for task, task_shares in sorted(usage["shares"].items()):
        cells = []
        for layer in layers:
            row = np.asarray(task_shares[layer])
            top = np.argsort(-row)[:3]
            cells.append(" ".join(f"e{e}:{row[e]:.0%}" for e in top))
        out.write(f"| {task} | {usage['tokens'][task]} | " + " | ".join(cells) + f" | {usage['js_within_task_halves'][task]:.4f} |\n")
    tasks = sorted(usage["shares"])
    out.write("\nJensen-Shannon divergence between tasks (bits, mean over layers):\n\n| | " + " | ".join(tasks) + " |\n")
    out.write("|---|" + "---|" * len(tasks) + "\n")
    for a in tasks:
        cells = []
        for b in tasks:
            key = f"{a}|{b}" if f"{a}|{b}" in usage["js_between_tasks"] else f"{b}|{a}"
            cells.append("-" if a == b else f"{usage['js_between_tasks'][key]:.4f}")
        out.write(f"| {a} | " + " | ".join(cells) + " |\n")
    out.write(f"\nmean JS between tasks {usage['mean_js_between']:.4f} bits vs within a task (two halves of its prompts) "
              f"{usage['mean_js_within']:.4f} bits: ratio {usage['mean_js_between'] / max(usage['mean_js_within'], 1e-12):.1f}x\n")
    base = result["expert_usage_random_init"]
    out.write(f"randomly initialised model of the same shape: between {base['mean_js_between']:.4f} bits, within "
              f"{base['mean_js_within']:.4f} bits: ratio {base['mean_js_between'] / max(base['mean_js_within'], 1e-12):.1f}x\n")


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    cfg = checkpoint.load_config(args.checkpoint)
    if not cfg.moe_layer_ids or cfg.bos_token_id is None or not cfg.eos_token_ids:
        raise MoejaxError(f"{args.checkpoint}: expected an MoE model with BOS and EOS tokens (as train_small_moe.py writes)")
    tokenizer = hf_tokenizer(args.checkpoint)
    params = load_params(args.checkpoint, cfg)
    length = cfg.max_position_embeddings - 1
    corpus = args.corpus
    prompts = task_prompts(args.tasks, args.prompts_per_task)
    progress = Progress("eval", len(corpus) + len(prompts) + 1, stream=sys.stderr)

    perplexity = []
    for path in corpus:
        perplexity.append(held_out_perplexity(cfg, params, tokenizer, path, args.ppl_tokens, length))
        progress.advance(1, note=f"perplexity {path}")
    random_params = jax.device_put(init_params(cfg, jax.random.PRNGKey(args.seed)))
    counts, random_counts = {}, {}
    for task, task_list in prompts.items():
        counts[task] = routing_counts(cfg, params, tokenizer, task_list)
        random_counts[task] = routing_counts(cfg, random_params, tokenizer, task_list)
        progress.advance(1, note=f"routing {task}")
    samples = sample_generations(args.checkpoint, args.new_tokens, args.seed)
    progress.advance(1, note="samples")
    progress.close()

    result = {
        "checkpoint": str(args.checkpoint),
        "config": cfg.to_json(),
        "perplexity": perplexity,
        "samples": samples,
        "expert_usage": expert_usage(counts, cfg.top_k),
        "expert_usage_random_init": {
            k: v for k, v in expert_usage(random_counts, cfg.top_k).items() if k.startswith("mean_js")
        },
        "prompts_per_task": args.prompts_per_task,
        "seconds": time.perf_counter() - start,
    }
    print_report(result, cfg)
    out = args.json or args.checkpoint.with_name(args.checkpoint.name + ".eval.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out} ({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoejaxError as err:
        print(f"eval_small_moe: error: {err}", file=sys.stderr)
        sys.exit(2)
