"""A streamed quantization's work folder: the output being built, and what a killed run needs to go on.

`<parent>/.<out>.lowbit-work/` holds the finished blocks' shards under their final names and `resume/`:
`identity.json` (what the run quantizes and how: a resume with anything else is refused, naming the difference)
and, after each block, `inputs-<next>.pt` (the next block's calibration inputs) then `progress-<next>.pt` (the
blocks' reports, the transform's scales, the pipeline's checks, the RNG state). Each file is written to a
temporary name and renamed, and the progress file is written last: a run killed at any point (SIGKILL included)
leaves the last committed block as the place to resume from. A block's files are written by a background thread
while the next block is quantized (an 8B-class block's inputs are 1-2 GB); each commit first waits for the one
before it, so at most one is in flight, and its error, if any, is raised there. When the output is complete,
`resume/` is removed and the folder renamed to the output.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.io.faults import fault_point
from lowbit.model.capture import BlockInputs
from lowbit.pipeline import PipelineResult

WORK_SUFFIX = ".lowbit-work"


def work_path(out: Path) -> Path:
    return out.parent / f".{out.name}{WORK_SUFFIX}"


class _KeepsWriteErrors:
    """A file whose write errors are kept, for the caller to raise in place of torch.save's RuntimeError."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary name, flushed to disk, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            writes = _KeepsWriteErrors(f)
            try:
                torch.save(obj, writes)
            except RuntimeError:
                if writes.error is not None:  # torch.save reports a full disk as its own "unexpected pos"
                    raise writes.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@dataclass
class Resumed:
    next_block: int
    inputs: BlockInputs | None
    result: PipelineResult


class WorkDir:
    def __init__(self, out: str | Path) -> None:
        self.out = Path(out).expanduser()
        self.path = work_path(self.out)
        self.state = self.path / "resume"
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def exists(self) -> bool:
        return (self.state / "identity.json").is_file()

    def finished_blocks(self) -> int:
        return max((int(p.stem.split("-")[1]) for p in self.state.glob("progress-*.pt")), default=0)

    def start(self, identity: dict) -> None:
        """A new work folder (an old one is replaced) for a run of this identity."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.state.mkdir(parents=True)
        tmp = self.state / ".identity.json.partial"
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True, default=str))
        os.replace(tmp, self.state / "identity.json")

    def check(self, identity: dict) -> None:
        """Refuse to resume a run of another model, recipe or calibration, naming what differs."""
        try:
            theirs = json.loads((self.state / "identity.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LowbitError(f"the work folder {str(self.path)!r} is damaged ({e}); delete it and start again.") \
                from None
        mine = json.loads(json.dumps(identity, sort_keys=True, default=str))
        differ = _differences(theirs, mine)
        if differ:
            what = "; ".join(f"{k}: {_short(a)} there, {_short(b)} now" for k, a, b in differ[:3])
            raise LowbitError(f"--resume: the interrupted run in {str(self.path)!r} was made with another "
                              f"{differ[0][0].split('.')[0]} ({what}). Run the same command as before to resume it, "
                              f"or delete that folder to start over.")

    def commit(self, next_block: int, inputs: BlockInputs | None, result: PipelineResult) -> None:
        """Record, in the background, that every block before `next_block` is written: its inputs first, then the
        progress (what it holds is taken now: the RNG state, copies of the reports)."""
        self.wait()
        progress = {"next_block": next_block, "blocks": list(result.blocks), "scales": dict(result.scales),
                    "verified": dict(result.verified), "rng": torch.get_rng_state()}
        self._writer = threading.Thread(target=self._write, args=(next_block, inputs, progress),
                                        name="lowbit-checkpoint")
        self._writer.start()

    def wait(self) -> None:
        """Wait for the commit in flight; raise what it raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def settle(self) -> None:
        """Wait for the commit in flight without raising its error (the caller is reporting another); a second
        Ctrl-C stops the wait."""
        try:
            if self._writer is not None:
                self._writer.join()
        except KeyboardInterrupt:
            pass
        self._writer, self._error = None, None

    def _write(self, next_block: int, inputs: BlockInputs | None, progress: dict) -> None:
        try:
            if inputs is not None:
                save_atomic(inputs, self.state / f"inputs-{next_block:05d}.pt")
            fault_point("commit-inputs", next_block - 1)
            save_atomic(progress, self.state / f"progress-{next_block:05d}.pt")
            for old in self.state.glob("*-*.pt"):
                if int(old.stem.split("-")[1]) < next_block:
                    old.unlink(missing_ok=True)
            fault_point("block-end", next_block - 1)
        except BaseException as e:
            self._error = e

    def load(self) -> Resumed | None:
        """The last committed state, or None when no block was finished."""
        n = self.finished_blocks()
        if n == 0:
            return None
        progress = torch.load(self.state / f"progress-{n:05d}.pt", weights_only=False)
        inputs_file = self.state / f"inputs-{n:05d}.pt"
        # mapped, not read: activations larger than host memory come back as they were kept
        inputs = torch.load(inputs_file, weights_only=False, mmap=True) if inputs_file.is_file() else None
        torch.set_rng_state(progress["rng"])
        result = PipelineResult(blocks=progress["blocks"], scales=progress["scales"], verified=progress["verified"])
        return Resumed(n, inputs, result)

    def finish(self, overwrite: bool) -> None:
        """Drop the resume state and move the completed folder to the output (replacing it only if asked)."""
        self.wait()
        shutil.rmtree(self.state)
        if self.out.exists():
            if not overwrite:
                raise LowbitError(f"output directory {str(self.out)!r} appeared while quantizing; the result is in "
                                  f"{str(self.path)!r}.")
            old = self.out.with_name(f".{self.out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.out, old)
            os.rename(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.path, self.out)


def _differences(a, b, where: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) wherever two JSON values differ, down into dictionaries."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted({*a, *b}) for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)]
    return [] if a == b else [(where, a, b)]


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
