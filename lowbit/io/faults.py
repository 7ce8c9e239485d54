"""Fault injection for the resume tests: `LOWBIT_FAULT=POINT:INDEX` kills this process (SIGKILL: no cleanup, no
`finally`) when it reaches that point, e.g. `block-mid:3` (block 3's layers quantized, its outputs not yet
computed), `block-written:3` (its shard written, the checkpoint not yet committed), `commit-inputs:3` (the next
block's inputs saved, the progress not yet), `block-end:3` (committed; the last two are reached in the thread that
writes the checkpoint, while block 4 runs).
Unset, a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal


def fault_point(point: str, index: int) -> None:
    if os.environ.get("LOWBIT_FAULT") == f"{point}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)
