"""Calibration plumbing: capture the inputs of decoder block 0, and run one block on stored inputs.

Only the modules before the first block (embeddings, rotary tables) and one block at a time need to be on the
compute device; captured activations live on `offload` (the CPU) between blocks.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lowbit.model.architectures import Family, ScaleGroup, decoder_blocks, optional_submodule, text_config


class StopForward(Exception):
    """Raised by a hook when nothing later in the forward pass is needed (the rest of the pass is skipped)."""


@dataclass
class BlockInputs:
    """Per calibration batch: the block's hidden states and the keyword arguments the model passed with them.

    Where blocks differ in kind (Gemma's sliding-window and global attention layers get other masks and rotary
    tables), `layer_types` gives each block's kind and `by_type` the keyword arguments of each kind, per batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    layer_types: list[str] | None = None
    by_type: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @classmethod
    def concat(cls, parts: list[BlockInputs]) -> BlockInputs:
        """The batches of several captures one after another (sequences of different lengths, captured apart)."""
        if not parts:
            return cls()
        return cls([h for p in parts for h in p.hidden], [kw for p in parts for kw in p.kwargs], parts[0].layer_types,
                   {t: [kw for p in parts for kw in p.by_type[t]] for t in parts[0].by_type})

    def with_hidden(self, hidden: list[torch.Tensor], kwargs: list[dict] | None = None) -> BlockInputs:
        return replace(self, hidden=hidden, kwargs=self.kwargs if kwargs is None else kwargs)

    def for_block(self, i: int) -> BlockInputs:
        """The same hidden states with block i's keyword arguments."""
        return self if self.layer_types is None else self.with_hidden(self.hidden, self.by_type[self.layer_types[i]])


def layer_types(model: nn.Module, blocks: int) -> list[str] | None:
    """Each block's kind from the config's `layer_types`, when the blocks are of more than one kind."""
    types = list(getattr(text_config(model), "layer_types", None) or [])
    return types if len(types) == blocks and len(set(types)) > 1 else None


class DiskSpill:
    """Where calibration activations live when they do not fit in host memory: each tensor in its own file under
    `directory`, mapped into memory (the kernel writes pages back and drops them as it needs room, so what does not
    fit stays on disk). A file is unlinked as soon as it is mapped: its space is freed with its tensor."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="lowbit-spill-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self._names = itertools.count()
        weakref.finalize(self, shutil.rmtree, self.directory, True)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        path = self.directory / f"{next(self._names)}.bin"
        out = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        os.unlink(path)
        return out.copy_(t)

    def __str__(self) -> str:
        return f"disk ({self.directory})"


Where = torch.device | str | DiskSpill  # a device, or the disk


def stash(t: torch.Tensor, where: Where) -> torch.Tensor:
    """A large activation moved to where activations are kept between uses."""
    return where.put(t) if isinstance(where, DiskSpill) else t.to(where)


def to_device(obj, device: Where, dtype: torch.dtype | None = None):
    """Move the tensors inside nested tuples, lists and dicts (floating ones cast to `dtype`, when given); to the
    host, when `device` is the disk (these are the small keyword arguments)."""
    if isinstance(device, DiskSpill):
        device = "cpu"
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, family: Family, ids: torch.Tensor, device: torch.device | str,
                         batch_size: int = 8, offload: torch.device | str = "cpu",
                         dtype: torch.dtype | None = None) -> BlockInputs:
    """Run the model on ids [n, seqlen] until block 0 and keep block 0's inputs (cast to `dtype`, when given: the
    precision the blocks will run in). Where blocks differ in kind, the pass goes on to the first block of each
    kind and keeps its keyword arguments too (through blocks that are not loaded, unchanged)."""
    blocks = decoder_blocks(model, family)
    types = layer_types(model, len(blocks))
    firsts = {t: types.index(t) for t in types} if types else {}
    store = BlockInputs(layer_types=types, by_type={t: [] for t in firsts})
    last = max(firsts.values(), default=0)
    # the modules the pass runs: those before block 0, and the blocks before the first block of the last kind; of
    # these, blocks whose weights are not loaded (on the meta device: the model is read from disk block by block)
    # pass their input on, since what a block of each kind is given besides it does not depend on it
    loaded = {i: not any(p.is_meta for p in b.parameters()) for i, b in enumerate(blocks[:last])}
    unloaded = [blocks[i] for i, yes in loaded.items() if not yes]
    pre = [m for p in family.pre_block if (m := optional_submodule(model, p)) is not None] + \
        [blocks[i] for i, yes in loaded.items() if yes]

    def hook_for(i: int):
        def hook(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            moved = to_device(kwargs, offload, dtype)
            if i == 0:
                store.hidden.append(stash(hidden.detach().to(dtype or hidden.dtype), offload))
                store.kwargs.append(moved)
            for t, first in firsts.items():
                if first == i:
                    store.by_type[t].append(moved)
            if i == last:
                raise StopForward
        return hook

    handles = [blocks[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in {0, *firsts.values()}]
    homes = [next(m.parameters(), torch.empty(0)).device for m in pre]  # weights go back here, not to `offload`
    for b in unloaded:
        b.forward = _pass_on
    try:
        for m in pre:
            m.to(device)
        for batch in ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        for b in unloaded:
            del b.forward
        for m, home in zip(pre, homes, strict=True):
            m.to(home)
    return store


def _pass_on(*args, **kwargs) -> torch.Tensor:
    """A decoder block's forward that returns its hidden states unchanged."""
    return args[0] if args else kwargs["hidden_states"]


