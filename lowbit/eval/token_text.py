"""Token ids ↔ the texts an OpenAI-style completions API shows for them.

The completions API names tokens by text: `logprobs.tokens` and the keys of `logprobs.top_logprobs`. A server that
honours vLLM's `return_tokens_as_token_ids` writes `token_id:N` instead, which is exact; llama.cpp's Python server
writes each token's piece on its own — `llama_token_to_piece` without special tokens, decoded as UTF-8 with invalid
bytes dropped: ' Once' for '▁Once', '\\n' for '<0x0A>', '' for control tokens (BOS, EOS, a chat template's markers)
and for the byte pieces of a multi-byte character (and, a quirk of llama-cpp-python 0.3.36, for pieces longer than
32 bytes). `TokenTexts` renders every id of the local tokenizer that way
and maps texts back to ids.

Several ids can share a text: stories260K's 512-token vocabulary has, for every ASCII character, a piece and a
byte-fallback token that both read 'a', and 131 ids read '' (control tokens, and bytes ≥ 0x80). A shared text is
given to the one id that ordinary text tokenizes to — not a control or byte-fallback token, nor a piece of a
character — where there is exactly one ('a' → the piece: on stories260K's records the byte twin of a top-20 token
was never in the top-20 itself). Texts without such an id ('' above all: BOS, EOS, UNK and partial characters)
name no id (`canonical` is None); the reader of a response (lowbit.eval.echo) leaves them out, and where two ids
with one text are both in a position's top-k — the server's dict then keeps one entry for both, the later, less
likely one's value — it sees that from the number of keys and leaves out every shared text at that position.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
TOKEN_ID = re.compile(r"token_id:(-?\d+)")
PIECE_BUFFER = 32


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (every byte as a printable character), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@dataclass(frozen=True)
class TokenTexts:
    texts: tuple[str, ...]  # the text of every id, as llama.cpp's server shows it
    special: frozenset[int]  # control tokens (rendered '')
    byte_fallback: frozenset[int]  # <0xNN> tokens, pieces that are not whole UTF-8 characters, over-long pieces

    @classmethod
    def of(cls, tokenizer) -> TokenTexts:
        vocab = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", 0)}
        byte_level = _is_byte_level(tokenizer)
        decoder = _byte_decoder() if byte_level else {}
        texts, byte_ids = [], set()
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab)))):
            if i in special or piece is None:
                texts.append("")
                continue
            m = None if byte_level else _BYTE.fullmatch(piece)
            if m:
                raw = bytes([int(m.group(1), 16)])
                byte_ids.add(i)
            elif byte_level:
                raw = bytes(decoder[c] for c in piece) if all(c in decoder for c in piece) else piece.encode()
            else:
                raw = piece.replace("▁", " ").encode()
            if len(raw) > PIECE_BUFFER:  # llama-cpp-python's detokenize reads pieces into 32 bytes; longer ones read ''
                raw = b""
                byte_ids.add(i)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                byte_ids.add(i)
            texts.append(raw.decode("utf-8", errors="ignore"))
        return cls(tuple(texts), frozenset(special), frozenset(byte_ids))

    @cached_property
    def by_text(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            out.setdefault(t, []).append(i)
        return {t: tuple(ids) for t, ids in out.items()}

    @cached_property
    def _canonical(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for text, ids in self.by_text.items():
            if len(ids) == 1:
                out[text] = ids[0]
                continue
            ordinary = [i for i in ids if i not in self.special and i not in self.byte_fallback]
            out[text] = ordinary[0] if len(ordinary) == 1 else None
        return out

    def render(self, token_id: int) -> str:
        return self.texts[token_id]

    def shared(self, text: str) -> bool:
        """Whether more than one id reads `text` (or none does)."""
        return len(self.by_text.get(text, ())) != 1

    def ids(self, text: str) -> tuple[int, ...]:
        """Every id that reads `text`."""
        m = TOKEN_ID.fullmatch(text)
        if m:
            return (int(m.group(1)),) if 0 <= int(m.group(1)) < len(self.texts) else ()
        return self.by_text.get(text, ())

    def canonical(self, text: str) -> int | None:
        """The id a server's text names: exact for `token_id:N` and for a text one id has; the ordinary id of a
        shared text (see the module's docstring); None for a text no id has or no rule resolves."""
        m = TOKEN_ID.fullmatch(text)
        if m:
            i = int(m.group(1))
            return i if 0 <= i < len(self.texts) else None
        return self._canonical.get(text)


def _is_byte_level(tokenizer) -> bool:
    """GPT-2-style byte-level BPE (SmolLM2, Llama 3, Qwen), whose pieces spell bytes as printable characters."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    return "ByteLevel" in kinds
