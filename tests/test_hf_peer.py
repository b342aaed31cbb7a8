"""scripts/peers/hf_peer.py, the transformers peer of the decode benchmarks: the transformers model it builds for a
moejax card has the card's shape, and its resident mode runs (on the CPU, widths shrunk)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moejax.models.decoder import parameter_counts

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
NEW_FAMILY_CARDS = ["deepseek-v2-lite", "gpt-oss-20b", "qwen3-30b-a3b", "glm-4.5-air"]


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("hf_peer", ROOT / "scripts" / "peers" / "hf_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def routed_experts(hf) -> int:
    """The family's own name for the number of routed experts."""
    return next(getattr(hf, name) for name in ("n_routed_experts", "num_local_experts", "num_experts") if hasattr(hf, name))


@pytest.mark.parametrize("card", NEW_FAMILY_CARDS)
def test_the_transformers_config_has_the_cards_dims(peer, card):
    cfg, hf = peer.card_config(card, None)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.vocab_size) == (cfg.num_layers, cfg.hidden_size, cfg.vocab_size)
    assert (routed_experts(hf), hf.num_experts_per_tok) == (cfg.num_experts, cfg.top_k)
    assert hf.model_type == cfg.family


@pytest.mark.parametrize("card", NEW_FAMILY_CARDS)
def test_the_transformers_model_has_moejax_parameter_count(peer, card):
    """Two layers (a dense first layer and an MoE one where the card has it), widths shrunk: transformers counts
    as many parameters as moejax; the offload device map leaves the last MoE layer's routed experts on the CPU."""
    import torch

    cfg, hf = peer.card_config(card, 2, tiny=True)
    model = peer.T.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(cfg)["total"]
    device_map = peer.offload_device_map(model, gpu_moe_layers=len(cfg.moe_layer_ids) - 1)
    on_cpu = [name for name, device in device_map.items() if device == "cpu"]
    assert on_cpu == [f"model.layers.{cfg.moe_layer_ids[-1]}.mlp.experts"]
    placed = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}
    assert all(any(name == key or name.startswith(key + ".") for key in device_map) for name in placed)


def test_the_peer_runs_resident_on_a_tiny_card(tmp_path):
    out = tmp_path / "peer.json"
    done = subprocess.run(
        [sys.executable, "scripts/peers/hf_peer.py", "--mode", "resident", "--card", "gpt-oss-20b:2", "--dims", "tiny",
         "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model_type"] == "gpt_oss" and result["layers"] == 2
    for variant in ("generate_default", "generate_eager_experts", "forward_loop_eager_experts"):
        assert result[variant]["tpot_s"] > 0, (variant, result[variant])