def squared_error(a: torch.Tensor, b: torch.Tensor | float) -> float:
    """‖a − b‖² in float32, as a Python float."""
    return (a.float() - b).pow(2).sum().item()


def first_batches(inputs: BlockInputs, n: int) -> BlockInputs:
    return inputs.with_hidden(inputs.hidden[:n], inputs.kwargs[:n])


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device | str,
              offload: torch.device | str = "cpu", before_batch=None) -> BlockInputs:
    """The block's outputs on every stored batch, with the same keyword arguments (the next block's inputs).

    `before_batch()` is called before each batch; a hook that raises StopForward ends that batch early (its output
    is then left out, so a caller that stops early must not use the outputs).
    """
    out = inputs.with_hidden([])
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        if before_batch is not None:
            before_batch()
        try:
            y = block(hidden.to(device), **to_device(kwargs, device))
        except StopForward:
            continue
        y = y[0] if isinstance(y, tuple) else y
        out.hidden.append(stash(y, offload))
    return out


@dataclass
class GroupInputs:
    """What one scaling group's `inspect` module received on the calibration batches."""

    group: ScaleGroup
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    @property
    def x(self) -> list[torch.Tensor]:
        """The layers' common input, per batch (the inspect module's first argument)."""
        return [a[0] for a in self.args]


@torch.no_grad()
def capture_group_inputs(block: nn.Module, groups: list[ScaleGroup], inputs: BlockInputs, device,
                         max_batches: int | None = None) -> list[GroupInputs]:
    """Run the block on (the first `max_batches` of) the calibration inputs and keep each group's inspect-module
    arguments, on `device`. Each batch stops once every inspect module has been reached."""
    captured = [GroupInputs(g) for g in groups]
    dtype = next(block.parameters()).dtype
    remaining: set[int] = set()

    def hook_for(i):
        def hook(_module, args, kwargs):
            kwargs = dict(kwargs)
            if not args:  # called as module(hidden_states=x, ...): keep x first, as the layers' input
                args = (kwargs.pop("hidden_states"),)
            captured[i].args.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
            captured[i].kwargs.append(kwargs)
            remaining.discard(i)
            if not remaining:
                raise StopForward
        return hook

    handles = [block.get_submodule(g.inspect).register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i, g in enumerate(groups)]
    try:
        for hidden, kwargs in list(zip(inputs.hidden, inputs.kwargs, strict=True))[:max_batches]:
            remaining.update(range(len(groups)))
            try:
                block(hidden.to(device, dtype), **to_device(kwargs, device, dtype))
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return captured
