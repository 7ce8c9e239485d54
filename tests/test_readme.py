"""The README's Python section runs as written: its code blocks, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_section_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_the_python_section_runs(tmp_path, monkeypatch, capsys):
    blocks = python_section_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    # what the comments promise: the fitted group size, the bits per weight, the measures, the exported files
    assert out.startswith("64 4.25\n"), out
    assert re.search(r"KL \d\.\d{3}, token rejection \d+\.\d%", out)
    report = namespace["report"]
    assert 0 < report.kl_mean < 1 and report.to_dict()["kl"]["all"]["mean"] == report.kl_mean
    assert (tmp_path / "out" / "py-w4" / "lowbit.json").is_file()
    assert (tmp_path / "out" / "py-w8-ct" / "config.json").is_file()
    assert namespace["result"].recipe.ignore == ("down_proj",)
