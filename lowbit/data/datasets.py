"""Local datasets: where the data folder is, and the text of each named set.

Offline, data is read from `LOWBIT_DATA` if set, else `../shared/data` next to the checkout. Names:
`c4` (calibration: documents 0–511 of the C4 validation sample), `wikitext2` (validation split) and `ptb`
(validation split), or a path to a .txt file, or a .json / .jsonl file of {"text": ...} records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowbit.errors import LowbitError

C4_CALIBRATION_DOCS = range(0, 512)


def data_root() -> Path:
    env = os.environ.get("LOWBIT_DATA")
    candidates = [Path(env)] if env else [Path(__file__).resolve().parents[3] / "shared" / "data",
                                          Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise LowbitError(f"no data folder found (looked in {', '.join(map(str, candidates))}). Set LOWBIT_DATA to a "
                      f"folder laid out like ../shared/data (c4/, wikitext-2/, ptb/), or pass a text file path.")


def _read(path: Path) -> str:
    if not path.is_file():
        raise LowbitError(f"dataset file {str(path)!r} does not exist.")
    return path.read_text(encoding="utf-8")


def records_text(path: Path) -> list[str]:
    """Texts of a .txt file (one text), a .json list of records, or a .jsonl file of records with 'text'."""
    raw = _read(path)
    try:
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        elif path.suffix == ".json":
            items = json.loads(raw)
        else:
            return [raw]
    except json.JSONDecodeError as e:
        raise LowbitError(f"{str(path)!r} is not valid JSON ({e}).") from None
    if not isinstance(items, list) or not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in items):
        raise LowbitError(f"{str(path)!r} must hold a list of records with a 'text' field.")
    return [r["text"] for r in items]


_CALIBRATION_FILES = {"c4": "c4/c4-validation-sample.json", "wikitext2": "wikitext-2/valid.txt",
                      "ptb": "ptb/ptb.valid.txt"}
_EVALUATION_FILES = {"wikitext2": "wikitext-2-raw/wiki.test.raw", "ptb": "ptb/ptb.test.txt",
                     "c4": "c4/c4-validation-sample.json"}


def calibration_file(name: str) -> Path:
    """The file a calibration set is read from, checked to exist (a named set's, or the path given)."""
    return _dataset_file(name, _CALIBRATION_FILES, "calibration set", "a .txt, .json or .jsonl file")


def evaluation_file(name: str) -> Path:
    """The file a perplexity corpus is read from, checked to exist (a named set's, or the path given)."""
    return _dataset_file(name, _EVALUATION_FILES, "perplexity set", "a text file")


def _dataset_file(name: str, files: dict[str, str], what: str, other: str) -> Path:
    if name.lower() in files:
        path = data_root() / files[name.lower()]
        if not path.is_file():
            raise LowbitError(f"{what} {name!r} is read from {str(path)!r}, which does not exist. Set LOWBIT_DATA to a "
                              f"folder laid out like ../shared/data, or give the path of {other} instead.")
        return path
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise LowbitError(f"unknown {what} {name!r}: use one of {', '.join(files)} or the path of {other}"
                      + (f" ({str(path)!r} does not exist)." if path.suffix else "."))


def calibration_texts(name: str) -> list[str]:
    """The texts of a calibration set (never the evaluation splits)."""
    path = calibration_file(name)
    if name.lower() == "c4":
        docs = records_text(path)
        return [docs[i] for i in C4_CALIBRATION_DOCS if i < len(docs)]
    return [_read(path)] if name.lower() in _CALIBRATION_FILES else records_text(path)


def wikitext2_test_rows() -> list[str]:
    """The Hugging Face rows of `wikitext-2-raw-v1` test, rebuilt from the raw file (data/SOURCES.md).

    Each line keeps its trailing newline (row 1 is ' = Robert Boulter = \\n'); a blank line, whitespace only in
    the file (' \\n'), is the empty row ''.
    """
    raw = _read(evaluation_file("wikitext2"))
    lines = raw.split("\n")
    rows = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return ["" if not row.strip() else row for row in rows]


def wikitext2_test_text() -> str:
    """WikiText-2 raw test as the GPTQ protocol joins it (and AutoGPTQ and GPTQModel after it): the Hugging Face
    rows joined by "\\n\\n"."""
    return "\n\n".join(wikitext2_test_rows())


C4_EVAL_DOCS = range(512, 1025)


def evaluation_text(name: str) -> str:
    """A perplexity corpus joined as the GPTQ paper does: WikiText-2 test ("\\n\\n"), PTB test (" "),
    C4 evaluation documents 512–1024 of the sample (" "), or any text file."""
    path, key = evaluation_file(name), name.lower()
    if key == "wikitext2":
        return wikitext2_test_text()
    if key == "ptb":
        return " ".join(_read(path).split("\n"))
    if key == "c4":
        docs = records_text(path)
        return " ".join(docs[i] for i in C4_EVAL_DOCS if i < len(docs))
    return "\n\n".join(records_text(path))
