"""The command line: a real quantize run, and every bad input giving a one-paragraph error, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from lowbit import cli
from lowbit.io import checkpoint


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_prints_summary_and_writes_header(capsys, stories_path, tmp_path):
    code, out, _ = run(capsys, "quantize", str(stories_path), "--method", "rtn", "--scheme", "w4a16",
                       "--group-size", "4", "--asym", "--out", str(tmp_path / "q"), "--quiet")
    assert code == 0
    assert "35 linear layers in 5 blocks" in out and "bits/weight" in out and "MB at 16 bits" in out
    header = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert {"method", "scheme", "bits_per_weight", "seconds"} <= set(header)
    assert header["recipe"]["symmetric"] is False and header["recipe"]["group_size"] == 4
    code, out, _ = run(capsys, "info", str(tmp_path / "q"))
    assert code == 0 and json.loads(out)["scheme"] == "w4a16"


def test_recipe_file_with_command_line_override(capsys, stories_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: w8a16\ngroup_size: 0\noverrides:\n  - pattern: down_proj\n    scheme: w4a16\n"
                      "    group_size: 4\n")
    code, _, _ = run(capsys, "quantize", str(stories_path), "--recipe", str(recipe), "--scheme", "w6a16",
                     "--out", str(tmp_path / "q"), "--quiet")
    assert code == 0
    layers = json.loads((tmp_path / "q" / "lowbit.json").read_text())["layers"]
    assert layers["model.layers.0.mlp.down_proj"]["spec"]["weight"]["bits"] == 4
    assert layers["model.layers.0.mlp.up_proj"]["spec"]["weight"]["bits"] == 6


def test_method_fp8_implies_scheme_fp8(capsys, stories_path, tmp_path):
    code, out, _ = run(capsys, "quantize", str(stories_path), "--method", "fp8", "--out", str(tmp_path / "q"),
                       "--quiet")
    assert code == 0 and "fp8 e4m3, per channel, fp8 per-token dynamic activations" in out


def test_rtn_with_calibration_reports_block_errors(capsys, stories_path, tmp_path):
    code, out, _ = run(capsys, "quantize", str(stories_path), "--scheme", "w4a16", "--group-size", "0",
                       "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(tmp_path / "q"), "--quiet")
    assert code == 0 and "relative output MSE on a calibration batch" in out


@pytest.fixture()
def nan_model(stories_path, tmp_path):
    target = tmp_path / "nan-model"
    shutil.copytree(stories_path, target)
    (target / "model.safetensors").chmod(0o644)
    tensors = load_file(target / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, target / "model.safetensors")
    return target


def _bad_inputs(stories_path, tmp_path, nan_model):
    out = str(tmp_path / "out")
    m = str(stories_path)
    return {
        "unknown model": (["quantize", "no-such-model", "--out", out], "no model 'no-such-model'"),
        "unknown scheme": (["quantize", m, "--scheme", "int4", "--out", out], "unknown scheme 'int4'"),
        "unknown method": (["quantize", m, "--method", "magic", "--out", out], "unknown method 'magic'"),
        "bits above 8": (["quantize", m, "--scheme", "w9a16", "--out", out], "2 to 8"),
        "bits below 2": (["quantize", m, "--scheme", "w1a16", "--out", out], "2 to 8"),
        "group size": (["quantize", m, "--scheme", "w4a16", "--group-size", "128", "--out", out],
                       "Group sizes that divide every targeted layer: 1, 2, 4"),
        "nan weight": (["quantize", str(nan_model), "--scheme", "w4a16", "--group-size", "0", "--out", out],
                       "model.layers.2.mlp.up_proj has NaN or Inf"),
        "calibration too small": (["quantize", m, "--group-size", "0", "--calib-samples", "100000", "--out", out],
                                  "calibration set smaller than requested"),
        "missing recipe": (["quantize", m, "--recipe", str(tmp_path / "nope.yaml"), "--out", out], "does not exist"),
        "fp8 with groups": (["quantize", m, "--scheme", "fp8", "--group-size", "4", "--out", out], "per-channel"),
    }


@pytest.mark.parametrize("case", ["unknown model", "unknown scheme", "unknown method", "bits above 8",
                                  "bits below 2", "group size", "nan weight", "calibration too small",
                                  "missing recipe", "fp8 with groups"])
def test_bad_input_gives_an_error_not_a_traceback(case, capsys, stories_path, tmp_path, nan_model):
    argv, message = _bad_inputs(stories_path, tmp_path, nan_model)[case]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert " ".join(err.split()).count(message) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_output_directory(capsys, stories_path, tmp_path):
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "quantize", str(stories_path), "--group-size", "0", "--out", str(tmp_path / "out"))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, _ = run(capsys, "quantize", str(stories_path), "--group-size", "0", "--out", str(tmp_path / "out"),
                     "--overwrite", "--quiet")
    assert code == 0


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "b")
    code, _, err = run(capsys, "quantize", str(tmp_path / "b"), "--out", str(tmp_path / "out"))
    assert code == 2 and "'bloom' is not supported" in err and "llama" in err and not (tmp_path / "out").exists()


def test_checkpoint_failing_its_hash(capsys, stories_path, tmp_path):
    assert run(capsys, "quantize", str(stories_path), "--group-size", "0", "--out", str(tmp_path / "q"),
               "--quiet")[0] == 0
    with open(checkpoint.weight_files(tmp_path / "q")[0], "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    code, _, err = run(capsys, "info", str(tmp_path / "q"))
    assert code == 2 and "fails its sha256 check" in " ".join(err.split())


def test_interrupt_during_write_leaves_nothing(capsys, stories_path, tmp_path, monkeypatch):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    code, _, err = run(capsys, "quantize", str(stories_path), "--group-size", "0", "--out", str(tmp_path / "q"),
                       "--quiet", "--in-memory")
    assert code == 130 and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_streamed_run_keeps_its_blocks(capsys, stories_path, tmp_path, monkeypatch):
    """Ctrl-C in a run that reads the model from disk: no output, the finished blocks kept, the way on said."""
    from lowbit import streaming

    real, calls = streaming.save_file, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(streaming, "save_file", interrupted)
    code, _, err = run(capsys, "quantize", str(stories_path), "--group-size", "0", "--out", str(tmp_path / "q"),
                       "--quiet")
    assert code == 130 and "2 of 5 blocks" in err and "--resume" in err
    assert not (tmp_path / "q").exists() and (tmp_path / ".q.lowbit-work").is_dir()


def test_real_process_exit_codes(stories_path, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(stories_path), "--scheme", "w8a16",
                         "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "quantized" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(stories_path), "--scheme", "w4a16",
                          "--group-size", "100", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "lowbit: error:" in bad.stderr


def test_quantize_to_a_gguf_file(capsys, stories_path, tmp_path):
    """--format gguf: one GGUF file that the gguf package reads, llama.cpp's mix and fallbacks in it; what it cannot
    hold and an existing file are refused before any work, with nothing written."""
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "s.gguf"
    code, text, _ = run(capsys, "quantize", str(stories_path), "--scheme", "q4_k_m", "--format", "gguf", "--out",
                        str(out), "--quiet")
    assert code == 0 and str(out) in text and out.is_file()
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {"Q5_0", "Q8_0"} <= types  # rows of 64: Q4_K → Q5_0, Q6_K (more bits) → Q8_0, as llama.cpp does
    code, _, err = run(capsys, "quantize", str(stories_path), "--scheme", "q4_k_m", "--format", "gguf", "--out",
                       str(out), "--quiet")
    assert code != 0 and "exists" in err
    code, _, err = run(capsys, "quantize", str(stories_path), "--scheme", "w4a16", "--group-size", "0", "--format",
                       "gguf", "--out", str(tmp_path / "t.gguf"), "--quiet")
    assert code != 0 and "block types" in err and not (tmp_path / "t.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gguf"]


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if any model's weights are read: what it checks must be refused before that."""
    from lowbit import api
    from lowbit.eval import runner
    from lowbit.io.lazy import LazyWeights

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    for owner, name in ((api, "load"), (runner, "load"), (LazyWeights, "get")):
        monkeypatch.setattr(owner, name, loaded)


