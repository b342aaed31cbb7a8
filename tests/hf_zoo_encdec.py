"""Tiny random HF encoder-decoder MoE models (Switch Transformers, NLLB-MoE) for reference tests.

Each entry builds a transformers config that exercises some option of its family. Weights are
redrawn with larger scales than transformers' init so logits and routing have clear margins.

transformers 5.x's `NllbMoeExperts.forward` runs the wrong experts: it one-hot encodes the
already one-hot top-1 mask and uses the 0/1 values as expert ids, so the first choice of every
token runs expert_1 and the second expert_0 (transformers 4.x and fairseq run the chosen
experts). The reference here replaces that one method by the 4.x semantics (`_nllb_experts`):
each expert e runs on the tokens with a nonzero combining weight for e.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers.models.nllb_moe import modeling_nllb_moe

from moejax.cli import main as moejax_cli


def _nllb_experts(self, hidden_states, router_mask, router_probs):
    """hidden_states [N, D], router_probs [N, E] (combining weights, 0 where not routed) -> [N, D]."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        tokens = torch.nonzero(router_probs[:, e] > 0).squeeze(-1)
        if tokens.numel():
            y = self[f"expert_{e}"](hidden_states[tokens]) * router_probs[tokens, e, None]
            out.index_add_(0, tokens, (y * (1 - self.moe_token_dropout)).to(hidden_states.dtype))
    return out


modeling_nllb_moe.NllbMoeExperts.forward = _nllb_experts
torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and fight JAX for the cores)

VOCAB = 101
LANGS = {"eng_Latn": 99, "fra_Latn": 100}  # NLLB tokenizer language codes (tokens of the tiny vocabulary)
FIRST_WORD = 4  # ids below are special tokens in both families

SWITCH = dict(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=48, decoder_start_token_id=0,
              relative_attention_num_buckets=8, relative_attention_max_distance=20)
NLLB = dict(vocab_size=VOCAB, d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64)

# family -> {name: config factory}
ZOO = {
    "switch_transformers": {
        "basic": lambda: T.SwitchTransformersConfig(**SWITCH, num_layers=4, num_decoder_layers=3, num_experts=4,
                                                    num_sparse_encoder_layers=2, num_sparse_decoder_layers=3),
        # untied tables, inner width != d_model, router bias, gelu, a small expert capacity, and
        # transformers' quirk that num_sparse_decoder_layers=0 still makes decoder layer 1 sparse.
        "untied": lambda: T.SwitchTransformersConfig(**{**SWITCH, "num_heads": 3, "d_kv": 12}, num_layers=2,
                                                     num_decoder_layers=2, num_experts=3, num_sparse_encoder_layers=1,
                                                     num_sparse_decoder_layers=0, tie_word_embeddings=False,
                                                     router_bias=True, dense_act_fn="gelu_new", expert_capacity=3),
    },
    "nllb-moe": {
        "basic": lambda: T.NllbMoeConfig(**NLLB, encoder_layers=4, decoder_layers=2, encoder_ffn_dim=48,
                                         decoder_ffn_dim=40, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=1),
        # untied tables, unscaled embeddings, router bias, gelu, no token-dropout scaling, a fixed
        # expert capacity (fraction <= 0), padding routed, batch-prioritised routing normalised early.
        "untied": lambda: T.NllbMoeConfig(**NLLB, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=40,
                                          decoder_ffn_dim=40, num_experts=5, encoder_sparse_step=1,
                                          decoder_sparse_step=3, tie_word_embeddings=False, scale_embedding=False,
                                          router_bias=True, activation_function="gelu", moe_token_dropout=0.0,
                                          moe_eval_capacity_token_fraction=-1.0, expert_capacity=3,
                                          router_ignore_padding_tokens=True, batch_prioritized_routing=True,
                                          normalize_router_prob_before_dropping=True),
        "capacity": lambda: T.NllbMoeConfig(**NLLB, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=40,
                                            decoder_ffn_dim=40, num_experts=3, encoder_sparse_step=1,
                                            decoder_sparse_step=1, moe_eval_capacity_token_fraction=0.3),
    },
}

CASES = [(family, name) for family, configs in ZOO.items() for name in configs]


def case_id(case) -> str:
    return f"{case[0]}-{case[1]}"


def _redraw(model, gain: float = 2.0, embed_std: float = 0.3) -> None:
    """Matrices normal(0, gain / sqrt(fan_in)), embeddings normal(0, embed_std), norms 1 +- 0.3, biases +- 0.3."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * noise)
            elif "embed" in name or "shared" in name:
                p.copy_(noise * embed_std)
            else:
                p.copy_(noise * gain / p.shape[-1] ** 0.5)


def write_nllb_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json for the tiny vocabulary: 'w7' is id 7; sources get NLLB's
    'eng_Latn ... </s>' framing."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, min(LANGS.values()))})
    vocab.update(LANGS)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="eng_Latn $A </s>", special_tokens=[("eng_Latn", LANGS["eng_Latn"]), ("</s>", 2)]
    )
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", *LANGS])
    tok.save(str(path / "tokenizer.json"))


@functools.lru_cache(maxsize=None)
def _build(family: str, name: str, root: str):
    torch.manual_seed(1234)
    model = T.AutoModelForSeq2SeqLM.from_config(ZOO[family][name](), attn_implementation="eager").eval()
    _redraw(model)
    hf_dir = Path(root) / f"{family}-{name}-hf"
    model.save_pretrained(hf_dir)
    if family == "nllb-moe":
        write_nllb_tokenizer(hf_dir)
    out = Path(root) / f"{family}-{name}-mj"
    assert moejax_cli(["convert", str(hf_dir), str(out), "--quiet"]) == 0
    return model, hf_dir, out


def build(case, root: Path):
    """(transformers model in float32 eval mode, HF checkpoint dir, converted moejax checkpoint dir)."""
    return _build(case[0], case[1], str(root))


def random_sources(lengths, seed: int = 0) -> list[list[int]]:
    """Random word ids (no special tokens, so no source token is mistaken for padding)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(FIRST_WORD, min(LANGS.values()), size=n).tolist() for n in lengths]


def padded(sources: list[list[int]], pad_id: int):
    """transformers' batch inputs: (input_ids, attention_mask) right-padded to the longest source."""
    longest = max(len(s) for s in sources)
    ids = torch.full((len(sources), longest), pad_id)
    mask = torch.zeros((len(sources), longest), dtype=torch.long)
    for b, s in enumerate(sources):
        ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
    return ids, mask


def hf_forward(model, sources, decoder_inputs):
    """transformers' (encoder outputs, logits) per source, for one padded batch: lists of [len, D], [len_dec, V]."""
    ids, mask = padded(sources, model.config.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor(decoder_inputs))
    enc = [out.encoder_last_hidden_state[b, : len(s)].numpy() for b, s in enumerate(sources)]
    return enc, [out.logits[b].numpy() for b in range(len(sources))]


def hf_generate(model, sources, new_tokens: int, eos_token_id=None, forced_bos_token_id=None) -> list[list[int]]:
    """transformers' greedy targets for one padded batch, without the decoder start token (and,
    with an EOS, without the padding after it)."""
    ids, mask = padded(sources, model.config.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             num_beams=1, eos_token_id=eos_token_id, forced_bos_token_id=forced_bos_token_id)
    targets = []
    for row in out[:, 1:].tolist():
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        targets.append(row)
    return targets

