"""Quantizing from disk: a run killed anywhere (SIGKILL) resumes to the same bytes as an uninterrupted run; a
resume of another run is refused; host memory stays far below the model's size."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.hardware import run_measured
from lowbit.io.checkpoint import HEADER
from lowbit.model.loading import builtin_checkpoint

QUICK_CALIB = ["--calib-samples", "4", "--calib-seqlen", "64"]


def quantize(model: str | Path, out: Path, *args: str, fault: str | None = None,
             max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`lowbit quantize` in a child process; `fault` kills it at that point, `max_file_bytes` makes every write past
    that size fail as a full disk does (RLIMIT_FSIZE, with SIGXFSZ ignored: the write returns EFBIG)."""
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_FAULT"}
    if fault:
        env["LOWBIT_FAULT"] = fault

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(model), "--out", str(out), "--quiet",
                           "--device", "cpu", *args], capture_output=True, text=True, env=env,
                          preexec_fn=limit if max_file_bytes else None)


def files(directory: Path) -> dict[str, bytes]:
    """Every file of a checkpoint but its header, whose timings differ from run to run (it hashes the others)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != HEADER}


def check_resumes(model, tmp_path: Path, args: list[str], faults: list[str]) -> None:
    whole = tmp_path / "whole"
    done = quantize(model, whole, *args)
    assert done.returncode == 0, done.stderr
    expected = files(whole)
    assert any(name.startswith("model-") for name in expected)
    for fault in faults:
        out = tmp_path / fault.replace(":", "-")
        killed = quantize(model, out, *args, fault=fault)
        assert killed.returncode == -9, (fault, killed.stderr)
        assert not out.exists() and (tmp_path / f".{out.name}.lowbit-work").is_dir()
        again = quantize(model, out, *args)
        assert again.returncode == 2 and "--resume" in again.stderr and "blocks finished" in again.stderr
        resumed = quantize(model, out, *args, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming" in resumed.stderr or (fault.endswith(":0") and fault.startswith("block-mid"))
        assert files(out) == expected, fault
        assert json.loads((out / HEADER).read_text())["files"] == json.loads((whole / HEADER).read_text())["files"]
        assert not (tmp_path / f".{out.name}.lowbit-work").exists()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_killed_runs_resume_bit_identically(stories_path, tmp_path, method):
    """Killed at a block boundary (after block 1 is committed), between a block's shard and its commit, inside the
    background commit (the next inputs saved, the progress not), and in the middle of a block (its layers quantized,
    its outputs not yet computed)."""
    args = ["--method", method, "--group-size", "4", *QUICK_CALIB]
    check_resumes(stories_path, tmp_path, args, ["block-end:1", "block-written:2", "commit-inputs:2", "block-mid:3"])


def test_a_resume_of_another_run_is_refused(stories_path, tmp_path):
    out = tmp_path / "q"
    assert quantize(stories_path, out, "--group-size", "4", fault="block-end:1").returncode == -9
    other = quantize(stories_path, out, "--group-size", "2", "--resume")
    said = " ".join(other.stderr.split())
    assert other.returncode == 2 and "another recipe (recipe.group_size: 4 there, 2 now)" in said, said
    assert "delete that folder" in said


def test_a_full_disk_is_said_and_the_run_resumes(stories_path, tmp_path):
    """A write fails for lack of room after the first block's shard: a clear error, no output, the work kept; once
    there is room, --resume finishes it, the same bytes as a run that never failed. In memory, nothing is left."""
    args = ["--method", "gptq", "--group-size", "4", *QUICK_CALIB]
    assert quantize(stories_path, tmp_path / "whole", *args).returncode == 0
    # room for a block's shard, not for the next block's inputs nor the embeddings' shard
    shards = sorted(p.stat().st_size for p in (tmp_path / "whole").glob("model-*.safetensors"))
    room = shards[0] + 4096
    assert room < shards[-1]
    full = quantize(stories_path, tmp_path / "q", *args, max_file_bytes=room)
    said = " ".join(full.stderr.split())
    assert full.returncode == 2 and "a file grew past the size this process may write" in said, full.stderr
    assert "make room, then resume with" in said and "Traceback" not in full.stderr
    assert not (tmp_path / "q").exists()
    assert not [p for p in (tmp_path / ".q.lowbit-work").rglob("*") if p.name.endswith(".partial")]
    resumed = quantize(stories_path, tmp_path / "q", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert files(tmp_path / "q") == files(tmp_path / "whole")
    whole = quantize(stories_path, tmp_path / "m", *args, "--in-memory", max_file_bytes=room)
    assert whole.returncode == 2 and "Nothing was written in its place" in " ".join(whole.stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "whole"]


def test_a_full_disk_while_checkpointing_inputs_is_an_os_error(tmp_path):
    """The next block's inputs are saved in the background: a full disk there is raised by the next commit as the
    OS's error (torch.save's own is an "unexpected pos" RuntimeError), and no partial file is left."""
    code = f"""