def _refused_before_loading(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, *argv, "--quiet")
    assert code == 2, err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if p.name not in ("a-file", "no-data")]  # nothing written


@pytest.mark.parametrize("case", ["json under a file", "report is a folder", "record under a file",
                                  "results under a file", "unknown ppl",
                                  "missing ppl data", "missing task data", "missing calibration data"])
def test_inputs_and_outputs_are_checked_before_any_model_loads(case, capsys, stories_path, tmp_path, monkeypatch,
                                                                no_model_loads):
    (tmp_path / "a-file").write_text("")
    empty = tmp_path / "no-data"
    m, under_file = str(stories_path), str(tmp_path / "a-file" / "x")
    evaluate = ["eval", "--reference", m, "--candidate", m, "--kl"]
    argv, message = {
        "json under a file": ([*evaluate, "--json", under_file], f"cannot write --json {under_file!r}"),
        "report is a folder": ([*evaluate, "--report", str(tmp_path)], f"--report {str(tmp_path)!r} is a directory"),
        "record under a file": ([*evaluate, "--save-reference", under_file], "cannot write --save-reference"),
        "results under a file": ([*evaluate, "--out", under_file], f"cannot write --out {under_file!r}"),
        "unknown ppl": ([*evaluate, "--ppl", "wikitext2,nosuchset"], "unknown perplexity set 'nosuchset'"),
        "missing ppl data": ([*evaluate, "--ppl", "ptb"], "perplexity set 'ptb' is read from"),
        "missing task data": ([*evaluate, "--tasks", "piqa"], "task data"),
        "missing calibration data": (["quantize", m, "--method", "gptq", "--group-size", "4", "--out",
                                      str(tmp_path / "q")], "calibration set 'c4' is read from"),
    }[case]
    if case.startswith("missing"):
        empty.mkdir()
        monkeypatch.setenv("LOWBIT_DATA", str(empty))
        message += f" '{empty}" + ("/tasks/piqa.jsonl' is missing. Set LOWBIT_DATA" if "task" in case else "")
    _refused_before_loading(capsys, tmp_path, argv, message)


