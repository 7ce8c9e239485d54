"""GGUF metadata and tensors for a checkpoint quantized from a Hugging Face source of the Llama family (Llama,
Mistral, SmolLM2; Qwen2 and Qwen3): what llama.cpp's converter (convert_hf_to_gguf.py) writes for them, built with
the `gguf` package.

- Hyper-parameters from the model's config: context, widths, heads, rotary base and dimensions, RMS-norm epsilon.
  Rotary scaling (Llama 3.1's, YaRN) is refused: its metadata differs per kind and is not written yet.
- The tokenizer from tokenizer.json. A SentencePiece-style BPE (byte fallback, "▁" for spaces: Llama 2, Mistral,
  llama2.c models) becomes llama.cpp's "llama" vocabulary: each token's score is minus the rank of the first merge
  that makes it, so llama.cpp's highest-score-first merging applies the merges in the order the tokenizer does; byte
  tokens <0xNN> are BYTE, special tokens CONTROL. A byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen) becomes
  "gpt2" with its merges, read by the gguf package's own BpeVocab; its pre-tokenizer is written as "default" (llama.cpp
  recognises named ones by hashing a test string's tokens, which is not reproduced here).
- Tensors under llama.cpp's names (gguf.get_tensor_name_map); norms in float32, other float tensors in float16; the
  query and key rows of "llama" models in llama.cpp's rotary pair order (its converter's permute), quantized or not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED = {"llama"}


def hf_arch(config) -> str:
    arch = ARCH.get(config.model_type)
    if arch is None:
        raise LowbitError(f"GGUF export writes metadata for Hugging Face models of the Llama family "
                          f"({', '.join(ARCH)}); this one is {config.model_type!r}, which lowbit cannot describe to "
                          "llama.cpp yet.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise LowbitError(f"this model uses {rope.get('rope_type', rope.get('type'))!r} rotary scaling, whose GGUF "
                          "metadata lowbit does not write yet; GGUF export takes models with plain rotary embeddings.")
    return arch


def add_hparams(writer, config, arch: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config.vocab_size)


def add_tokenizer(writer, directory: Path, vocab_size: int) -> None:
    import gguf

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise LowbitError(f"GGUF export needs the model's tokenizer.json, and {str(directory)!r} has none; export from "
                          "a checkpoint saved with its tokenizer.")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"{path}: a {model.get('type')!r} tokenizer; GGUF export writes BPE tokenizers "
                          "(SentencePiece-style or byte-level) only.")
    if model.get("byte_fallback"):
        _add_spm_style(writer, tj)
        gguf.SpecialVocab(directory, load_merges=False, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
        return
    vocab = gguf.BpeVocab(directory)
    tokens, _, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _add_spm_style(writer, tj: dict) -> None:
    import gguf

    vocab: dict[str, int] = tj["model"]["vocab"]
    rank: dict[str, int] = {}
    for i, m in enumerate(tj["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, i)
    special = {t["content"] for t in tj.get("added_tokens", []) if t.get("special")}
    unk = tj["model"].get("unk_token")
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise LowbitError("tokenizer.json's vocabulary ids are not 0 … n − 1; GGUF export cannot lay it out.")
    types = []
    for t in tokens:
        if t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif t in special:
            types.append(gguf.TokenType.CONTROL)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(rank[t]) if t in rank else 0.0 for t in tokens])
    writer.add_token_types(types)


def rotary_pairs(rows: int, heads: int) -> torch.Tensor:
    """Row order from transformers' (each head's first halves, then second halves of its rotary pairs) to
    llama.cpp's (pairs interleaved)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def float_tensor(t: torch.Tensor) -> np.ndarray:
    """A float tensor as llama.cpp stores it: 1-D (norms, biases) in float32, else float16."""
    return t.detach().float().numpy() if t.dim() == 1 else t.detach().to(torch.float16).numpy()
