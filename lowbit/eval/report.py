"""Reports: a readable terminal table and a self-contained HTML page with plots (matplotlib, PNGs inlined)."""

from __future__ import annotations

import base64
import html
import io
import itertools
from pathlib import Path

from lowbit.io.atomic import atomic_file


def _f(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return "—" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def text_report(result: dict) -> str:
    lines = [f"reference: {result['reference']}", f"candidate: {result['candidate']}"]
    size = result.get("size")
    if size:
        lines.append(f"size:      {_f(size.get('bits_per_weight'), 3)} bits/weight, "
                     f"{(size.get('bytes') or 0) / 1e6:.1f} MB on disk")
    kl = result.get("kl")
    if kl:
        cut = (kl.get("record") or {}).get("truncated_prompts")
        note = f"; {cut} prompts left-truncated to fit the context" if cut else ""
        lines.append(f"\ndivergence over {kl['prompts']} prompts (top-{kl['top_n']} KL, Fireworks), 95% CI by prompt"
                     f"{note}:")
        lines.append(f"  {'split':11} {'tokens':>7} {'KL':>8} {'95% CI':>19} {'KL full':>8} {'p99':>7} "
                     f"{'reject':>7} {'spec rej':>8} {'RMS Δp':>7}")
        for split in ("prefill", "generation", "all"):
            s = kl[split]
            lines.append(f"  {split:11} {s['tokens']:7d} {_f(s['mean']):>8} {_ci(s['ci95']):>19} "
                         f"{_f(s['mean_full']):>8} "
                         f"{_f(s['p99'], 3):>7} {_f(s['token_rejection_rate'], 3):>7} {_f(s['spec_rejection'], 3):>8} "
                         f"{_f(s['rms_dp'], 3):>7}")
        shared, rest = kl.get("shared_prefix"), kl.get("prefill_unshared")
        if shared and rest:
            lines.append(f"  every prompt starts with the same {shared['tokens']} tokens ({shared['positions']} of the "
                         f"prefill positions): KL there {_f(shared['mean'])} (one text); prefill without them "
                         f"{_f(rest['mean'])} {_ci(rest['ci95'])}, rejection {_f(rest['token_rejection_rate'], 3)}")
        if kl["by_position"]:
            buckets = ", ".join(f"{b['start']}-{b['end']}: {b['mean']:.3f}" for b in kl["by_position"])
            lines.append(f"  generation KL by position: {buckets}")
    for name, k in (result.get("kl_text") or {}).items():
        s = k["all"]
        lines.append(f"\ndivergence on {name} ({k['windows']} windows of {k['seqlen']}, all prefill): KL "
                     f"{_f(s['mean'])} {_ci(s['ci95'])}, full KL {_f(s['mean_full'])}, "
                     f"same top {_f(s['same_top'], 3)}, RMS Δp {_f(s['rms_dp'], 3)}")
    for name, p in (result.get("ppl") or {}).items():
        ratio = "" if p.get("ln_ratio") is None else (f", ln(PPL(Q)/PPL(ref)) = {p['ln_ratio']:.5f} "
                                                      f"± {p['ln_ratio_stderr']:.5f}")
        lines.append(f"\nperplexity {name} ({p['windows']} windows of {p['seqlen']}): reference {p['reference']:.4f}, "
                     f"candidate {_f(p['candidate'])}{ratio}")
    tasks = result.get("tasks") or {}
    if tasks:
        lines.append(f"\n  {'task':15} {'n':>6} {'ref acc':>8} {'cand acc':>8} {'ref norm':>8} {'cand norm':>9} "
                     f"{'flips':>6}")
        for name, t in tasks.items():
            lines.append(f"  {name:15} {t['n']:6d} {_f(t['reference'], 3):>8} {_f(t['candidate'], 3):>8} "
                         f"{_f(t['reference_acc_norm'], 3):>8} {_f(t['candidate_acc_norm'], 3):>9} "
                         f"{_f(t['flips'], 3):>6}")
    if result.get("timings_s"):
        lines.append("\ntime: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["timings_s"].items()))
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "<img alt='plot' src='data:image/png;base64," + base64.b64encode(buf.getvalue()).decode() + "'>"


def _plots(kl: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, label in (("by_position_prefill", "prefill (position in prompt)"),
                       ("by_position", "generation (tokens since prompt end)")):
        b = kl.get(key) or []
        if b:
            ax.plot([x["start"] for x in b], [x["mean"] for x in b], marker="o", label=label)
    ax.set_xlabel("position (bucket start)")
    ax.set_ylabel("mean top-N KL (nats)")
    ax.set_title("KL by position")
    ax.legend()
    figs.append(_png(fig))
    hist = kl.get("histogram")
    if hist and sum(hist["counts"]):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        edges = hist["log10_edges"]
        ax.bar(edges[:-1], hist["counts"], width=[b - a for a, b in itertools.pairwise(edges)], align="edge")
        ax.set_xlabel("log10 KL per token (values below 1e-8 in the first bin)")
        ax.set_ylabel("tokens")
        ax.set_title("Distribution of per-token KL")
        figs.append(_png(fig))
    pp = [x for x in kl.get("per_prompt") or [] if x is not None]
    if pp:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(range(len(pp)), sorted(pp, reverse=True))
        ax.set_xlabel("prompt (sorted)")
        ax.set_ylabel("mean KL")
        ax.set_title("Per-prompt KL")
        figs.append(_png(fig))
    return figs


def html_report(result: dict) -> str:
    esc = html.escape
    body = [f"<h1>lowbit evaluation</h1><p>reference <code>{esc(str(result['reference']))}</code><br>candidate "
            f"<code>{esc(str(result['candidate']))}</code></p>"]
    kl = result.get("kl")
    if kl:
        rows = "".join(
            f"<tr><td>{s}</td><td>{kl[s]['tokens']}</td><td>{_f(kl[s]['mean'])}</td><td>{_ci(kl[s]['ci95'])}</td>"
            f"<td>{_f(kl[s]['mean_full'])}</td><td>{_f(kl[s]['token_rejection_rate'], 3)}</td>"
            f"<td>{_f(kl[s]['spec_rejection'], 3)}</td><td>{_f(kl[s]['rms_dp'], 3)}</td></tr>"
            for s in ("prefill", "generation", "all"))
        body.append(f"<h2>Divergence ({kl['prompts']} prompts, top-{kl['top_n']})</h2><table><tr><th>split</th>"
                    f"<th>tokens</th><th>KL</th><th>95% CI</th><th>KL full</th><th>rejection</th>"
                    f"<th>spec. rejection</th><th>RMS Δp</th></tr>{rows}</table>")
        body += _plots(kl)
    ppl = result.get("ppl") or {}
    tasks = result.get("tasks") or {}
    if ppl or tasks:
        rows = "".join(f"<tr><td>ppl {esc(n)}</td><td>{_f(p['reference'])}</td><td>{_f(p['candidate'])}</td>"
                       f"<td>{p['windows']} × {p['seqlen']}</td></tr>" for n, p in ppl.items())
        rows += "".join(f"<tr><td>{esc(n)} acc</td><td>{_f(t['reference'], 3)}</td><td>{_f(t['candidate'], 3)}</td>"
                        f"<td>n = {t['n']}, flips {_f(t['flips'], 3)}</td></tr>" for n, t in tasks.items())
        body.append("<h2>Perplexity and tasks</h2><table><tr><th></th><th>reference</th><th>candidate</th>"
                    f"<th></th></tr>{rows}</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}img{display:block;margin:1em 0}")
    head = f"<!doctype html><meta charset='utf-8'><title>lowbit evaluation</title><style>{style}</style>"
    return head + "".join(body)


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
