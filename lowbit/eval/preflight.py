"""What an evaluation can check before any model loads: that its data files exist and its outputs can be written.

An evaluation takes minutes to hours; a missing corpus, an unknown task or an output that cannot be written must
stop it at once, not after the work (whose results would then be lost).
"""

from __future__ import annotations

from pathlib import Path

from lowbit.data.datasets import evaluation_file
from lowbit.eval.tasks import load_task
from lowbit.io.atomic import check_writable_file


def check_eval_inputs(cfg, outputs: dict[str, str | Path | None] | None = None) -> None:
    """Refuse a missing or unknown --ppl/--kl-text corpus, a task whose data is missing, and an output file
    (--save-reference, and `outputs`: flag → path, e.g. --json and --report) that cannot be written."""
    for name in (*cfg.kl_text, *cfg.ppl):
        evaluation_file(name)
    for task in cfg.tasks:
        load_task(task)  # reads its data: well under a second for the largest (HellaSwag, MMLU)
    for flag, path in {"--save-reference": cfg.save_reference, **(outputs or {})}.items():
        if path:
            check_writable_file(path, flag)
