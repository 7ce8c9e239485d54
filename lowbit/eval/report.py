"""Reports: a readable terminal table and a self-contained HTML page with plots (matplotlib, PNGs inlined)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

from lowbit.io.atomic import atomic_file


def _f(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return "—" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def shared_prefix_note(kl: dict) -> str:
    """What the divergence does with the tokens every prompt starts with (a chat template's system prompt, say)."""
    shared, rest = kl.get("shared_prefix"), kl.get("prefill_unshared")
    if not shared:
        return "no prefix is shared by every prompt"
    note = (f"every prompt starts with the same {_count(shared['tokens'], 'token')} ({shared['positions']} of the "
            f"prefill positions): KL there {_f(shared['mean'])} (one text, counted once here; the prefill and all "
            f"rows count it in every prompt)")
    if rest:
        note += (f"; prefill without them {_f(rest['mean'])} {_ci(rest['ci95'])}, rejection "
                 f"{_f(rest['token_rejection_rate'], 3)}")
    return note


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
    ref = result.get("reference_endpoint")
    if ref:
        held = ref["positions"] - ref["positions_not_in_reference"]
        lines.append(f"reference served: {ref['model']!r} at {ref['url']}, top-{ref['top_k']} log-probs per position "
                     f"(a sparse record); {held} of {ref['positions']} positions held, {ref['positions_compared']} "
                     "compared")
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
        if kl.get("shared_prefix"):
            lines.append(f"  {shared_prefix_note(kl)}")
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


def _png(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    return (f"<img class='plot' alt='{html.escape(alt)}' src='data:image/png;base64,"
            f"{base64.b64encode(buf.getvalue()).decode()}'>")


def _svg(fig, alt: str, titles: dict[str, str]) -> str:
    """The figure as inline SVG (sized by the page's CSS); each artist whose gid is a key of `titles` shows that text
    when hovered."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    svg = re.sub(r'<svg ([^>]*?)width="[^"]*" height="[^"]*"',
                 lambda m: f"<svg class='plot' role='img' aria-label='{html.escape(alt)}' {m.group(1)}",
                 svg[svg.index("<svg"):], count=1)
    return re.sub(r'<g id="([^"]+)">',
                  lambda m: m.group(0) + (f"<title>{html.escape(titles[m.group(1)])}</title>"
                                          if m.group(1) in titles else ""), svg)


def _per_prompt(runs: list[tuple[str, dict]]) -> str:
    """Each prompt's mean KL, highest first (by the mean over candidates), a line per candidate; hovering a prompt's
    column shows its index, its first words and each candidate's KL there."""
    import matplotlib.pyplot as plt

    n = max(len(kl.get("per_prompt") or []) for _, kl in runs)
    table = [(label, [*(kl.get("per_prompt") or []), *[None] * (n - len(kl.get("per_prompt") or []))])
             for label, kl in runs]
    starts = next((kl["prompt_starts"] for _, kl in runs if kl.get("prompt_starts")), [])

    def highest_first(i: int) -> float:
        vals = [v[i] for _, v in table if v[i] is not None]
        return -sum(vals) / len(vals) if vals else math.inf

    order = sorted(range(n), key=highest_first)
    fig, ax = plt.subplots(figsize=(7, 1.85))
    for label, v in table:
        ax.plot(range(n), [math.nan if v[i] is None else v[i] for i in order], marker="o", ms=2, lw=0.8, label=label)
    titles = {}
    for x, i in enumerate(order):
        ax.axvspan(x - 0.5, x + 0.5, facecolor="none", edgecolor="none", zorder=0, gid=f"prompt-{i}")
        head = f"prompt #{i}" + (f": {starts[i]}" if i < len(starts) else "")
        titles[f"prompt-{i}"] = "\n".join([head, *(f"{label + ': ' if len(runs) > 1 else ''}mean KL {_g(v[i])}"
                                                   for label, v in table)])
    step = math.ceil(n / 40)
    ax.set_xticks(range(0, n, step), [f"#{order[x]}" for x in range(0, n, step)], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_yscale("log")
    ax.set_xlabel("prompt (#index), highest KL first; hover a prompt for its first words")
    ax.set_ylabel("mean KL")
    ax.set_title("Per-prompt KL")
    if len(runs) > 1:
        ax.legend()
    return _svg(fig, "Per-prompt KL", titles)


def _plots(runs: list[tuple[str, dict]]) -> list[str]:
    """KL by position (prefill and generation) with a line per candidate, per-prompt KL (labelled prompts), and the
    per-token KL distribution; each about 720 by 240 pixels on the page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    with plt.rc_context({"font.size": 7, "axes.titlesize": 8, "legend.fontsize": 6}):
        fig, axes = plt.subplots(1, 2, figsize=(7, 1.85), sharey=True)
        for ax, key, title in ((axes[0], "by_position_prefill", "prefill: position in the prompt"),
                               (axes[1], "by_position", "generation: tokens since the prompt ended")):
            for label, kl in runs:
                b = kl.get(key) or []
                if b:
                    ax.plot([x["start"] for x in b], [x["mean"] for x in b], marker="o", ms=2, label=label)
            ax.set_title(title)
            ax.set_xlabel("position (bucket start)")
        axes[0].set_ylabel("mean top-N KL (nats)")
        if len(runs) > 1:
            axes[1].legend()
        figs.append(_png(fig, "KL by position"))
        if any(kl.get("per_prompt") for _, kl in runs):
            figs.append(_per_prompt(runs))
        fig, ax = plt.subplots(figsize=(7, 1.85))
        for label, kl in runs:
            hist = kl.get("histogram")
            if hist and sum(hist["counts"]):
                edges = hist["log10_edges"]
                ax.step(edges[:-1], hist["counts"], where="post", label=label)
        ax.set_xlabel("log10 KL per token (values below 1e-8 in the first bin)")
        ax.set_ylabel("tokens")
        ax.set_title("Distribution of per-token KL")
        if len(runs) > 1:
            ax.legend()
        figs.append(_png(fig, "Distribution of per-token KL"))
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


STYLE = ("body{font-family:system-ui,sans-serif;max-width:72em;margin:1.5em auto;padding:0 1em}"
         "h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em}"
         "table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.2em .6em;"
         "text-align:right}td{white-space:nowrap}td:first-child,th:first-child{text-align:left}"
         ".kv th{text-align:left;background:#f5f5f5;font-weight:600;white-space:nowrap}"
         ".kv td{text-align:left;white-space:normal}"
         ".missing{color:#888;font-style:italic}img{display:block;margin:1em 0;max-width:100%}"
         ".plot{display:block;width:100%;max-width:720px;height:auto;margin:1em 0}"
         "svg.plot [id^=prompt-] path{pointer-events:all}svg.plot [id^=prompt-]:hover path{fill:#0000000f!important}"
         ".worst{margin:1em 0;border:1px solid #ddd;padding:.5em}.meta{font-size:.85em;color:#555}"
         ".text{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:.85em;"
         "line-height:1.5}"
         ".t.p{color:#555;font-style:italic}.t{border-radius:2px}.t:hover{outline:1px solid #333}"
         ".legend span{padding:0 .5em;margin-right:.3em}")
NOT_MEASURED = "not measured"


def _page(title: str, body: list[str]) -> str:
    """One self-contained page: inline CSS and images, no script, no network."""
    esc = html.escape
    return (f"<!doctype html><html lang='en'><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style><body>{''.join(body)}</body></html>")


def _divergence_sections(with_kl: list[tuple[str, dict]]) -> list[str]:
    """The plots, and where each candidate diverges from the reference, token by token."""
    esc = html.escape
    body = ["<h2>Divergence</h2>", *_plots(with_kl)]
    legend = "".join(f"<span style='background:{_shade(k)}'>KL {k:g}</span>" for k in (0.001, 0.01, 0.1, 1))
    body.append(f"<h2>Where it diverges</h2><p class='legend'>The prompts with the highest mean KL, token by "
                f"token: each token is shaded by the KL of the prediction that produced it (prompt tokens in "
                f"italics). Hover a token to see both models' most likely tokens there. {legend}</p>")
    for label, kl in with_kl:
        if kl.get("worst"):
            body.append(f"<h3>{esc(label)}</h3>{worst_html(kl['worst'])}")
    return body


def comparison_report(runs: list[tuple[str, dict]], frontier_png: str | None = None,
                      title: str = "lowbit evaluation") -> str:
    """One self-contained page (inline PNGs, SVG and CSS, no script, no network) comparing candidates: the frontier
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
        body += _divergence_sections(with_kl)
    return _page(title, body)


def _g(x) -> str:
    """A KL-like value with 4 significant digits (small values keep their digits)."""
    return "—" if x is None else f"{x:.4g}"


def _bytes(n: int) -> str:
    unit, scale = next(((u, k) for u, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= k), ("bytes", 1))
    return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit} ({n:,} bytes)"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' if n != 1 else ''}"


def _missing(text: str) -> str:
    return f"<span class='missing'>{html.escape(text)}</span>"


# recipe entries that settings() words itself; the others are listed where they differ from Recipe's defaults
_WORDED = ("lowbit_recipe", "method", "scheme", "group_size", "per_tensor", "symmetric", "options", "overrides")


def settings(size: dict) -> list[str]:
    """A lowbit checkpoint's settings in words (from the result's `size`, which holds its header's recipe): grouping,
    symmetry, the method's options, other entries that differ from the defaults, calibration, the mixed-precision
    allocation. Empty for other candidates."""
    recipe = size.get("recipe")
    if not recipe:
        return []
    from lowbit.recipe import Recipe

    group = recipe.get("group_size")
    out = ["one scale per tensor" if recipe.get("per_tensor") else "per-channel scales (group size 0)"
           if group == 0 else f"group size {group}" if group else "the scheme's own grouping",
           "symmetric" if recipe.get("symmetric", True) else "asymmetric"]
    defaults = Recipe().to_dict()
    word = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
    out += [f"{k} {word(v)}" for k, v in recipe.items() if k not in _WORDED and v != defaults.get(k)]
    if recipe.get("overrides"):
        out.append(f"{len(recipe['overrides'])} per-layer overrides")
    if recipe.get("options"):
        out.append(f"{recipe.get('method')} options: " + ", ".join(f"{k} {word(v)}" for k, v in
                                                                  recipe["options"].items()))
    if size.get("calibration"):
        out.append("calibration: " + ", ".join(f"{k} {v}" for k, v in size["calibration"].items()))
    allocation = size.get("allocation")
    if allocation:
        chosen = ", ".join(f"{n} × {label}" for label, n in sorted((allocation.get("layers") or {}).items(),
                                                                   key=lambda kv: -kv[1]))
        out.append(f"mixed precision for {allocation.get('target_bits_per_weight')} bits per weight: {chosen}")
    return out


def _candidate_rows(result: dict) -> list[tuple[str, str]]:
    """What the candidate is: bits per weight, size, method, scheme, settings, and which lowbit did what when."""
    esc = html.escape
    size = result.get("size") or {}
    why = (NOT_MEASURED + " (a served model)" if result.get("endpoint") else NOT_MEASURED if not size
           else "not recorded (not a lowbit checkpoint)")
    bpw, on_disk, b16 = size.get("bits_per_weight"), size.get("bytes"), size.get("bytes_16bit")
    disk = _missing(why) if on_disk is None else (
        f"{_bytes(on_disk)}, {'with config and tokenizer' if size.get('recipe') else 'the weight files'}; "
        + (f"{_bytes(b16)} at 16 bits" if b16 else _missing("16-bit size not recorded")))
    said = settings(size)
    version = result.get("lowbit_version")
    versions = [f"{esc(version)} (evaluation)" if version else _missing("evaluation: not recorded")]
    if size.get("lowbit_version"):
        versions.append(f"{esc(size['lowbit_version'])} (quantization)")
    return [
        ("bits per weight", f"{bpw:.3f} (quantized layers, scales and zeros included)" if bpw else _missing(why)),
        ("size on disk", disk),
        ("method", esc(size["method"]) if size.get("method") else _missing(why)),
        ("scheme", esc(size["scheme"]) if size.get("scheme") else _missing(why)),
        ("settings", esc("; ".join(said)) if said else _missing(why)),
        ("lowbit version", "; ".join(versions)),
        ("date", esc(result["date"]) if result.get("date") else _missing("not recorded")),
    ]


def _measured_rows(result: dict) -> list[tuple[str, str]]:
    """What was measured: KL with its percentiles and token rejection, perplexity, tasks; 'not measured' for the
    parts not run."""
    esc = html.escape
    rows = []
    served = result.get("endpoint")
    if served:
        rows.append(("served", esc(f"{served['model']!r} at {served['url']}: {served['positions_compared']} of "
                                   f"{served['positions']} positions compared (top-{served['top_k']} log-probs)")))
    kl = result.get("kl")
    if kl:
        a = kl["all"]
        ci = a.get("ci95")
        rejection_ci = a.get("token_rejection_ci95")
        rows += [
            ("KL divergence", f"{_g(a['mean'])}" + (f" (95% CI {_g(ci[0])} – {_g(ci[1])})" if ci else "")
             + f"; top-{kl['top_n']} KL over {a['tokens']:,} positions of {kl['prompts']} prompts"),
            ("KL p50 / p90 / p99", f"{_g(a.get('median'))} / {_g(a.get('p90'))} / {_g(a.get('p99'))} "
                                    f"(max {_g(a.get('max'))})"),
            ("token rejection rate", f"{_f(a['token_rejection_rate'])}"
             + (f" (95% CI {_f(rejection_ci[0])} – {_f(rejection_ci[1])})" if rejection_ci else "")),
            ("shared prompt prefix", esc(shared_prefix_note(kl))),
        ]
    else:
        rows.append(("KL divergence", _missing(NOT_MEASURED)))
    for name, k in (result.get("kl_text") or {}).items():
        s = k["all"]
        rows.append((f"KL on {esc(name)}", f"{_g(s['mean'])} {_ci(s['ci95'])} over {_count(k['windows'], 'window')} of "
                                           f"{k['seqlen']} (all prefill)"))
    ppl = result.get("ppl") or {}
    for name, p in ppl.items():
        ratio = ("" if p.get("ln_ratio") is None else f"; ln(PPL ratio) {p['ln_ratio']:.5f} ± "
                 f"{p['ln_ratio_stderr']:.5f} (SE)")
        cand = _missing(NOT_MEASURED) if p.get("candidate") is None else f"{p['candidate']:.4f}"
        rows.append((f"perplexity {esc(name)}", f"{p['reference']:.4f} → {cand} (reference → candidate){ratio}; "
                                                 f"{_count(p['windows'], 'window')} of {p['seqlen']}"))
    if not ppl:
        rows.append(("perplexity", _missing(NOT_MEASURED)))
    tasks = result.get("tasks") or {}
    for name, t in tasks.items():
        norm = ("" if t.get("reference_acc_norm") is None else
                f"; acc_norm {_f(t['reference_acc_norm'], 3)} → {_f(t.get('candidate_acc_norm'), 3)}")
        rows.append((f"{esc(name)} (n={t['n']})", f"acc {_f(t['reference'], 3)} → {_f(t['candidate'], 3)}{norm}; "
                                                 f"flips {_f(t['flips'], 3)}"))
    if not tasks:
        rows.append(("tasks", _missing(NOT_MEASURED)))
    return rows


def _splits_table(kl: dict) -> str:
    """KL and rejection per split (all, prefill, generation, and the prefill without the shared prefix)."""
    head = ("split", "positions", "KL mean", "95% CI", "KL full", "p50", "p90", "p99", "max", "token rejection",
            "spec. rejection", "RMS Δp")
    splits = [(s, kl[s]) for s in ("all", "prefill", "generation")]
    if kl.get("prefill_unshared"):
        splits.append(("prefill without the shared prefix", kl["prefill_unshared"]))
    rows = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in (
            name, f"{s['tokens']:,}", _g(s["mean"]), _ci(s["ci95"]), _g(s["mean_full"]), _g(s.get("median")),
            _g(s.get("p90")), _g(s["p99"]), _g(s["max"]), _f(s["token_rejection_rate"], 3),
            _f(s["spec_rejection"], 3), _f(s["rms_dp"], 3))) + "</tr>" for name, s in splits)
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + rows + "</table>")