import errno, resource, signal, torch
from pathlib import Path
from lowbit.io.workdir import WorkDir
from lowbit.model.capture import BlockInputs
from lowbit.pipeline import PipelineResult
work = WorkDir(Path({str(tmp_path / "q")!r}))
work.start({{"model": "m"}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
work.commit(1, BlockInputs(hidden=[torch.zeros(100_000)], kwargs=[{{}}]), PipelineResult())
try:
    work.commit(2, None, PipelineResult())
except OSError as e:
    print("raised", errno.errorcode[e.errno])
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split() == ["raised", "EFBIG"], run.stderr
    assert sorted(p.name for p in (tmp_path / ".q.lowbit-work" / "resume").iterdir()) == ["identity.json"]


@pytest.mark.slow
@pytest.mark.parametrize("method,fault", [("rtn", "block-end:20"), ("gptq", "block-mid:7")])
def test_smollm2_killed_runs_resume_bit_identically(tmp_path, method, fault):
    args = ["--method", method, "--group-size", "64", *QUICK_CALIB]
    check_resumes("smollm2-135m", tmp_path, args, [fault])


def make_sharded_model(directory: Path, layers: int, hidden: int, intermediate: int) -> int:
    """A Llama-shaped model with generated float32 weights in several safetensors shards; returns its bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=512,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory, max_shard_size="400MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # a real Llama-family one
        if (builtin_checkpoint("smollm2-135m") / name).is_file():
            shutil.copy(builtin_checkpoint("smollm2-135m") / name, directory / name)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def test_host_memory_stays_under_half_the_model(tmp_path):
    """RTN on a 4.1 GB model in a child process: its peak resident memory (about 1.4 GB: 0.4 GB of Python and
    libraries, one 0.2 GB block in float32 and what quantizing it takes) stays under half the model's size."""
    # made in another process: a child forked from a process that holds 4 GB would count them as its own
    made = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                           f"from test_streaming import make_sharded_model as m; "
                           f"print(m(__import__('pathlib').Path({str(tmp_path / 'big')!r}), 20, 2048, 5632))"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    size = int(made.stdout.split()[-1])
    assert len(list((tmp_path / "big").glob("*.safetensors"))) > 2
    # the peak of the quantizing process alone, measured by a small parent whose only child it is
    argv = [sys.executable, "-m", "lowbit", "quantize", str(tmp_path / "big"), "--out", str(tmp_path / "q"),
            "--method", "rtn", "--group-size", "128", "--device", "cpu", "--quiet"]
    run = run_measured(argv)
    assert run.returncode == 0, run.stderr
    peak = run.peak_rss_bytes
    header = json.loads((tmp_path / "q" / HEADER).read_text())
    assert header["memory"]["peak_host_bytes"] <= peak
    assert peak < size / 2, (peak / 1e9, size / 1e9)


def test_activations_spill_to_disk_when_host_memory_is_short(stories_path, stories_tokenizer, tmp_path, monkeypatch,
                                                             caplog):
    """With less host memory than the calibration activations need, they live in files (said in a log line) and
    the result is the same, bit for bit, in memory and from disk."""
    from safetensors.torch import load_file

    from lowbit import api, pipeline
    from lowbit.data.calibration import CalibConfig
    from lowbit.io.checkpoint import weight_files
    from lowbit.recipe import Recipe
    from lowbit.streaming import quantize_streamed

    recipe, calib = Recipe(method="gptq", scheme="w4a16", group_size=4), CalibConfig(samples=4, seqlen=64)
    kept = api.quantize(stories_path, recipe, tokenizer=stories_tokenizer, calib=calib, device="cpu", progress=False)
    api.save(kept, tmp_path / "kept")
    monkeypatch.setattr(pipeline, "available_host_memory", lambda: 1000)
    with caplog.at_level("WARNING", logger="lowbit"):
        spilled = api.quantize(stories_path, recipe, tokenizer=stories_tokenizer, calib=calib, device="cpu",
                               progress=False)
        api.save(spilled, tmp_path / "spilled")
        quantize_streamed(stories_path, recipe, tmp_path / "streamed", tokenizer=stories_tokenizer, calib=calib,
                          device="cpu", progress=False)
    said = [r.getMessage() for r in caplog.records if "keeping them on disk" in r.getMessage()]
    assert len(said) == 2 and ".streamed.lowbit-work/spill" in said[1]
    assert not list(tmp_path.glob(".streamed.lowbit-work"))  # the spill folder went with the work folder
    tensors = [{k: v for f in weight_files(tmp_path / d) for k, v in load_file(f).items()}
               for d in ("kept", "spilled", "streamed")]
    for other in tensors[1:]:
        assert other.keys() == tensors[0].keys() and all(torch.equal(other[k], tensors[0][k]) for k in other)


def test_running_out_of_memory_says_what_to_lower(stories_path, stories_tokenizer, monkeypatch):
    from lowbit import api, pipeline
    from lowbit.data.calibration import CalibConfig
    from lowbit.errors import LowbitError
    from lowbit.recipe import Recipe

    def out_of_memory(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "quantize_block", out_of_memory)
    with pytest.raises(LowbitError) as e:
        api.quantize(stories_path, Recipe(method="gptq", group_size=4), tokenizer=stories_tokenizer,
                     calib=CalibConfig(samples=4, seqlen=64), device="cpu", progress=False)
    said = str(e.value)
    assert "ran out of the GPU" in said and "4 × 64 = 256 tokens" in said and "--calib-samples" in said


@pytest.mark.parametrize("where", ["from disk", "in memory"])
def test_a_bfloat16_checkpoint_keeps_bfloat16(tmp_path, where):
    """The config's dtype is the checkpoint's (transformers overwrites it with the dtype a model is loaded in):
    unquantized tensors of a bfloat16 model stay bfloat16, though every value would fit float16."""
    from safetensors import safe_open

    src = tmp_path / "bf16"
    make_sharded_model(src, 2, 128, 256)
    config = json.loads((src / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    args = ["--method", "rtn", "--group-size", "64"] + (["--in-memory"] if where == "in memory" else [])
    run = quantize(src, tmp_path / "q", *args)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "q" / HEADER).read_text())["dtype"] == "bfloat16"
    stored = {}
    for shard in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            stored.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert stored["model.norm.weight"] == "BF16" and stored["model.embed_tokens.weight"] == "BF16"


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_blocks_of_several_kinds_stream_from_disk(name, stories_path, tmp_path):
    """Gemma 2 and 3 mix sliding-window and global attention blocks, each kind with its own mask (and, in Gemma 3,
    rotary table): read from disk, each kind's keyword arguments are captured through blocks that are not loaded,
    and GPTQ writes the same tensors as with the whole model in memory."""
    from safetensors.torch import load_file
    from test_families import _model

    from lowbit.model.capture import layer_types

    model = _model(name)
    kinds = layer_types(model, model.config.num_hidden_layers)
    assert kinds is not None and len(set(kinds)) == 2, kinds
    model.save_pretrained(tmp_path / "src")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (stories_path / f).is_file():
            shutil.copy(stories_path / f, tmp_path / "src" / f)
    args = ["--method", "gptq", "--group-size", "16", *QUICK_CALIB]
    tensors = {}
    for where, extra in (("disk", []), ("memory", ["--in-memory"])):
        run = quantize(tmp_path / "src", tmp_path / where, *args, *extra)
        assert run.returncode == 0, run.stderr
        files = sorted((tmp_path / where).glob("*.safetensors"))
        tensors[where] = {k: v for f in files for k, v in load_file(f).items()}
    assert len(list((tmp_path / "disk").glob("model-*.safetensors"))) == len(kinds) + 1  # a shard per block: streamed
    assert tensors["disk"].keys() == tensors["memory"].keys()
    for k, v in tensors["disk"].items():
        assert torch.equal(v, tensors["memory"][k]), k