def test_fast_is_a_small_calibration(capsys, stories_path, tmp_path):
    code, _, err = run(capsys, "quantize", str(stories_path), "--method", "gptq", "--group-size", "4", "--fast",
                       "--calib-samples", "8", "--out", str(tmp_path / "q"))
    assert code == 2 and "give either --fast or --calib-samples/--calib-seqlen" in " ".join(err.split())
    code, _, _ = run(capsys, "quantize", str(stories_path), "--method", "gptq", "--group-size", "4", "--fast",
                     "--out", str(tmp_path / "q"), "--quiet")
    assert code == 0
    calibration = json.loads((tmp_path / "q" / "lowbit.json").read_text())["calibration"]
    assert (calibration["samples"], calibration["seqlen"]) == (32, 512)
    code, _, _ = run(capsys, "quantize", str(stories_path), "--method", "rtn", "--group-size", "4", "--fast",
                     "--out", str(tmp_path / "r"), "--quiet")  # a method without calibration: nothing to shrink
    assert code == 0 and json.loads((tmp_path / "r" / "lowbit.json").read_text())["calibration"] is None


def test_info_checks_the_header_hash(capsys, stories_path, tmp_path):
    """The streamed writer hashes the header; info refuses an edited header and says when one has no hash."""
    assert run(capsys, "quantize", str(stories_path), "--group-size", "4", "--out", str(tmp_path / "q"),
               "--quiet")[0] == 0
    path = tmp_path / "q" / checkpoint.HEADER
    header = json.loads(path.read_text())
    code, out, _ = run(capsys, "info", str(tmp_path / "q"))
    assert code == 0 and json.loads(out)["checked"] == "the sha256 of the header and of every file it names"
    path.write_text(json.dumps({**header, "bits_per_weight": 2.0}, indent=1))
    code, _, err = run(capsys, "info", str(tmp_path / "q"))
    assert code == 2 and f"{str(path)!r} was edited or damaged" in " ".join(err.split()) and "Traceback" not in err
    del header[checkpoint.HEADER_HASH]  # as lowbit wrote headers before they were hashed
    path.write_text(json.dumps(header, indent=1))
    code, out, _ = run(capsys, "info", str(tmp_path / "q"))
    assert code == 0 and "the header itself is not covered by a hash" in json.loads(out)["checked"]