def html_report(result: dict) -> str:
    """The page for one candidate (`lowbit eval --report`): a summary of what the candidate is and what was measured
    at the top ('not measured' where a part was not run), KL by split with its percentiles, the plots, and where it
    diverges."""
    esc = html.escape
    candidate = str(result["candidate"])
    rows = [("candidate", f"<code>{esc(candidate)}</code>"),
            ("reference", f"<code>{esc(str(result['reference']))}</code>"),
            *_candidate_rows(result), *_measured_rows(result)]
    body = [f"<h1>lowbit evaluation: {esc(Path(candidate).name or candidate)}</h1>",
            "<table class='kv' id='summary'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
            + "</table>"]
    kl = result.get("kl")
    if kl:
        record = kl.get("record") or {}
        source = (f" The reference's greedy generations on {record.get('num_prompts')} prompts "
                  f"({record.get('prompts')}), up to {record.get('max_new_tokens')} new tokens each."
                  if record.get("prompts") else "")
        body.append(f"<h2>KL by split</h2><p>Top-{kl['top_n']} KL (Fireworks), 95% CI by resampling prompts."
                    f"{esc(source)}</p>{_splits_table(kl)}")
        body += _divergence_sections([(candidate, kl)])
    if result.get("timings_s"):
        body.append("<p class='meta'>time: " + esc(", ".join(f"{k} {v:.1f} s" for k, v in result["timings_s"].items()))
                    + "</p>")
    return _page(f"lowbit evaluation: {candidate}", body)


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
