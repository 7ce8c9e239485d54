"""lowbit's checkpoint format: packed tensors in safetensors, a JSON header, written atomically.

A checkpoint directory holds
- `model.safetensors` (or, when quantized block by block from disk, one shard per block and one for the rest,
  named by `model.safetensors.index.json` as transformers names its shards): packed quantized layers
  (`<layer>.qweight` int32 words, `.scales` float16, `.qzeros` int32 words for asymmetric grids; fp8 layers
  `.weight` e4m3 and `.weight_scale` float32) and every other tensor in 16 bits; tied tensors are stored once;
- `config.json` (+ generation config, tokenizer files) as transformers writes them;
- `lowbit.json`: format version, lowbit version, recipe, each quantized layer's format and shape, the tied
  tensors, sizes, the sha256 of every other file, and `header_sha256`, the sha256 of the header itself (its
  canonical JSON: keys sorted, compact, without that field); all checked on load. Headers written before
  `header_sha256` still load (readers that predate it ignore it, so the format version stays 1).

Loading is two-phase: the model is built with parameters on the meta device, quantized layers are swapped
for QuantLinear as the header says, then the state dict is assigned after its keys and shapes are checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.spec import LayerSpec
from lowbit.io.atomic import atomic_directory
from lowbit.io.lazy import INDEX, shard_map
from lowbit.model.adapt import adapt
from lowbit.model.architectures import family_for
from lowbit.runtime import kvcache
from lowbit.runtime.qlinear import QuantLinear, set_module

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 1
HEADER = "lowbit.json"
HEADER_HASH = "header_sha256"
REBUILD = "Re-run `lowbit quantize` to rebuild the checkpoint."
WEIGHTS = "model.safetensors"


def header_digest(header: dict) -> str:
    """The sha256 of a header's canonical JSON: keys sorted, compact separators, without the hash field itself."""
    body = {k: v for k, v in header.items() if k != HEADER_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def unique_state_dict(model: nn.Module | dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict (of a model, or given) with tied tensors once, and the tied keys {dropped: kept}."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    state = model if isinstance(model, dict) else model.state_dict()
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = t
    return tensors, tied


def is_packed(key: str, qprefixes: tuple[str, ...]) -> bool:
    """Whether a state-dict key is a quantized layer's packed buffer (kept as is), not a float to store in 16 bits."""
    return key.startswith(qprefixes) and not key.endswith(".bias")


def storage_state_dict(model: nn.Module, dtype: torch.dtype, prefix: str = "",
                       state: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (floats outside packed buffers cast to `dtype`) and the tied keys {dropped: kept}; keys
    start with `prefix` (a block's place in the model). `state`: only these entries of the model's state dict."""
    qprefixes = tuple(prefix + n + "." for n in quantized_layers(model))
    state = {prefix + k: t for k, t in model.state_dict().items()} if state is None else state
    tensors, tied = unique_state_dict(state)
    for key, t in tensors.items():
        if t.is_floating_point() and not is_packed(key, qprefixes):
            t = t.to(dtype)
        tensors[key] = t.detach().contiguous().cpu()
    return tensors, tied


def layer_entries(model: nn.Module) -> dict[str, dict]:
    """The header's description of every quantized layer (format, shape, bias, bits per weight)."""
    return {name: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                   "spec": m.spec.to_dict(), "bits_per_weight": m.stored_bits() / (m.in_features * m.out_features),
                   **({"outliers": m.outliers} if m.outliers else {})}
            for name, m in quantized_layers(model).items()}


def save_checkpoint(model: nn.Module, out_dir: str | Path, *, dtype: torch.dtype, tokenizer=None,
                    overwrite: bool = False, info: dict | None = None, texts: dict[str, str] | None = None,
                    tensor_files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] | None = None) -> dict:
    """Write model (with QuantLinear layers) to out_dir atomically; returns the header written.

    `texts` are extra text files to include (e.g. recipe.yaml), `tensor_files` extra safetensors files (name →
    tensors, metadata; e.g. AWQ's scales); they are hashed like the others.
    """
    tensors, tied = storage_state_dict(model, dtype)
    with atomic_directory(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=WEIGHTS_METADATA)
        return write_metadata(tmp, model, layer_entries(model), tied, dtype=dtype, tokenizer=tokenizer, info=info,
                              texts=texts, tensor_files=tensor_files)


# One entry: safetensors writes metadata in a hash map's order, so two entries would make the bytes differ from run to
# run (the format version is in lowbit.json).
WEIGHTS_METADATA = {"format": "pt"}


def write_metadata(directory: Path, model: nn.Module, layers: dict, tied: dict[str, str], *, dtype: torch.dtype,
                   tokenizer=None, info: dict | None = None, texts: dict[str, str] | None = None,
                   tensor_files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] | None = None) -> dict:
    """Everything of a checkpoint but its weight files (already in `directory`): config, tokenizer, extra files,
    and last the header, which hashes every file. Returns the header."""
    from lowbit import __version__

    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for name, text in (texts or {}).items():
        (directory / name).write_text(text)
    for name, (extra, metadata) in (tensor_files or {}).items():
        save_file(extra, str(directory / name), metadata=metadata)
    files = {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    header = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
        **(info or {}),
        "dtype": str(dtype).removeprefix("torch."),
        "tied": tied, "layers": layers, "files": files,
        "bytes_on_disk": sum((directory / f).stat().st_size for f in files),
    }
    header = json.loads(json.dumps(header))  # as a reader sees it (lists for tuples, string keys): what is hashed
    header[HEADER_HASH] = header_digest(header)
    (directory / HEADER).write_text(json.dumps(header, indent=1))
    return header


def weight_files(path: Path) -> list[Path]:
    """A checkpoint's weight files: model.safetensors, or the shards its index names (a streamed quantization)."""
    if (path / INDEX).is_file():
        names = shard_map(path, "the checkpoint is damaged. Re-run `lowbit quantize`")
        return [path / n for n in sorted(set(names.values()))]
    return [path / WEIGHTS]


def read_header(path: str | Path) -> dict:
    """A checkpoint's header, refused if damaged: not JSON, not lowbit's, from a newer format, or not matching its
    own `header_sha256` (a header written before that field has none to check: see `header_hashed`)."""
    path = Path(path)
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"{str(path / HEADER)!r} is missing or not valid JSON ({e}); the checkpoint is "
                          f"damaged. {REBUILD}") from None
    layers = header.get("layers") if isinstance(header, dict) else None
    if not isinstance(layers, dict) or header.get("format") != FORMAT_NAME:
        raise LowbitError(f"{str(path)!r} does not hold a lowbit checkpoint header.")
    version = header.get("format_version", 0)
    if not isinstance(version, int):
        raise LowbitError(f"{str(path / HEADER)!r} is damaged: its format_version is {version!r}. {REBUILD}")
    if version > FORMAT_VERSION:
        raise LowbitError(f"{str(path)!r} was written by a newer lowbit (format {version}); upgrade lowbit to read "
                          f"it.")
    if header_hashed(header) and header[HEADER_HASH] != (digest := header_digest(header)):
        raise LowbitError(f"{str(path / HEADER)!r} was edited or damaged: its contents hash to {digest[:16]}…, not "
                          f"to the {str(header[HEADER_HASH])[:16]}… its {HEADER_HASH} field records, so none of its "
                          f"fields (bits per weight, recipe, layer formats) can be trusted. {REBUILD}")
    return header


