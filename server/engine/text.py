"""Tokenizers, chat templates and incremental detokenization with stop strings."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path


def load_tokenizer(path: str | Path):
    from server.engine import phi3small_tokenizer

    if phi3small_tokenizer.is_phi3small(path):  # the hub's is remote code that downloads its BPE file
        return phi3small_tokenizer.load(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def stop_token_ids(path: str | Path, tokenizer) -> list[int]:
    """End-of-sequence ids from generation_config.json and the tokenizer."""
    ids: list[int] = []
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids += getattr(tokenizer, "branchserve_stop_ids", [])  # a native tokenizer's turn-end tokens
    return sorted(set(ids))


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The model's own chat template, with the assistant turn opened (and ``tools`` when given)."""
    if not tokenizer.chat_template:
        raise ValueError("this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=tools)
    # The template already holds any BOS it wants; do not let the tokenizer add another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=8)
def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


@functools.lru_cache(maxsize=8)
def _special_ids(tokenizer) -> frozenset[int]:
    return frozenset(tokenizer.all_special_ids)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for (byte-level BPE, SentencePiece byte fallback, or its decoded text)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    if token_id in _special_ids(tokenizer):
        return piece.encode()
    m = _SENTENCEPIECE_BYTE.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    table = _byte_decoder()
    if _byte_level(tokenizer) and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode()


class IncrementalText:
    """Turns generated tokens into text deltas, cutting exactly before the first stop string.

    Text that could still turn out to begin a stop string is held back, so a
    stop string never leaks into a stream. An incomplete UTF-8 sequence (shown
    by the tokenizer as U+FFFD at the end) is held back too.
    """

    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        """``min_tokens``: no stop string is looked for in the text of the first ``min_tokens - 1`` tokens."""
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens
        self.floor = 0  # a stop string may begin here or later
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        # Only a short window of tokens is decoded per step: ids[prefix:read] is text already taken,
        # ids[prefix:] is that plus what is new (so merges across the boundary decode right).
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Returns (new text, whether a stop string ended the output)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return "", False  # an incomplete character, or nothing visible yet
        self.prefix, self.read = self.read, len(self.ids)
        text = self.text + now[len(before):]
        self.text = text
        if len(self.ids) < self.min_tokens:  # too early to stop: all of it may go out
            self.floor = len(text)
            delta, self.emitted = text[self.emitted:], len(text)
            return delta, False
        if self.stop:
            start = max(self.floor, self.emitted - self.hold)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                delta = text[self.emitted:cut]
                self.text, self.emitted = text[:cut], cut
                return delta, True
        safe = max(len(text) - self.hold, self.floor)
        if safe <= self.emitted:
            return "", False
        delta = text[self.emitted:safe]
        self.emitted = safe
        return delta, False

    def flush(self) -> str:
        """Everything not yet emitted, at the end of a generation that no stop string ended."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
