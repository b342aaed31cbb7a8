"""A request's output text as its tokens come: new pieces to send, held back while they may be the start of a
stop string or end inside a multi-byte character, and cut before the first stop string."""

from __future__ import annotations


class TextStream:
    """Decodes a growing list of token ids with `tokenizer.decode(ids) -> str`.

    `add(token)` -> (piece, stopped): the text that became safe to send since the last call, and whether
    the output now contains a stop string (the piece then ends right before it, and nothing more comes).
    `flush()` -> what was held back, once the request ends for another reason.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""  # text sent so far: always a prefix of the decoded text
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = first_stop(text, self.stop, start=max(0, len(self.sent) - max(map(len, self.stop), default=0)))
        if cut is not None:
            self.stopped = True
            return self._send(text[:cut]), True
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            return "", False
        return self._send(text[: len(text) - held_back(text, self.stop)]), False

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._send(self.tokenizer.decode(self.ids))

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding more tokens changed earlier text: wait until it settles
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def first_stop(text: str, stop: tuple[str, ...], start: int = 0) -> int | None:
    """Where the earliest stop string in `text` begins (searching from `start`), or None."""
    found = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may become one)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[len(text) - n :]):
                longest = n
                break
    return longest
