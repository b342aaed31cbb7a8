"""Peer: HuggingFace transformers (+ accelerate offloading) on a random Mixtral-shaped model.

Run by the benchmark scripts in a process of its own (torch and JAX must not share the GPU):

  resident: all weights on the GPU; times `generate()` with the default (fused) experts, with
            `experts_implementation="eager"`, and a plain forward loop with a KV cache.
  offload:  the experts of the last (1 - fraction) of the layers on the CPU, moved to the GPU at
            every forward by accelerate's hooks (`dispatch_model` with a device map); the rest
            of the model on the GPU. This is how transformers users run a model that does not fit.

Writes one JSON object to --out. Times are medians in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch
import transformers as T


def mixtral_config(layers: int) -> T.MixtralConfig:
    return T.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
        max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        sliding_window=None, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def fill_random(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random weights fast: each tensor is a window of one random pool, scaled (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(64 * 2**20, generator=gen, dtype=torch.float32).to(torch.bfloat16) * std
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.data.view(-1)
            if name.endswith("norm.weight"):
                flat.fill_(1.0)
                continue
            offset = int(torch.randint(0, pool.numel() // 2, (1,), generator=gen))
            for start in range(0, flat.numel(), pool.numel() // 2):
                n = min(pool.numel() // 2, flat.numel() - start)
                flat[start : start + n].copy_(pool[offset : offset + n].to(device=flat.device))


def time_generate(model, prompt, new_tokens: int, repeats: int) -> dict:
    """TTFT from generate(max_new_tokens=1); TPOT from the rest of a full generate."""
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(new_tokens)  # warm-up
    ttft = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new_tokens) for _ in range(repeats))
    return {"ttft_s": ttft, "tpot_s": (total - ttft) / (new_tokens - 1), "total_s": total}


class TokenClock:
    """A generate() streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def time_generate_once(model, prompt, new_tokens: int) -> dict:
    """One generate() call, TTFT and TPOT from per-token timestamps (for runs of seconds per token)."""
    clock = TokenClock()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       eos_token_id=None, streamer=clock)
    tokens = clock.times[1:]
    return {
        "ttft_s": tokens[0] - start,
        "tpot_s": statistics.median(b - a for a, b in zip(tokens, tokens[1:])),
        "total_s": tokens[-1] - start,
    }


def time_forward_loop(model, prompt, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding with a plain forward loop and a DynamicCache (no generate() overhead)."""

    def run():
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            cache = T.DynamicCache(config=model.config)
            out = model(prompt, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            ttft = time.perf_counter() - start
            for _ in range(new_tokens - 1):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        return ttft, time.perf_counter() - start

    run()
    runs = [run() for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    return {"ttft_s": ttft, "tpot_s": (total - ttft) / (new_tokens - 1), "total_s": total}


def resident(args) -> dict:
    cfg = mixtral_config(args.layers)
    with torch.device("cuda"):
        model = T.MixtralForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    fill_random(model)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device="cuda")
    results = {}
    for name, impl in (("generate_default", None), ("generate_eager_experts", "eager")):
        try:
            if impl:
                model.set_experts_implementation(impl)
            results[name] = time_generate(model, prompt, args.new_tokens, args.repeats)
        except Exception as err:  # a peer variant failing must not lose the others
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    results["forward_loop_eager_experts"] = time_forward_loop(model, prompt, args.new_tokens, args.repeats)
    return results


def offload(args) -> dict:
    import accelerate

    cfg = mixtral_config(args.layers)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with torch.device("cpu"), no_init_weights():
        model = T.MixtralForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    fill_random(model)
    fraction = float(args.gpu_expert_fraction)
    gpu_layers = round(fraction * args.layers)
    device_map = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    for i in range(args.layers):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate"):
            device_map[f"model.layers.{i}.{part}"] = 0
        device_map[f"model.layers.{i}.mlp.experts"] = 0 if i < gpu_layers else "cpu"
    model = accelerate.dispatch_model(model, device_map=device_map, main_device=0)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device="cuda")
    timing = time_generate_once(model, prompt, args.new_tokens)
    expert_bytes = 3 * cfg.hidden_size * cfg.intermediate_size * 2
    return {
        "gpu_expert_layers": gpu_layers,
        "gpu_expert_bytes": gpu_layers * cfg.num_local_experts * expert_bytes,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(),
        **timing,
    }


def offload_each_fraction(args) -> dict:
    """One fresh process per fraction (the CPU model is rebuilt: accelerate's hooks are not undone cleanly)."""
    results = {}
    for fraction in args.gpu_expert_fraction.split(","):
        out = f"{args.out}.{fraction}"
        cmd = [sys.executable, __file__, "--mode", "offload", "--layers", str(args.layers), "--prompt-len",
               str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--gpu-expert-fraction", fraction, "--out", out]
        try:
            subprocess.run(cmd, check=True, timeout=600)
            with open(out) as f:
                results[fraction] = json.load(f)
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError) as err:
            results[fraction] = {"error": f"{type(err).__name__}: {err}"}
        print(fraction, results[fraction], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("resident", "offload"), required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-expert-fraction", default="0.25", help="offload: one fraction, or several comma-separated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.mode == "offload" and "," in args.gpu_expert_fraction:
        result = offload_each_fraction(args)
    else:
        result = resident(args) if args.mode == "resident" else offload(args)
    result.update(versions={"torch": torch.__version__, "transformers": T.__version__}, wall_s=time.perf_counter() - start)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
