"""Reports: a readable terminal table and a self-contained HTML page with plots (matplotlib, PNGs inlined)."""

from __future__ import annotations

import base64
import html
import io
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
    served = result.get("endpoint")
    if served:
        lines.append(f"served:    {served['model']!r} at {served['url']}, prompts sent as {served['prompt_as']}, top-"
                     f"{served['top_k']} log-probs per position; {served['positions_compared']} of "
                     f"{served['positions']} positions compared ({served['positions_not_returned']} not returned, "
                     f"{served['positions_no_overlap']} without the reference's top-N), {served['requests']} requests"
                     f" ({served['sequences_from_cache']} sequences from the cache)")
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


def _plots(runs: list[tuple[str, dict]]) -> list[str]:
    """KL by position (prefill and generation) with a line per candidate, per-prompt KL sorted, and the per-token
    KL distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, key, title in ((axes[0], "by_position_prefill", "prefill: position in the prompt"),
                           (axes[1], "by_position", "generation: tokens since the prompt ended")):
        for label, kl in runs:
            b = kl.get(key) or []
            if b:
                ax.plot([x["start"] for x in b], [x["mean"] for x in b], marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("position (bucket start)")
    axes[0].set_ylabel("mean top-N KL (nats)")
    axes[1].legend(fontsize=7)
    fig.suptitle("KL by position")
    figs.append(_png(fig))
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for label, kl in runs:
        pp = sorted((x for x in kl.get("per_prompt") or [] if x is not None), reverse=True)
        if pp:
            ax.plot(range(len(pp)), pp, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("prompt, sorted by its mean KL")
    ax.set_ylabel("mean KL")
    ax.set_title("Per-prompt KL")
    ax.legend(fontsize=7)
    figs.append(_png(fig))
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for label, kl in runs:
        hist = kl.get("histogram")
        if hist and sum(hist["counts"]):
            edges = hist["log10_edges"]
            ax.step(edges[:-1], hist["counts"], where="post", label=label)
    ax.set_xlabel("log10 KL per token (values below 1e-8 in the first bin)")
    ax.set_ylabel("tokens")
    ax.set_title("Distribution of per-token KL")
    ax.legend(fontsize=7)
    figs.append(_png(fig))
    return figs


def _shade(kl: float) -> str:
    """Background for a token by its KL: white below 1e-3, through yellow to deep red at 1 nat and above."""
    import math

    t = min(max((math.log10(max(kl, 1e-12)) + 3) / 3, 0.0), 1.0)
    return f"hsl({int(55 - 55 * t)},95%,{int(97 - 32 * t)}%)"


def _tops(tops: list) -> str:
    return ", ".join(f"{tok!r} {p:.2f}" for tok, p in tops)


def worst_html(worst: list[dict]) -> str:
    """The worst prompts as text, each predicted token shaded by the KL of its prediction; hovering shows both models'
    most likely tokens there. The prompt's tokens are set apart from the generated ones."""
    esc = html.escape
    parts = []
    for w in worst:
        spans = [f"<span class='t'>{esc(w['tokens'][0])}</span>"]
        for t, (tok, kl) in enumerate(zip(w["tokens"][1:], w["kl"], strict=False)):
            where = "p" if t < w["prompt_tokens"] - 1 else "g"
            if kl is None:  # a served candidate's answer lacks this position
                tip = f"not returned by the served model\nreference: {_tops(w['reference_top'][t])}"
                spans.append(f"<span class='t {where}' title='{esc(tip)}'>{esc(tok)}</span>")
                continue
            tip = (f"KL {kl:.4f}\nreference: {_tops(w['reference_top'][t])}\n"
                   f"candidate: {_tops(w['candidate_top'][t])}")
            spans.append(f"<span class='t {where}' style='background:{_shade(kl)}' title='{esc(tip)}'>"
                         f"{esc(tok)}</span>")
        parts.append(f"<div class='worst'><div class='meta'>prompt {w['prompt']}, mean KL {w['mean']:.4f}</div>"
                     f"<div class='text'>{''.join(spans)}</div></div>")
    return "".join(parts)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
         "text-align:right}td:first-child,th:first-child{text-align:left}img{display:block;margin:1em 0;"
         "max-width:100%}.worst{margin:1em 0;border:1px solid #ddd;padding:.5em}.meta{font-size:.85em;color:#555}"
         ".text{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:.85em;"
         "line-height:1.5}"
         ".t.p{color:#555;font-style:italic}.t{border-radius:2px}.t:hover{outline:1px solid #333}"
         ".legend span{padding:0 .5em;margin-right:.3em}")