def _tiny_gguf(path):
    """A small GGUF file written with the gguf package: two tensors, F32 and F16."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((32, 64), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((64, 64), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["random bytes", "empty", "version 9", "header cut", "tensors cut"])
def test_bad_gguf_file_is_refused_in_one_sentence(case, capsys, tmp_path):
    whole = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    content, message = {
        "random bytes": (bytes(range(256)) * 8, "is not a GGUF file: it does not start with the GGUF magic bytes"),
        "empty": (b"", "is empty (0 bytes), not a GGUF model"),
        "version 9": (b"GGUF" + (9).to_bytes(4, "little") + whole[8:], "is GGUF version 9, which the installed gguf "
                      "package does not read (it reads versions 2, 3). Update the gguf package"),
        "header cut": (whole[:40], "is truncated or damaged: a GGUF version 3 file whose header or tensor data"),
        "tensors cut": (whole[:-100], "is truncated or damaged: a GGUF version 3 file whose header or tensor data"),
    }[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    for argv in (["quantize", str(bad), "--out", str(tmp_path / "q")],
                 ["quantize", str(bad), "--format", "compressed-tensors", "--out", str(tmp_path / "q")],
                 ["info", str(bad)]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"{str(bad)!r} {message}" in " ".join(err.split()), err
        assert "Traceback" not in err and ("again." in err or case == "version 9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "whole.gguf"]


def test_info_describes_what_is_not_a_lowbit_checkpoint(capsys, stories_path, tmp_path):
    code, out, _ = run(capsys, "info", str(_tiny_gguf(tmp_path / "m.gguf")))
    info = json.loads(out)
    assert code == 0 and info["format"] == "gguf" and info["architecture"] == "llama" and info["tensors"] == 2
    assert info["tensor_types"] == {"F32": 1, "F16": 1} and "not a lowbit checkpoint" in info["note"]
    code, out, _ = run(capsys, "info", str(stories_path))
    assert code == 0 and json.loads(out)["note"].endswith("a Hugging Face model directory")


def _refused_in(folder, real):
    """tempfile's `real` mkdtemp/mkstemp, raising EACCES for `folder` as a folder without write permission would."""
    import errno
    from pathlib import Path

    def create(*args, **kwargs):
        if kwargs.get("dir") is not None and Path(kwargs["dir"]) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return real(*args, **kwargs)

    return create


@pytest.mark.parametrize("blocked", ["parent is a file", "permission denied"])
def test_unwritable_output_is_refused_before_any_work(blocked, capsys, stories_path, tmp_path, monkeypatch):
    """quantize and export --out where nothing can be written. Permission bits do not bind root, so the refusal
    is simulated: a folder of the path is a regular file, or creating anything in the folder raises EACCES."""
    import tempfile

    assert run(capsys, "quantize", str(stories_path), "--scheme", "w8a16", "--group-size", "0", "--out",
               str(tmp_path / "ckpt"), "--quiet")[0] == 0
    where = tmp_path / "locked"
    if blocked == "parent is a file":
        where.write_text("a file")
    else:
        where.mkdir()
        for name in ("mkdtemp", "mkstemp"):
            monkeypatch.setattr(tempfile, name, _refused_in(where, getattr(tempfile, name)))
    m, ckpt = str(stories_path), str(tmp_path / "ckpt")
    for argv, out in ((["quantize", m, "--scheme", "w4a16", "--out"], where / "q"),
                      (["quantize", m, "--scheme", "q4_k_m", "--format", "gguf", "--out"], where / "q.gguf"),
                      (["export", ckpt, "--to", "compressed-tensors", "--out"], where / "ct"),
                      (["export", ckpt, "--to", "gguf", "--out"], where / "e.gguf")):
        code, _, err = run(capsys, *argv, str(out))
        err = " ".join(err.split())
        assert code == 2 and "cannot write" in err and str(out) in err and "Choose another" in err, err
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "locked"]
    assert where.is_file() or not list(where.iterdir())
