"""A byte-level BPE tokenizer trained with HF `tokenizers`, and the files that ship it with a model.

Ids 0 and 1 are BOS `<s>` and EOS `</s>`; encoding prepends BOS (as `moejax.tokenizer` expects);
decoding maps bytes back exactly, so any text round-trips.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, max_token_length: int = 16):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` entries (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    assert tokenizer.token_to_id(BOS) == BOS_ID and tokenizer.token_to_id(EOS) == EOS_ID
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    return tokenizer


def write_tokenizer_files(tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json plus the tokenizer_config.json transformers' AutoTokenizer reads."""
    out_dir = Path(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