def comparison_report(runs: list[tuple[str, dict]], frontier_png: str | None = None,
                      title: str = "lowbit evaluation") -> str:
    """One self-contained page (inline PNGs and CSS, no script, no network) comparing candidates: the frontier
    (when given), a table, KL by position and per prompt for every candidate, and where each diverges."""
    esc = html.escape
    reference = next((r["reference"] for _, r in runs), "")
    body = [f"<h1>{esc(title)}</h1><p>reference <code>{esc(str(reference))}</code>; "
            f"{len(runs)} candidate{'s' if len(runs) != 1 else ''}</p>"]
    if frontier_png:
        body.append(f"<h2>Quality against size</h2>{frontier_png}")
    rows = []
    for label, r in runs:
        kl, size = r.get("kl") or {}, r.get("size") or {}
        cells = [esc(label), _f(size.get("bits_per_weight"), 3)]
        for split in ("all", "prefill", "generation"):
            s = kl.get(split) or {}
            cells.append(f"{_f(s.get('mean'))} {_ci(s.get('ci95')) if split == 'all' else ''}")
        cells.append(_f((kl.get("all") or {}).get("token_rejection_rate"), 3))
        cells.append(", ".join(f"{esc(n)} {_f(p['candidate'], 3)}" for n, p in (r.get("ppl") or {}).items()) or "—")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    body.append("<h2>Summary</h2><table><tr><th>candidate</th><th>bits/weight</th><th>KL all [95% CI]</th>"
                "<th>KL prefill</th><th>KL generation</th><th>token rejection</th><th>perplexity</th></tr>"
                + "".join(rows) + "</table>")
    metrics = {}
    for label, r in runs:
        for n, q in (r.get("ppl") or {}).items():
            metrics.setdefault(f"perplexity {n}", {"reference": q["reference"]})[label] = q["candidate"]
        for n, t in (r.get("tasks") or {}).items():
            metrics.setdefault(f"{n} acc", {"reference": t["reference"]})[label] = t["candidate"]
    if metrics:
        cols = ["reference", *(label for label, _ in runs)]
        body.append("<h2>Perplexity and tasks</h2><table><tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in cols)
                    + "</tr>" + "".join(f"<tr><td>{esc(m)}</td>" + "".join(f"<td>{_f(v.get(c), 3)}</td>" for c in cols)
                                        + "</tr>" for m, v in metrics.items()) + "</table>")
    with_kl = [(label, r["kl"]) for label, r in runs if r.get("kl")]
    if with_kl:
        body.append("<h2>Divergence</h2>")
        body += _plots(with_kl)
        legend = "".join(f"<span style='background:{_shade(k)}'>KL {k:g}</span>" for k in (0.001, 0.01, 0.1, 1))
        body.append(f"<h2>Where it diverges</h2><p class='legend'>The prompts with the highest mean KL, token by "
                    f"token: each token is shaded by the KL of the prediction that produced it (prompt tokens in "
                    f"italics). Hover a token to see both models' most likely tokens there. {legend}</p>")
        for label, kl in with_kl:
            if kl.get("worst"):
                body.append(f"<h3>{esc(label)}</h3>{worst_html(kl['worst'])}")
    head = f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
    return head + "<body>" + "".join(body) + "</body></html>"


def html_report(result: dict) -> str:
    """The page for one candidate (`lowbit eval --report`)."""
    return comparison_report([(str(result["candidate"]), result)])


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
