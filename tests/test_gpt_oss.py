"""gpt-oss beyond the zoo's parity tests (tests/test_decoder_reference.py runs its zoo configs against transformers):
experts with biases and the clamped SwiGLU in every expert compute against a naive loop, offloading bit for bit,
MXFP4 conversion against a dequantization written here, bad MXFP4 input, and `moejax info`.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from hf_zoo import COMMON, build, random_prompts

import moejax
from moejax import checkpoint
from moejax.cards import load_card
from moejax.cli import main
from moejax.convert.safetensors_file import read_header, read_tensor, write_file
from moejax.engine.decoder_programs import NO_WINDOW, layer_segments
from moejax.models.moe import (
    ClampedSwiGLU, capacity_experts, device_routed_experts, experts_from_slab, grouped_experts, ragged_experts, route,
)
from moejax.offload.device_cache import distinct_experts

CASE = ("gpt_oss", "alternating_window")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpt_oss")


def naive_gpt_oss_moe(x, logits, slab, top_k, alpha, limit):
    """Float64, one (row, expert) pair at a time, as gpt-oss defines its MoE: softmax over the top-k logits, and each
    expert's (clamp(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit), with every projection's bias."""
    x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
    w = {name: np.asarray(v, np.float64) for name, v in slab.items()}
    out = np.zeros(x.shape)
    for n in range(x.shape[0]):
        chosen = np.argsort(-logits[n], kind="stable")[:top_k]
        weights = np.exp(logits[n, chosen] - logits[n, chosen].max())
        for e, weight in zip(chosen, weights / weights.sum()):
            gate = np.minimum(x[n] @ w["gate"][e] + w["gate_bias"][e], limit)
            up = np.clip(x[n] @ w["up"][e] + w["up_bias"][e], -limit, limit)
            hidden = (up + 1) * gate / (1 + np.exp(-alpha * gate))
            out[n] += weight * (hidden @ w["down"][e] + w["down_bias"][e])
    return out


@pytest.mark.parametrize("rows,experts,top_k", [(6, 6, 3), (37, 8, 2)])
def test_every_expert_compute_with_biases_and_clamped_swiglu_equals_naive_loop(rows, experts, top_k):
    rng = np.random.default_rng(rows)
    dim, ffn = 16, 24
    shapes = {"gate": (dim, ffn), "up": (dim, ffn), "down": (ffn, dim), "gate_bias": (ffn,), "up_bias": (ffn,),
              "down_bias": (dim,)}
    slab = {name: jnp.asarray(rng.normal(size=(experts, *shape)) * 0.3, jnp.float32) for name, shape in shapes.items()}
    x = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(rows, experts)) * 2, jnp.float32)
    act = ClampedSwiGLU(alpha=1.3, limit=0.6)  # binds: the projections spread over about +-1.2
    weights, ids = route(logits, top_k, normalize=False, softmax_after_topk=True)
    expected = naive_gpt_oss_moe(x, logits, slab, top_k, act.alpha, act.limit)
    distinct = distinct_experts(ids, None, experts, min(ids.size, experts))
    slots = jnp.where(distinct < experts, distinct, -1)
    computes = {
        "union": functools.partial(experts_from_slab, x, ids, weights, distinct, slots, slab, act),
        "grouped": functools.partial(grouped_experts, x, ids, weights, distinct, slots, slab, act, block_rows=8),
        "ragged": functools.partial(ragged_experts, x, ids, weights, distinct, slots, slab, act),
        "capacity with room": functools.partial(capacity_experts, x, ids, weights, distinct, slots, slab, rows, act),
        "device-routed loop": functools.partial(device_routed_experts, x, ids, weights, slab, act),
    }
    for name, compute in computes.items():
        np.testing.assert_allclose(np.asarray(jax.jit(compute)()), expected, rtol=1e-5, atol=1e-5, err_msg=name)


@functools.lru_cache(maxsize=None)
def load(ckpt, mode="resident", **options):
    return moejax.load(ckpt, mode, **options)


def test_offloading_is_bit_identical_to_resident(root):
    """Experts carry their biases through the host stacks, the slab, the cache (smallest budget: one layer's experts,
    every layer evicts), the lookahead prefetch and on-demand fetches: the same logits, bit for bit, and (cached)
    the same tokens."""
    _, _, ckpt = build(CASE, root)
    resident = load(ckpt)
    cfg = resident.cfg
    prompts = random_prompts(cfg.vocab_size, [9, 3], seed=5)
    expected_logits = resident.logits(prompts)
    cached = load(ckpt, "cached", expert_budget=f"{cfg.num_experts * cfg.expert_bytes}B", prefetch="lookahead")
    for mode, engine in (("cached", cached), ("on-demand", load(ckpt, "on-demand"))):
        for ours, ref in zip(engine.logits(prompts), expected_logits, strict=True):
            np.testing.assert_array_equal(ours, ref, err_msg=mode)
    result = cached.generate(prompts, max_new_tokens=6)
    assert result.tokens == resident.generate(prompts, max_new_tokens=6).tokens
    assert result.stats["total"]["misses"] > 0 and result.stats["total"]["prefetch_issued"] > 0


def test_alternating_windows_share_one_layer_loop():
    """gpt-oss alternates sliding-window and full layers: the step programs still scan them in one loop, each
    layer's window a value of the scan (the reference tests check the outputs), so 24 layers compile one body."""
    (segment,) = layer_segments(load_card("gpt-oss-20b"))
    assert (segment.start, segment.count, segment.moe, segment.window) == (0, 24, True, None)
    assert segment.layer_windows().tolist() == [128, NO_WINDOW] * 12


