"""The reference record: what the reference did and predicted, saved once and reused for every candidate.

Stored in one safetensors file: the token sequences (int32, concatenated, with offsets and prompt lengths), at every
predicting position the reference's top-N ids (int32) and log-probs (float32 or float16) and its log-prob of the
token that actually comes next; optional cached reference results (perplexity NLLs, task correctness); and a
JSON header with the model and tokenizer fingerprints, so a record is never used with another tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_file

RECORD_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token → id) and the special-token ids: equal iff texts tokenize alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


# Config entries that say where or with what a model was loaded, not what it computes.
_UNHASHED_CONFIG_KEYS = ("_name_or_path", "transformers_version")


def model_fingerprint(model) -> str:
    """sha256 of the config and a slice of every parameter: tells two checkpoints apart cheaply.

    The same weights loaded from another directory, or with another transformers version, match."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _UNHASHED_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ReferenceRecord:
    """A value: made once, never changed in place. Computations that add to it (the reference's top-N predictions,
    a cached perplexity) return a new record (`with_predictions`, `with_extras`); its tensors are never written."""

    meta: Mapping
    tokens: torch.Tensor  # int32 [S], every sequence concatenated
    offsets: torch.Tensor  # int64 [n + 1], sequence i is tokens[offsets[i]:offsets[i+1]]
    prompt_lens: torch.Tensor  # int32 [n]
    top_ids: torch.Tensor | None = None  # int32 [positions, N]; sequence i has len_i − 1 positions
    top_logprobs: torch.Tensor | None = None  # float [positions, N]
    next_logprob: torch.Tensor | None = None  # float32 [positions]
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        object.__setattr__(self, "extras", MappingProxyType(dict(self.extras)))

    @classmethod
    def of_sequences(cls, meta: Mapping, seqs: list[list[int]] | list[torch.Tensor],
                     prompt_lens: list[int]) -> ReferenceRecord:
        """A record of these sequences (prompt + generated tokens each), without predictions yet."""
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        tokens = torch.cat([torch.as_tensor(s, dtype=torch.int32) for s in seqs])
        return cls(meta, tokens, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
                   torch.tensor(prompt_lens, dtype=torch.int32))

    def with_predictions(self, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                         next_logprob: torch.Tensor) -> ReferenceRecord:
        """This record with the reference's top-N predictions at every position."""
        return dataclasses.replace(self, top_ids=top_ids, top_logprobs=top_logprobs, next_logprob=next_logprob)

    def with_extras(self, **extras: torch.Tensor) -> ReferenceRecord:
        """This record with more cached reference results (perplexity NLLs, task correctness)."""
        return dataclasses.replace(self, extras={**self.extras, **extras})

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_lens)

    def sequence(self, i: int) -> torch.Tensor:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def position_offsets(self) -> torch.Tensor:
        lengths = self.offsets[1:] - self.offsets[:-1] - 1
        return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    def first(self, n: int) -> ReferenceRecord:
        """The record restricted to its first n sequences: their generations and reference log-probs as recorded.
        Extras (perplexity NLLs, task answers) are not per prompt and are kept whole."""
        if not 0 < n <= self.num_sequences:
            raise LowbitError(f"the record holds {self.num_sequences} prompts; cannot take the first {n}.")
        end, positions = int(self.offsets[n]), int(self.position_offsets()[n])
        top = [None if t is None else t[:positions] for t in (self.top_ids, self.top_logprobs, self.next_logprob)]
        return ReferenceRecord({**self.meta, "num_prompts": n}, self.tokens[:end], self.offsets[:n + 1],
                               self.prompt_lens[:n], *top, self.extras)

    def made_by(self, model) -> bool:
        """Whether this record came from `model` (a record without a fingerprint is taken at its word)."""
        made_by = self.meta.get("model_fingerprint")
        return not made_by or made_by == model_fingerprint(model)

    def check_tokenizer(self, tokenizer, what: str) -> None:
        if self.meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
            raise LowbitError(f"the reference record was made with another tokenizer than the {what}'s "
                              f"(record: {self.meta.get('model')!r}); its token sequences mean nothing to this model. "
                              f"Make a new record with --save-reference using the right reference model.")

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """Write atomically (temporary file, then rename)."""
        path = Path(path).expanduser()
        tensors = {"tokens": self.tokens.int(), "offsets": self.offsets.long(), "prompt_lens": self.prompt_lens.int()}
        if self.top_ids is not None:
            tensors.update(top_ids=self.top_ids.int(), top_logprobs=self.top_logprobs.to(dtype),
                           next_logprob=self.next_logprob.float())
        tensors.update({f"extra.{k}": v.contiguous() for k, v in self.extras.items()})
        meta = {**self.meta, "record_version": RECORD_VERSION, "logprob_dtype": str(dtype).removeprefix("torch.")}
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"lowbit_record": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> ReferenceRecord:
        path = Path(path).expanduser()
        if not path.is_file():
            raise LowbitError(f"reference record {str(path)!r} does not exist; create one with --save-reference.")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("lowbit_record", "null"))
            tensors = load_file(str(path))
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise LowbitError(f"{str(path)!r} is not a readable lowbit reference record ({e}).") from None
        if not isinstance(meta, dict):
            raise LowbitError(f"{str(path)!r} is a safetensors file but not a lowbit reference record.")
        if meta.get("record_version", 0) > RECORD_VERSION:
            raise LowbitError(f"{str(path)!r} was written by a newer lowbit; upgrade lowbit to read it.")
        extras = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(meta, tensors["tokens"], tensors["offsets"], tensors["prompt_lens"], tensors.get("top_ids"),
                   tensors.get("top_logprobs"), tensors.get("next_logprob"), extras)
