"""What compact expert formats cost in accuracy (issue 24), on the CPU (the numbers do not depend on the machine).

1. perplexity: the shipped model (or CKPT) on the held-out test split of --corpus (documents the training never
   saw: `moejax.train.corpus`), --windows windows of --length tokens, each prefilled alone through the engine
   (`moejax.load(expert_format=...)`, `predictors.approximate.perplexity`), per format; the change against the
   checkpoint's own format.
2. mixtral: random Mixtral-8x7B-shaped weights (full widths, --layers layers of --experts experts, top-2, bf16,
   normal(0, 0.02) as the benchmarks draw them), one random prompt of --prompt-len tokens: each format's last-position logits against
   bf16's (max |diff| over the logits' range, relative L2 error, same argmax) and the final hidden state's
   relative L2 error.

  PYTHONPATH=. python scripts/eval_expert_formats.py --corpus '../shared/data/corpus/*.txt' --out formats.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import moejax
from moejax.engine.loading import build_engine
from moejax.offload.config import OffloadConfig
from moejax.offload.expert_format import ExpertFormat
from moejax.predictors.approximate import perplexity
from moejax.train.corpus import pack, read_documents, split_documents, windows
from scripts.benchlib import model_config, random_dense_params, random_expert_stacks, write_json

FORMATS = ("bf16", "int8", "int4")


def perplexity_part(ckpt, corpus: list[str], length: int, count: int) -> dict:
    cfg = moejax.load(ckpt, slots=1, max_seq_len=length + 1).cfg
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))  # batch encoding, as training packed the text
    docs = split_documents(read_documents(corpus))["test"]
    stream = pack(tokenizer, docs, cfg.bos_token_id, cfg.eos_token_ids[0])
    texts = [w.tolist() for w in windows(stream, length, count)]
    rows = []
    for fmt in FORMATS:
        start = time.monotonic()
        engine = moejax.load(ckpt, slots=1, max_seq_len=length + 2, prefill_chunk=length + 1, expert_format=fmt)
        rows.append({"format": fmt, "perplexity": perplexity(engine, texts), "expert_bytes": engine.expert_bytes,
                     "seconds": time.monotonic() - start})
        print(json.dumps(rows[-1]), flush=True)
    exact = rows[0]["perplexity"]
    for row in rows:
        row["change"] = row["perplexity"] / exact - 1
    return {"documents": len(docs), "windows": len(texts), "tokens": len(texts) * length, "rows": rows}


def mixtral_part(layers: int, experts: int, prompt_len: int) -> dict:
    cfg = model_config("mixtral-8x7b", layers, tiny=False).replace(num_experts=experts)
    dense = random_dense_params(cfg)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len).tolist()
    results = {}
    for fmt in FORMATS:
        start = time.monotonic()
        expert_format = ExpertFormat(fmt, cfg.dtype)
        # quantized with JAX, layer by layer (NumPy's float32 copies of a Mixtral layer would not fit beside it)
        stacks = (expert_format.convert(stack, "random experts", jnp) if expert_format.approximate else stack
                  for stack in random_expert_stacks(cfg))
        engine = build_engine(cfg, *dense, stacks, OffloadConfig("resident"), slots=1, max_seq_len=prompt_len + 1,
                              prefill_chunk=2, expert_format=expert_format)
        results[fmt] = np.asarray(engine.logits([prompt])[0][-1], np.float64)
        print(f"{fmt}: {time.monotonic() - start:.0f} s", flush=True)
        del engine
    ref = results["bf16"]
    rows = [{"format": fmt,
             "max_abs_over_range": float(np.abs(logits - ref).max() / (ref.max() - ref.min())),
             "relative_l2": float(np.linalg.norm(logits - ref) / np.linalg.norm(ref)),
             "same_argmax": bool(logits.argmax() == ref.argmax())} for fmt, logits in results.items()]
    return {"layers": layers, "prompt_len": prompt_len, "hidden": cfg.hidden_size,
            "expert_ffn": cfg.expert_intermediate_size, "experts": cfg.num_experts, "rows": rows}


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    print("| " + " | ".join(header for _, header, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(format(row[key], spec) for key, _, spec in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", nargs="?", type=Path, default=moejax.SHIPPED_CHECKPOINT)
    parser.add_argument("--corpus", action="append", required=True)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4,
                        help="experts per layer (Mixtral has 8; fewer keep the CPU run within a few GB, the widths are "
                             "what quantization sees)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--parts", default="perplexity,mixtral")
    parser.add_argument("--out", default="eval_expert_formats.json")
    args = parser.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0]), "group_size": 64}
    parts = args.parts.split(",")
    if "perplexity" in parts:
        result["perplexity"] = perplexity_part(args.checkpoint, args.corpus, args.length, args.windows)
        write_json(args.out, result)
    if "mixtral" in parts:
        result["mixtral"] = mixtral_part(args.layers, args.experts, args.prompt_len)
        write_json(args.out, result)
    if "perplexity" in result:
        p = result["perplexity"]
        print(f"\nperplexity, {p['windows']} windows of {args.length} tokens ({p['tokens']:,} tokens) of the test split")
        markdown_table(p["rows"], [("format", "format", "s"), ("expert_bytes", "bytes/expert", ","),
                                   ("perplexity", "perplexity", ".3f"), ("change", "change", "+.2%")])
    if "mixtral" in result:
        m = result["mixtral"]
        print(f"\nrandom Mixtral-8x7B-shaped weights, {m['layers']} layers of {m['experts']} experts, last-position "
              f"logits of a {m['prompt_len']}-token prompt")
        markdown_table(m["rows"], [("format", "format", "s"), ("max_abs_over_range", "max abs diff / logit range", ".2e"),
                                   ("relative_l2", "relative L2", ".2e"), ("same_argmax", "same argmax", "")])
    assert all(math.isfinite(r["perplexity"]) for r in result.get("perplexity", {}).get("rows", []))


if __name__ == "__main__":
    main()