def header_hashed(header: dict) -> bool:
    """Whether the header carries its own hash (written by a lowbit that hashes headers)."""
    return HEADER_HASH in header


def verify_files(path: Path, header: dict) -> None:
    for name, digest in header.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise LowbitError(f"checkpoint {str(path)!r} is incomplete: {name} is missing. Re-run `lowbit quantize`.")
        if sha256(f) != digest:
            raise LowbitError(f"checkpoint file {str(f)!r} fails its sha256 check: it was changed or corrupted after "
                              f"lowbit wrote it. Re-run `lowbit quantize` to rebuild the checkpoint.")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, verify: bool = True) -> nn.Module:
    """A transformers model whose quantized layers are QuantLinear modules holding the packed weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    header = read_header(path)
    if verify:
        verify_files(path, header)
    config = AutoConfig.from_pretrained(path)
    family = family_for(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = adapt(AutoModelForCausalLM.from_config(config, dtype=dtype))
    recipe = header.get("recipe") or {}
    static_kv = kvcache.attention_modules(model, family.blocks) if recipe.get("kv_static") else None
    for attn in static_kv or ():
        attn.register_buffer("k_scale", torch.empty((), device="meta"))
        attn.register_buffer("v_scale", torch.empty((), device="meta"))
    edited = f"The checkpoint's header ({HEADER}) was edited or damaged after lowbit wrote it. {REBUILD}"
    for name, layer in header["layers"].items():
        try:
            set_module(model, name, QuantLinear(layer["in_features"], layer["out_features"],
                                                LayerSpec.from_dict(layer["spec"]), layer["bias"], device="meta",
                                                bias_dtype=dtype, outliers=layer.get("outliers", 0)))
        except (LowbitError, KeyError, TypeError, ValueError, AttributeError) as e:
            why = str(e).split(". ")[0] if isinstance(e, LowbitError) else f"{type(e).__name__}: {e}"
            raise LowbitError(f"layer {name}'s entry in {str(path / HEADER)!r} cannot describe a layer of this model "
                              f"({why}). {edited}") from None
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise LowbitError(f"could not read {str(file)!r}: {e}") from None
    tied = header.get("tied", {})
    assign_tensors(model, tensors, set(model.state_dict()) - set(tied), tied,
                   tuple(n + "." for n in header["layers"]), dtype, f"checkpoint {str(path)!r}", layers_from=HEADER,
                   layer_remedy=edited)
    for attn in static_kv or ():
        attn.k_scale, attn.v_scale = attn.k_scale.float(), attn.v_scale.float()
    if recipe.get("kv_cache"):
        kvcache.enable(model, recipe["kv_cache"], attention="attention" in (recipe.get("parts") or ()),
                       static=static_kv)
    model.lowbit_header = header
    return model.eval()


OTHER_VERSION = "It may come from another version of the tool that wrote it or of transformers."


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], expected: set[str], tied: dict[str, str],
                   qprefixes: tuple[str, ...], dtype: torch.dtype, where: str, *,
                   layers_from: str = "its quantization config", layer_remedy: str = OTHER_VERSION) -> None:
    """Second phase of a two-phase load: check that `tensors` has exactly the `expected` keys, each of the shape (and,
    for packed buffers, the dtype) the built model has for it, cast floats outside packed buffers to `dtype`, assign
    them, tie {dropped: kept} tensors, and refuse anything left on meta. A mismatch is refused naming the quantized
    layer whose description (in `layers_from`) disagrees, ending with `layer_remedy` (else OTHER_VERSION)."""
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        layer = _layer_of((missing + unexpected)[0], qprefixes)
        raise LowbitError(f"{where} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
                          f"{f' (layer {layer} as {layers_from} describes it)' if layer else ''}. "
                          f"{layer_remedy if layer else OTHER_VERSION}")
    built = model.state_dict()
    for key, t in tensors.items():
        want, packed = built[key], is_packed(key, qprefixes)
        if t.shape != want.shape or (packed and t.dtype != want.dtype):
            layer, stored = _layer_of(key, qprefixes), f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            wanted = f"{list(want.shape)} {str(want.dtype).removeprefix('torch.')}"
            what = f"layer {layer}'s entry in {layers_from}" if layer else "the model's config"
            raise LowbitError(f"{where}: {what} disagrees with the stored tensors: {key} is {stored} on disk, "
                              f"{wanted} by the {'entry' if layer else 'config'}. "
                              f"{layer_remedy if layer else OTHER_VERSION}")
        if t.is_floating_point() and not packed:
            tensors[key] = t.to(dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    for dropped, kept in tied.items():
        _tie(model, dropped, kept)
    leftover = [n for n, t in model.state_dict().items() if t.is_meta]
    if leftover:
        raise LowbitError(f"{where} left tensors uninitialized: {leftover[:3]}.")


def _layer_of(key: str, qprefixes: tuple[str, ...]) -> str | None:
    return next((p[:-1] for p in qprefixes if key.startswith(p)), None)


def _tie(model: nn.Module, dropped: str, kept: str) -> None:
    kept_mod, _, kept_attr = kept.rpartition(".")
    drop_mod, _, drop_attr = dropped.rpartition(".")
    setattr(model.get_submodule(drop_mod), drop_attr, getattr(model.get_submodule(kept_mod), kept_attr))
