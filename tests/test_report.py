"""The single-candidate HTML report (`lowbit eval --report`), built from a real evaluation of a GPTQ checkpoint of
stories260K against the model, and looked at in a headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest

import lowbit
from lowbit import cli
from lowbit.eval.report import html_report
from lowbit.eval.runner import EvalConfig, evaluate

PROMPTS = ["Once upon a time, there was a little dog named Max who liked to run.", "Tom and Sue went to the park.",
           "The sun was hot and the bird sang"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, stories_path) -> tuple[dict, dict]:
    """The result of `lowbit eval --kl --ppl wikitext2 --tasks piqa` on a GPTQ w4a16 checkpoint, and its header."""
    tmp = tmp_path_factory.mktemp("report")
    ckpt, prompts = tmp / "w4-g4", tmp / "prompts.txt"
    assert cli.main(["quantize", str(stories_path), "--scheme", "w4a16", "--group-size", "4", "--method", "gptq",
                     "--calib-samples", "2", "--calib-seqlen", "32", "--out", str(ckpt), "--quiet"]) == 0
    prompts.write_text("\n".join(PROMPTS))
    result = evaluate(EvalConfig(reference=str(stories_path), candidate=str(ckpt), kl=True, ppl=("wikitext2",),
                                 tasks=("piqa",), prompts=str(prompts), max_new_tokens=16, max_windows=1, limit=5,
                                 progress=False))
    return json.loads(json.dumps(result)), json.loads((ckpt / "lowbit.json").read_text())


def _row(page: str, label: str) -> str:
    """The text of the summary table's row `label`."""
    found = re.search(rf"<tr><th>{re.escape(label)}</th><td>(.*?)</td></tr>", page)
    assert found, label
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


def test_the_report_says_what_the_candidate_is_and_what_was_measured(evaluated):
    result, header = evaluated
    page = html_report(result)
    kl, ppl, piqa = result["kl"], result["ppl"]["wikitext2"], result["tasks"]["piqa"]
    assert _row(page, "bits per weight").startswith(f"{header['bits_per_weight']:.3f}")
    size = _row(page, "size on disk")
    assert f"{header['bytes_on_disk']:,} bytes" in size and f"{header['size']['bytes_16bit']:,} bytes" in size
    assert _row(page, "method") == "gptq" and _row(page, "scheme") == "w4a16"
    settings = _row(page, "settings")
    assert "group size 4" in settings and "symmetric" in settings
    assert "gptq options: block_size 128, damp 0.01" in settings and "calibration: dataset c4, samples 2" in settings
    versions = f"{lowbit.__version__} (evaluation); {header['lowbit_version']} (quantization)"
    assert _row(page, "lowbit version") == versions
    assert _row(page, "date") == result["date"] and result["date"][:4].isdigit()
    a = kl["all"]
    assert _row(page, "KL p50 / p90 / p99").startswith(f"{a['median']:.4g} / {a['p90']:.4g} / {a['p99']:.4g}")
    assert f"{a['mean']:.4g} (95% CI {a['ci95'][0]:.4g} – {a['ci95'][1]:.4g})" in _row(page, "KL divergence")
    assert "<th>p99</th>" in page and f"<td>{kl['generation']['p99']:.4g}</td>" in page  # the p99 column
    assert _row(page, "token rejection rate").startswith(f"{a['token_rejection_rate']:.4f}")
    assert f"ln(PPL ratio) {ppl['ln_ratio']:.5f} ± {ppl['ln_ratio_stderr']:.5f}" in _row(page, "perplexity wikitext2")
    assert (f"acc_norm {piqa['reference_acc_norm']:.3f} → {piqa['candidate_acc_norm']:.3f}"
            in _row(page, "piqa (n=5)"))
    assert _row(page, "shared prompt prefix").startswith("every prompt starts with the same 1 token (")  # <s>
    # the per-prompt chart says which prompt is which: each prompt's column has its first words as a tooltip
    assert kl["prompt_starts"] == ["Once upon a time, there was a little …", "Tom and Sue went to the park.",
                                   "The sun was hot and the bird sang"]
    for i, start in enumerate(kl["prompt_starts"]):
        assert f"<title>prompt #{i}: {html.escape(start)}\nmean KL {kl['per_prompt'][i]:.4g}</title>" in page
    assert page.count("<img class='plot'") == 2 and page.count("<svg class='plot'") == 1


def test_what_was_not_measured_is_said(evaluated):
    """Parts not run and facts a candidate has not say so instead of vanishing."""
    result, _ = evaluated
    bare = {k: v for k, v in result.items() if k not in ("ppl", "tasks", "kl", "lowbit_version", "date")}
    page = html_report({**bare, "size": None})
    for label in ("bits per weight", "size on disk", "method", "scheme", "settings", "KL divergence", "perplexity",
                  "tasks"):
        assert _row(page, label) == "not measured", label
    assert _row(page, "date") == "not recorded" and "<img" not in page
    hf = html_report({**bare, "size": {"bits_per_weight": None, "bytes": 2_000_000}})
    assert _row(hf, "method") == "not recorded (not a lowbit checkpoint)"
    assert _row(hf, "size on disk").startswith("2.0 MB (2,000,000 bytes)")


def test_the_report_in_a_real_browser(evaluated, tmp_path):
    """At 1280 by 800 the size, bits per weight and settings are on the first screen; the plots are about 720 by 240
    pixels; the page asks nothing of the network. The screenshot is kept in tmp_path."""
    sync = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no Chromium here (./dev installs Debian's chromium where it can)")
    result, header = evaluated
    path, shot = tmp_path / "report.html", tmp_path / "report.png"
    path.write_text(html_report(result), encoding="utf-8")
    errors, requests = [], []
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        first_screen = {}
        for label in ("bits per weight", "size on disk", "settings"):
            row = page.locator("#summary tr", has=page.locator("th", has_text=label)).first
            box = row.bounding_box()
            assert box is not None and box["y"] + box["height"] <= 800, (label, box)
            first_screen[label] = row.inner_text()
        plots = [el.bounding_box() for el in page.query_selector_all(".plot")]
        tooltips = page.query_selector_all("svg.plot g[id^='prompt-'] > title")
        page.screenshot(path=str(shot))
        browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests)  # self-contained
    assert f"{header['bits_per_weight']:.3f}" in first_screen["bits per weight"]
    assert f"{header['bytes_on_disk']:,} bytes" in first_screen["size on disk"]
    assert "group size 4" in first_screen["settings"] and "gptq options" in first_screen["settings"]
    assert len(plots) == 3 and all(600 <= b["width"] <= 720 and 150 <= b["height"] <= 300 for b in plots), plots
    assert len(tooltips) == len(PROMPTS)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
