"""Quantizing from disk against loading the whole model, side by side: peak resident host memory and wall time.

A Llama-shaped model with generated float32 weights in 400 MB safetensors shards (default: 20 blocks, hidden 2048,
MLP 5632, 4.1 GB), RTN w4a16 g128 on the CPU, once block by block from disk (lowbit's default) and once with
`--in-memory`. Each run is a child of a small watcher process, whose RUSAGE_CHILDREN peak is that run's alone.

    python benchmarks/streaming_memory.py [--layers 20] [--method rtn] [--dir /tmp/lowbit-streaming]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from lowbit.hardware import run_measured

TESTS = Path(__file__).resolve().parents[1] / "tests"


def peak_and_time(argv: list[str]) -> tuple[int, float]:
    run = run_measured(argv)
    if run.returncode:
        raise SystemExit(f"{argv} failed: {run.stderr[-2000:]}")
    return run.peak_rss_bytes, run.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--method", default="rtn")
    p.add_argument("--dir", default="/tmp/lowbit-streaming")
    args = p.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    made = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
                           "from test_streaming import make_sharded_model as m; from pathlib import Path; "
                           f"print(m(Path({str(root / 'model')!r}), {args.layers}, 2048, 5632))"],
                          capture_output=True, text=True, check=True)
    size = int(made.stdout.split()[-1])
    rows = {}
    for name, extra in (("from disk", []), ("in memory", ["--in-memory"])):
        out = root / name.replace(" ", "-")
        argv = [sys.executable, "-m", "lowbit", "quantize", str(root / "model"), "--out", str(out), "--method",
                args.method, "--group-size", "128", "--device", "cpu", "--quiet"]
        rows[name] = peak_and_time(argv + extra)
        header = json.loads((out / "lowbit.json").read_text())
        print(f"{name}: peak {rows[name][0] / 1e9:.2f} GB (lowbit.json: "
              f"{(header.get('memory') or {}).get('peak_host_bytes', 0) / 1e9:.2f} GB), {rows[name][1]:.1f} s",
              flush=True)
    disk, whole = rows["from disk"], rows["in memory"]
    print(f"model {size / 1e9:.2f} GB on disk ({args.layers} blocks); peak host memory from disk "
          f"{disk[0] / 1e9:.2f} GB = {disk[0] / size:.2f}× the model, in memory {whole[0] / 1e9:.2f} GB = "
          f"{whole[0] / size:.2f}×; time from disk / in memory = {disk[1] / whole[1]:.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
