"""FP8 (e4m3) checkpoints with block scales, as DeepSeek-V3 and GLM-4.5-FP8 ship: written here with torch, converted
by `moejax convert`, and held to a dequantization written independently here (torch); memory stays about one
tensor; bad input (a tensor without its scale, a scale of the wrong shape, ...) is a one-line error."""

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from hf_zoo import build
from safetensors.torch import load_file, save_file
from test_bad_input import assert_convert_fails

from moejax import checkpoint
from moejax.cli import main as moejax_cli
from moejax.config import ModelConfig
from moejax.convert.families import family
from moejax.convert.fp8 import BlockFp8, read_weight, scale_tensors
from moejax.convert.safetensors_file import read_header

FP8_MAX = 448.0  # largest finite e4m3 value
BLOCK = (16, 12)  # small blocks, so the tiny model's matrices have several, the last ones partial


def quantize(weight: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [R, C] float32 -> (FP8 e4m3 [R, C], scale_inv float32 [ceil(R / br), ceil(C / bc)])."""
    (rows, cols), (br, bc) = weight.shape, block
    scale = torch.zeros((-(-rows // br), -(-cols // bc)))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = weight[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max() / FP8_MAX
    return (weight / dequantization_factors(scale, weight.shape, block)).to(torch.float8_e4m3fn), scale


def dequantization_factors(scale: torch.Tensor, shape, block) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize(fp8: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The test's own dequantization: each element times its block's scale."""
    return fp8.to(torch.float32) * dequantization_factors(scale, fp8.shape, block)


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Linear weights, as DeepSeek-V3 quantizes them (not the embeddings, lm_head, norms or routers)."""
    return tensor.ndim == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return write_fp8_checkpoints(build(("glm4_moe", "qk_norm_groups"), root)[1], root)


def write_fp8_checkpoints(hf_dir, root):
    """(FP8 checkpoint dir, the same dequantized by the test in float32, the original float32 dir `hf_dir`)."""
    fp8_dir, reference_dir = root / "fp8", root / "dequantized"
    tensors = load_file(hf_dir / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, tensor in tensors.items():
        if is_quantized(name, tensor):
            fp8, scale = quantize(tensor, BLOCK)
            quantized[name], quantized[name + "_scale_inv"] = fp8, scale
            dequantized[name] = dequantize(fp8, scale, BLOCK)
        else:
            quantized[name] = dequantized[name] = tensor
    config = json.loads((hf_dir / "config.json").read_text())
    for path, weights, extra in ((fp8_dir, quantized, {"quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}}),
                                 (reference_dir, dequantized, {})):
        path.mkdir()
        save_file(weights, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({**config, **extra}))
    return fp8_dir, reference_dir, hf_dir


def all_groups(ckpt):
    cfg = checkpoint.load_config(ckpt)
    groups = [("globals",)] + [("layer", i) for i in range(cfg.num_layers)]
    return groups + [("expert", i, e) for i in cfg.moe_layer_ids for e in range(cfg.num_experts)]


def leaves(tree, prefix=()):
    for key, value in tree.items():
        yield from leaves(value, (*prefix, key)) if isinstance(value, dict) else [((*prefix, key), value)]


def convert_all(tmp_path, sources: dict) -> dict:
    """{name: HF dir} -> {name: its moejax conversion}."""
    outs = {name: tmp_path / f"{name}-mj" for name in sources}
    for name, source in sources.items():
        assert moejax_cli(["convert", str(source), str(outs[name]), "--quiet"]) == 0
    return outs


def same_arrays(ours_dir, reference_dir):
    """Yields (group, path, ours, reference) for every array of two checkpoints, after checking that both hold the
    same arrays with the same dtypes and values."""
    assert checkpoint.load_config(ours_dir) == checkpoint.load_config(reference_dir)
    for group in all_groups(ours_dir):
        ours, reference = (dict(leaves(checkpoint.load_group(d, group))) for d in (ours_dir, reference_dir))
        assert ours.keys() == reference.keys(), group
        for path, array in ours.items():
            assert array.dtype == reference[path].dtype and np.array_equal(array, reference[path]), (group, path)
            yield group, path, array, reference[path]


def test_fp8_checkpoint_converts_to_the_independent_dequantization(checkpoints, tmp_path):
    fp8_dir, reference_dir, hf_dir = checkpoints
    outs = convert_all(tmp_path, {"fp8": fp8_dir, "reference": reference_dir, "original": hf_dir})
    quantization_error = []
    for group, path, array, _ in same_arrays(outs["fp8"], outs["reference"]):
        original = dict(leaves(checkpoint.load_group(outs["original"], group)))[path]
        quantization_error.append(float(np.abs(array - original).max() / np.abs(original).max()))
    # the FP8 weights did go through quantization (e4m3 keeps 3 mantissa bits: at most 1/16 of a block's largest)
    assert 0.0 < max(quantization_error) <= 1 / 16


def test_deepseek_v3_fp8_checkpoint_converts(tmp_path):
    """DeepSeek-V3 as published: its linear weights (latent projections and experts) FP8 with block scales, the
    routers' weights and selection biases not; in bfloat16 the routers stay float32."""
    fp8_dir, reference_dir, _ = write_fp8_checkpoints(build(("deepseek_v3", "q_lora_groups_bias"), tmp_path)[1], tmp_path)
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in load_file(fp8_dir / "model.safetensors")
    outs = convert_all(tmp_path, {"fp8": fp8_dir, "reference": reference_dir})
    assert len(list(same_arrays(outs["fp8"], outs["reference"]))) > 0
    assert moejax_cli(["convert", str(fp8_dir), str(tmp_path / "bf16"), "--dtype", "bfloat16", "--quiet"]) == 0
    router = checkpoint.load_layer(tmp_path / "bf16", 1)["router"]
    assert {name: str(array.dtype) for name, array in router.items()} == {"kernel": "float32",
                                                                          "e_score_correction_bias": "float32"}


def test_reader_dequantizes_128_blocks_with_partial_edges(tmp_path):
    weight = torch.randn(300, 200) * 3
    fp8, scale = quantize(weight, (128, 128))
    save_file({"w.weight": fp8, "w.weight_scale_inv": scale}, tmp_path / "w.safetensors")
    tensors = read_header(tmp_path / "w.safetensors")
    assert scale_tensors(BlockFp8(), ["w.weight"], tensors) == {"w.weight_scale_inv"}
    ours = read_weight(tensors, "w.weight", BlockFp8())
    np.testing.assert_array_equal(ours, dequantize(fp8, scale, (128, 128)).numpy())


def test_conversion_holds_one_tensor_not_the_shard(tmp_path):
    """A one-shard FP8 checkpoint of 6 MB of experts converts with less than half the shard in memory at once (about
    one checkpoint group in float32: here the attention's four matrices); dequantizing the shard whole would take 4x."""
    cfg = ModelConfig(family="mixtral", vocab_size=64, hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=4,
                      head_dim=64, num_experts=32, top_k=2, expert_intermediate_size=256, moe_layers=(True,),
                      sliding_windows=(None,))
    hf = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 256, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 32, "num_experts_per_tok": 2,
          "intermediate_size": 256, "dtype": "float32",
          "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    assert family("mixtral").config_from_hf(hf).replace(dtype="float32") == cfg
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, target in family("mixtral").tensor_map(cfg).items():
        weight = torch.randn(target.hf_shape, generator=generator)
        if is_quantized(name, weight) or ".experts." in name:
            tensors[name], tensors[name + "_scale_inv"] = quantize(weight, (128, 128))
        else:
            tensors[name] = weight
    source = tmp_path / "hf"
    source.mkdir()
    save_file(tensors, source / "model.safetensors")
    (source / "config.json").write_text(json.dumps(hf))
    shard_bytes = (source / "model.safetensors").stat().st_size
    tracemalloc.start()
    try:
        assert moejax_cli(["convert", str(source), str(tmp_path / "mj"), "--quiet"]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert shard_bytes > 6e6 and peak < shard_bytes / 2, (peak, shard_bytes)


def _drop_scale(tensors):
    tensors.pop("model.layers.1.mlp.experts.0.up_proj.weight_scale_inv")


def _misshape_scale(tensors):
    name = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    tensors[name] = tensors[name][:, :1].contiguous()


def _scale_a_float_tensor(tensors):
    tensors["model.layers.0.input_layernorm.weight_scale_inv"] = torch.ones(1, 1)


@pytest.mark.parametrize("edit_weights,edit_config,expected", [
    (_drop_scale, None, ["tensor 'model.layers.1.mlp.experts.0.up_proj.weight'", "is FP8 (e4m3) without its block "
                         "scale 'model.layers.1.mlp.experts.0.up_proj.weight_scale_inv'"]),
    (_misshape_scale, None, ["tensor 'model.layers.1.self_attn.q_proj.weight_scale_inv'", "expected shape [4, 3]",
                             "found [4, 1]"]),
    (_scale_a_float_tensor, None, ["'model.layers.0.input_layernorm.weight_scale_inv'", "not FP8"]),
    (None, lambda c: c.pop("quantization_config"), ["is FP8 (e4m3) but config.json has no quantization_config"]),
    (None, lambda c: c["quantization_config"].update(fmt="e5m2"), ["quantization_config fmt 'e5m2' is not supported"]),
    (None, lambda c: c["quantization_config"].update(weight_block_size=[128]), ["weight_block_size must be two"]),
], ids=["no_scale", "scale_shape", "scale_of_float", "no_quantization_config", "fmt", "block_size"])
def test_bad_fp8_input_is_a_one_line_error(checkpoints, tmp_path, capsys, edit_weights, edit_config, expected):
    fp8_dir = checkpoints[0]
    broken = tmp_path / "hf"
    shutil.copytree(fp8_dir, broken)
    if edit_weights is not None:
        tensors = load_file(broken / "model.safetensors")
        edit_weights(tensors)
        save_file(tensors, broken / "model.safetensors")
    if edit_config is not None:
        config = json.loads((broken / "config.json").read_text())
        edit_config(config)
        (broken / "config.json").write_text(json.dumps(config))
    assert_convert_fails(capsys, broken, tmp_path, *expected)
