"""Shared fixtures: the real tiny model stories260K from ../shared, and helpers."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit

SHARED = Path(os.environ.get("LOWBIT_SHARED") or Path(__file__).resolve().parents[2] / "shared")
STORIES = SHARED / "models" / "stories260K"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog."


@pytest.fixture(scope="session")
def stories_path() -> Path:
    assert (STORIES / "config.json").is_file(), f"test model missing: {STORIES} (../shared beside the checkout)"
    return STORIES


@pytest.fixture(scope="session")
def _stories(stories_path):
    return lowbit.load(stories_path)


@pytest.fixture()
def stories(_stories):
    """A fresh float copy of stories260K (tests may quantize it in place)."""
    return copy.deepcopy(_stories)


@pytest.fixture(scope="session")
def stories_tokenizer(stories_path):
    return lowbit.load_tokenizer(stories_path)


@pytest.fixture(scope="session")
def story_ids(stories_tokenizer) -> torch.Tensor:
    return stories_tokenizer(STORY, return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def llama_logits():
    """llama.cpp's (llama-cpp-python's) logits for token ids [1, T] on a GGUF file, as a [T, vocab] array."""
    llama_cpp = pytest.importorskip("llama_cpp")

    def run(path, ids: torch.Tensor, n_ctx: int = 64) -> np.ndarray:
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)
        llm.eval(ids[0].tolist())
        return np.array(llm.scores[: ids.shape[1]])

    return run
