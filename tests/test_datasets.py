"""The WikiText-2 text of the standard perplexity protocol (GPTQ's code, AutoGPTQ, GPTQModel)."""

from __future__ import annotations

import pytest

import lowbit
from lowbit.data.datasets import data_root, wikitext2_test_rows, wikitext2_test_text
from lowbit.eval.perplexity import ppl, token_nll, windows


def test_rows_are_the_hugging_face_rows():
    rows = wikitext2_test_rows()
    assert len(rows) == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert rows[3].startswith(" Robert Boulter is an English film") and rows[3].endswith(" and Dominic Hall . \n")
    # every non-empty row keeps exactly one trailing newline; blank rows are '' (never ' ' or '\n')
    assert all(r == "" or (r.endswith("\n") and "\n" not in r[:-1] and r.strip()) for r in rows)
    raw_lines = (data_root() / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines()
    assert sum(r == "" for r in rows) == sum(not line.strip() for line in raw_lines)


def test_joined_text_and_its_tokens(stories_tokenizer):
    text = wikitext2_test_text()
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert text.endswith(" Eddie Pelkey . \n\n\n")
    ids = stories_tokenizer(text, verbose=False).input_ids
    assert ids[:12] == [1, 410, 13, 13, 410, 64, 410, 461, 414, 430, 285, 413]
    assert len(ids) == 815070


@pytest.mark.slow
def test_smollm2_tokens_and_perplexity_of_the_protocol_text():
    """18.838 is what the protocol's own code gives for SmolLM2-135M on its first 2 windows of 2048 (issue 12)."""
    tok = lowbit.load_tokenizer("smollm2-135m")
    ids = tok(wikitext2_test_text(), verbose=False).input_ids
    assert tok.convert_ids_to_tokens(ids[:9]) == ["ĊĊ", "Ġ=", "ĠRobert", "ĠB", "oul", "ter", "Ġ=", "ĠĊĊ", "ĊĊĊ"]
    assert len(ids) == 304986
    model = lowbit.load("smollm2-135m")
    assert ppl(token_nll(model, windows(tok, "wikitext2", 2048, 2), progress=False)) == pytest.approx(18.838, abs=2e-3)