def test_info_counts_the_expert_biases(root, capsys):
    model, _, ckpt = build(CASE, root)
    capsys.readouterr()  # the build's own output
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    d, f = model.config.hidden_size, model.config.intermediate_size
    params = info["parameters"]
    assert params["total"] == model.num_parameters()
    assert params["one_expert"] == 3 * d * f + 2 * f + d
    assert params["one_expert_bytes"] == 4 * params["one_expert"]
    assert params["active_per_token"] == params["dense"] + 2 * 2 * params["one_expert"]  # 2 layers, top-2
    assert info["config"]["attention_sinks"] and info["config"]["sliding_windows"] == [4, None]
    assert main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    for shown in ("gpt_oss", "sliding window 4 on 1 layers, attention sinks", "top-2, expert FFN 24, expert biases, "
                  "clamped SwiGLU (alpha 1.702, limit 7.0)", f"active/token {params['active_per_token']:,}"):
        assert shown in text, (shown, text)


# --- MXFP4 -------------------------------------------------------------------------------------------------------

def e2m1_value(code: int) -> float:
    """An e2m1 code decoded from its bits: sign (bit 3), exponent (bits 2-1, bias 1), mantissa (bit 0)."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude


def reference_dequantize(blocks, scales):
    """blocks uint8 [..., G, 16] (low nibble first), scales uint8 [..., G] -> float64 [..., G * 32]."""
    decode = np.vectorize(e2m1_value, otypes=[np.float64])
    pairs = np.stack([decode(blocks & 15), decode(blocks >> 4)], axis=-1)  # [..., G, 16, 2]
    values = pairs.reshape(*blocks.shape[:-1], 32) * 2.0 ** (scales.astype(np.float64) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """A tiny gpt-oss checkpoint whose expert weights are MXFP4 as the published ones are (random blocks and
    scales), and its source blocks and scales: (hf dir, {tensor name: array})."""
    torch.manual_seed(0)
    config = T.GptOssConfig(**{**COMMON, "hidden_size": 64}, head_dim=16, num_hidden_layers=2, num_local_experts=3,
                            num_experts_per_tok=2, intermediate_size=32, sliding_window=4)
    hf = tmp_path_factory.mktemp("mxfp4") / "hf"
    T.AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    path = hf / "model.safetensors"
    tensors = {name: read_tensor(info) for name, info in read_header(path).items()}
    rng = np.random.default_rng(0)
    quantized = {}
    for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
        experts, rows_in, cols_out = tensors.pop(name).shape  # [E, in, out] -> MXFP4 of [E, out, in]
        quantized[name + "_blocks"] = rng.integers(0, 256, (experts, cols_out, rows_in // 32, 16), dtype=np.uint8)
        quantized[name + "_scales"] = rng.integers(123, 131, (experts, cols_out, rows_in // 32), dtype=np.uint8)
    write_file(path, {**tensors, **quantized})
    hf_config = json.loads((hf / "config.json").read_text())
    hf_config["quantization_config"] = {"quant_method": "mxfp4"}
    (hf / "config.json").write_text(json.dumps(hf_config))
    return hf, quantized


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_experts_dequantize_as_written_here_and_by_transformers(mxfp4_checkpoint, tmp_path, dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf, quantized = mxfp4_checkpoint
    out = tmp_path / "mj"
    assert main(["convert", str(hf), str(out), "--dtype", dtype, "--quiet"]) == 0
    cfg = checkpoint.load_config(out)
    for layer in range(cfg.num_layers):
        pre = f"model.layers.{layer}.mlp.experts."
        weights = {w: reference_dequantize(quantized[pre + w + "_blocks"], quantized[pre + w + "_scales"])
                   for w in ("gate_up_proj", "down_proj")}  # [E, out, in]
        theirs = convert_moe_packed_tensors(torch.from_numpy(quantized[pre + "gate_up_proj_blocks"]),
                                            torch.from_numpy(quantized[pre + "gate_up_proj_scales"]), dtype=torch.float32)
        np.testing.assert_array_equal(theirs.numpy(), weights["gate_up_proj"].transpose(0, 2, 1))  # transformers' [E, in, out]
        for e in range(cfg.num_experts):
            expert = checkpoint.load_expert(out, layer, e)
            expected = {"gate": weights["gate_up_proj"][e, 0::2].T, "up": weights["gate_up_proj"][e, 1::2].T,
                        "down": weights["down_proj"][e].T}
            for name, want in expected.items():
                assert expert[name].dtype == jnp.dtype(dtype)
                np.testing.assert_array_equal(np.asarray(expert[name], np.float64), want, err_msg=f"{layer}/{e}/{name}")
            assert set(expert) == {"gate", "up", "down", "gate_bias", "up_bias", "down_bias"}


@pytest.mark.parametrize("edit,expected", [
    (lambda t: t.pop("model.layers.1.mlp.experts.down_proj_scales"),
     ["MXFP4 tensor 'model.layers.1.mlp.experts.down_proj_blocks' has no scales",
      "lacks 'model.layers.1.mlp.experts.down_proj_scales'"]),
    (lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj_scales": np.zeros((3, 64, 3), np.uint8)}),
     ["MXFP4 tensor 'model.layers.0.mlp.experts.gate_up_proj_scales'", "expected shape [3, 64, 2]", "found [3, 64, 3]"]),
    (lambda t: t.update({"model.layers.0.mlp.experts.down_proj_blocks": np.zeros((3, 64, 1, 16), np.int8)}),
     ["MXFP4 tensor 'model.layers.0.mlp.experts.down_proj_blocks'", "expected dtype uint8"]),
])
def test_bad_mxfp4_input_is_a_one_line_error_and_writes_nothing(mxfp4_checkpoint, tmp_path, capsys, edit, expected):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(mxfp4_checkpoint[0], hf)
    path = hf / "model.safetensors"
    tensors = {name: read_tensor(info) for name, info in read_header(path).items()}
    edit(tensors)
    write_file(path, tensors)
    out = tmp_path / "out" / "mj"
    assert main(["convert", str(hf), str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moejax: error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))
