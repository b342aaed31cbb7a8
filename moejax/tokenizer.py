"""Text <-> token ids through the checkpoint's `tokenizer.json` (HF `tokenizers`)."""

from __future__ import annotations

from pathlib import Path

from moejax.errors import MoejaxError


class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise MoejaxError(f"{path}: cannot load tokenizer ({err})") from None
        self.path = Path(path)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids, with the tokenizer's own special tokens (e.g. BOS) added unless add_special_tokens is
        False (for text that writes them itself, as a chat template's does)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(ckpt: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has none (raw token ids only)."""
    path = Path(ckpt) / "tokenizer.json"
    return Tokenizer(path) if path.is_file() else None
