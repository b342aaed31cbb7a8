"""Peer: HuggingFace transformers (+ accelerate offloading) on a random model of a moejax card's shape.

--card NAME[:layers] (default mixtral-8x7b, --layers 8 of it): the transformers config is the one `moejax export`
writes for the card (`moejax.convert.export.hf_config`: the family's own mapping), built with
`AutoConfig.for_model`; --dims tiny shrinks every width as the benchmarks' CPU smoke runs do. Weights are random
(`fill_random`), not the engine's: the benchmarks compare speed on the same shapes (the parity tests check that
both compute the same outputs on the same weights). Token ids are dropped from the config (random weights;
generate() is told pad 0 and no EOS). On the GPU when there is one, else on the CPU (smoke runs).

Run by the benchmark scripts in a process of its own (torch and JAX must not share the GPU):

  resident: all weights on the GPU; times `generate()` with the default (fused) experts, with
            `experts_implementation="eager"`, and a plain forward loop with a KV cache.
  offload:  the routed experts of the last (1 - fraction) of the MoE layers on the CPU, moved to the GPU at
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

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # moejax reads the card: JAX must never take the GPU from torch

import torch  # noqa: E402
import transformers as T  # noqa: E402

from moejax.convert.export import hf_config  # noqa: E402
from scripts.benchlib import model_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def card_config(card: str, layers: int | None, tiny: bool = False):
    """(moejax ModelConfig, transformers config) of `card`'s first `layers` layers (None: all), as the benchmarks
    make it (`benchlib.model_config`; tiny: widths shrunk, at most 3 layers); the transformers config is the card's
    `moejax export` config.json without token ids."""
    cfg = model_config(card, layers, tiny)
    fields = hf_config(cfg)
    fields.pop("architectures", None)
    fields.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return cfg, T.AutoConfig.for_model(fields.pop("model_type"), **fields)


def parse_card(text: str, layers: int | None) -> tuple[str, int | None]:
    """'name[:layers]' -> (name, layers); --layers, where given, wins."""
    name, _, count = text.partition(":")
    if count and not count.isdigit():
        raise SystemExit(f"--card: '{text}' is not name or name:layers")
    return name, layers if layers is not None else (int(count) if count else None)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


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
    """TTFT from generate(max_new_tokens=1); TPOT, the median gap between consecutive new tokens of full
    generate() calls (timestamps taken inside each call, so a noisy run cannot make it negative, as the
    difference of two separately timed calls could)."""
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n, streamer=None):
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **kwargs)
        synchronize()
        return time.perf_counter() - start

    run(new_tokens)  # warm-up
    ttft = statistics.median(run(1) for _ in range(repeats))
    totals, gaps = [], []
    for _ in range(repeats):
        clock = TokenClock()
        totals.append(run(new_tokens, clock))
        tokens = clock.times[1:]
        gaps += [b - a for a, b in zip(tokens, tokens[1:])]
    return {"ttft_s": ttft, "tpot_s": statistics.median(gaps), "total_s": statistics.median(totals)}


class TokenClock:
    """A generate() streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def time_generate_once(model, prompt, new_tokens: int) -> dict:
    """One generate() call, TTFT and TPOT from per-token timestamps (for runs of seconds per token)."""
    clock = TokenClock()
    synchronize()
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
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            cache = T.DynamicCache(config=model.config)
            out = model(prompt, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            synchronize()
            ttft = time.perf_counter() - start
            for _ in range(new_tokens - 1):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            synchronize()
        return ttft, time.perf_counter() - start

    run()
    runs = [run() for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    return {"ttft_s": ttft, "tpot_s": (total - ttft) / (new_tokens - 1), "total_s": total}


def build_model(args, device: str) -> tuple:
    """(moejax config, transformers model with random bf16 weights on `device`) of --card."""
    cfg, hf = card_config(*parse_card(args.card, args.layers), tiny=args.dims == "tiny")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with torch.device(device), no_init_weights():
        model = T.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16).eval()
    fill_random(model)
    return cfg, model


def resident(args) -> dict:
    cfg, model = build_model(args, DEVICE)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=DEVICE)
    results = {"model_type": model.config.model_type, "layers": cfg.num_layers}
    for name, impl in (("generate_default", None), ("generate_eager_experts", "eager")):
        try:
            if impl:
                model.set_experts_implementation(impl)
            results[name] = time_generate(model, prompt, args.new_tokens, args.repeats)
        except Exception as err:  # a peer variant failing must not lose the others
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    results["forward_loop_eager_experts"] = time_forward_loop(model, prompt, args.new_tokens, args.repeats)
    return results


def offload_device_map(model, gpu_moe_layers: int) -> dict:
    """accelerate's device map: everything on GPU 0 but the routed experts (`mlp.experts`) of the MoE layers after
    the first `gpu_moe_layers`, which stay on the CPU (a dense layer, a shared expert and the router stay on the GPU)."""
    device_map = {f"model.{name}": 0 for name, _ in model.model.named_children() if name != "layers"}
    device_map["lm_head"] = 0
    moe_seen = 0
    for i, layer in enumerate(model.model.layers):
        for name, child in layer.named_children():
            experts = getattr(child, "experts", None) if name == "mlp" else None
            if experts is None:
                device_map[f"model.layers.{i}.{name}"] = 0
                continue
            for part, _ in child.named_children():
                device_map[f"model.layers.{i}.mlp.{part}"] = 0
            device_map[f"model.layers.{i}.mlp.experts"] = 0 if moe_seen < gpu_moe_layers else "cpu"
            moe_seen += 1
    return device_map


def offload(args) -> dict:
    import accelerate

    cfg, model = build_model(args, "cpu")
    gpu_layers = round(float(args.gpu_expert_fraction) * len(cfg.moe_layer_ids))
    device_map = offload_device_map(model, gpu_layers)
    gpu_expert_bytes = sum(p.nbytes for name, p in model.named_parameters()
                           if ".mlp.experts." in name and device_map[name.split(".mlp.experts.")[0] + ".mlp.experts"] == 0)
    model = accelerate.dispatch_model(model, device_map=device_map, main_device=0)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device="cuda")
    timing = time_generate_once(model, prompt, args.new_tokens)
    return {
        "model_type": model.config.model_type,
        "gpu_expert_layers": gpu_layers,
        "gpu_expert_bytes": gpu_expert_bytes,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(),
        **timing,
    }


def offload_each_fraction(args) -> dict:
    """One fresh process per fraction (the CPU model is rebuilt: accelerate's hooks are not undone cleanly)."""
    results = {}
    for fraction in args.gpu_expert_fraction.split(","):
        out = f"{args.out}.{fraction}"
        cmd = [sys.executable, __file__, "--mode", "offload", "--card", args.card, "--dims", args.dims, "--prompt-len",
               str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--gpu-expert-fraction", fraction, "--out", out]
        cmd += ["--layers", str(args.layers)] if args.layers is not None else []
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
    parser.add_argument("--card", default="mixtral-8x7b:8", help="a moejax card, name[:layers] (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=None, help="the card's first N layers (wins over name:layers)")
    parser.add_argument("--dims", default="card", choices=("card", "tiny"), help="tiny: every width shrunk (CPU smoke run)")
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
    result.update(card=args.card, device=DEVICE, versions={"torch": torch.__version__, "transformers": T.__version__},
                  wall_s=time.perf_counter() - start)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
