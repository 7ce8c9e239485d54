"""A sweep's results as a table, a Pareto chart and a recommendation.

The frontier is over (bits per weight, mean KL), both minimized (lowbit.choose.pareto). The recommendation: the
smallest point whose KL is under the threshold (default 0.007, Fireworks' "high quality" line), and the point with
the least KL at or under the size budget. Each mixed-precision point is compared, prompt by prompt on the same
teacher-forced tokens, with every uniform point that spends as many bits per weight or more (`margins`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from lowbit.choose.pareto import frontier


def finished(results: list[dict]) -> list[dict]:
    return [r for r in results if "error" not in r]


def on_frontier(results: list[dict]) -> list[dict]:
    done = finished(results)
    return [done[i] for i in frontier([(r["bits_per_weight"], r["kl"]) for r in done])]


def recommend(results: list[dict], kl_threshold: float, size_budget_bpw: float | None) -> dict:
    done = finished(results)
    under = [r for r in done if r["kl"] <= kl_threshold]
    smallest = min(under, key=lambda r: (r["bits_per_weight"], r["kl"])) if under else None
    fits = [r for r in done if size_budget_bpw is not None and r["bits_per_weight"] <= size_budget_bpw]
    best = min(fits, key=lambda r: (r["kl"], r["bits_per_weight"])) if fits else None
    return {"kl_threshold": kl_threshold, "smallest_under_threshold": smallest and smallest["label"],
            "size_budget_bpw": size_budget_bpw, "best_within_size": best and best["label"]}


def margins(results: list[dict], per_prompt: dict[str, list[float]], tokens_per_prompt: np.ndarray,
            seed: int = 0) -> list[dict]:
    """Each mixed point against each uniform point with as many bits per weight or more: the margin
    Δ = KL(uniform) − KL(mixed) (positive: the mixed point is better) and its 95% CI.

    Both were scored on the same tokens of the same record, so the comparison is paired: the per-prompt differences,
    weighted by each prompt's token count (the token-weighted means differ by exactly Δ), resampled by prompt as
    lowbit.eval.stats.bootstrap_ci does for one candidate. `per_prompt` maps a label to its per-prompt mean KL.
    """
    from lowbit.eval.stats import bootstrap_ci

    done = [r for r in finished(results) if r["label"] in per_prompt]
    mixed = [r for r in done if r["point"].get("target_bpw") is not None]
    uniform = sorted((r for r in done if r["point"].get("target_bpw") is None), key=lambda r: r["bits_per_weight"])
    rows = []
    for m in mixed:
        for u in uniform:
            if u["bits_per_weight"] < m["bits_per_weight"] - 1e-9:
                continue
            a, b = np.asarray(per_prompt[u["label"]], float), np.asarray(per_prompt[m["label"]], float)
            n = np.asarray(tokens_per_prompt[:len(a)], float)
            if len(a) != len(b) or len(n) != len(a):
                raise ValueError(f"{u['label']} and {m['label']} were not scored on the same prompts")
            delta = float(((a - b) * n).sum() / n.sum())
            lo, hi = bootstrap_ci(np.repeat(a - b, n.astype(int)), np.repeat(np.arange(len(a)), n.astype(int)),
                                  seed=seed)
            rows.append({"mixed": m["label"], "mixed_bpw": m["bits_per_weight"], "uniform": u["label"],
                         "uniform_bpw": u["bits_per_weight"], "margin": delta, "margin_ci95": [lo, hi],
                         "relative": delta / u["kl"] if u["kl"] else None})
    return rows


def margins_markdown(rows: list[dict]) -> str:
    lines = ["| mixed | bits/weight | uniform | bits/weight | KL(uniform) − KL(mixed) [95% CI] | relative |",
             "|---|---:|---|---:|---|---:|"]
    for r in rows:
        lo, hi = r["margin_ci95"]
        rel = "–" if r["relative"] is None else f"{100 * r['relative']:+.1f}%"
        lines.append(f"| {r['mixed']} | {r['mixed_bpw']:.3f} | {r['uniform']} | {r['uniform_bpw']:.3f} | "
                     f"{r['margin']:+.5f} [{lo:+.5f}, {hi:+.5f}] | {rel} |")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict], rec: dict, margin_rows: list[dict] | None = None) -> str:
    front = {r["label"] for r in on_frontier(results)}
    lines = ["| configuration | bits/weight | MB | mean KL [95% CI] | token rejection | ppl | frontier |",
             "|---|---:|---:|---|---:|---|:-:|"]
    for r in sorted(finished(results), key=lambda r: (r["bits_per_weight"], r["kl"])):
        ci = r["kl_ci95"]
        ppl = ", ".join(f"{k} {v:.3f}" for k, v in r["ppl"].items()) or "–"
        mb = f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else "–"
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {mb} | {r['kl']:.5f} [{ci[0]:.5f}, {ci[1]:.5f}] "
                     f"| {r['token_rejection_rate']:.4f} | {ppl} | {'●' if r['label'] in front else ''} |")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:200]} | | | | | |")
    lines.append("")
    s, b = rec["smallest_under_threshold"], rec["best_within_size"]
    lines.append(f"Recommended: {s} (the smallest with mean KL ≤ {rec['kl_threshold']:g})" if s else
                 f"No configuration reaches mean KL ≤ {rec['kl_threshold']:g}.")
    if rec["size_budget_bpw"] is not None:
        lines.append(f"Within {rec['size_budget_bpw']:g} bits per weight: {b}" if b else
                     f"No configuration fits {rec['size_budget_bpw']:g} bits per weight.")
    if margin_rows:
        lines += ["", "Mixed precision against every uniform point with as many bits per weight or more (paired over "
                  "the same prompts; positive: the mixed point diverges less):", "", margins_markdown(margin_rows)]
    return "\n".join(lines) + "\n"


def csv_text(results: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["configuration", "bits_per_weight", "bytes", "kl", "kl_lo", "kl_hi", "token_rejection_rate", "ppl",
                "error"])
    for r in results:
        if "error" in r:
            w.writerow([r["label"], "", "", "", "", "", "", "", r["error"]])
        else:
            w.writerow([r["label"], f"{r['bits_per_weight']:.4f}", r.get("bytes") or "", r["kl"], *r["kl_ci95"],
                        r["token_rejection_rate"], ";".join(f"{k}={v}" for k, v in r["ppl"].items()), ""])
    return buf.getvalue()


def chart_png(results: list[dict], rec: dict, path: Path, title: str) -> None:
    """Mean KL (log scale) against bits per weight; the frontier joined, the threshold dashed, mixed points as
    diamonds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = finished(results)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for mixed, marker in ((False, "o"), (True, "D")):
        pts = [r for r in done if (r["point"].get("target_bpw") is not None) == mixed]
        if pts:
            ax.scatter([r["bits_per_weight"] for r in pts], [r["kl"] for r in pts], marker=marker, s=28, zorder=3,
                       label="mixed precision" if mixed else "uniform")
    front = on_frontier(results)
    ax.plot([r["bits_per_weight"] for r in front], [r["kl"] for r in front], "-", color="0.3", lw=1, zorder=2,
            label="Pareto frontier")
    names = {r["label"] for r in front}
    for r in done:
        on = r["label"] in names
        ax.annotate(r["label"], (r["bits_per_weight"], r["kl"]), fontsize=6, xytext=(5, 3) if on else (-5, 3),
                    ha="left" if on else "right", textcoords="offset points", color="black" if on else "0.4")
    ax.axhline(rec["kl_threshold"], ls="--", color="tab:green", lw=1, label=f"KL {rec['kl_threshold']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (everything counted)")
    ax.set_ylabel("mean KL vs the 16-bit model")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write(results: list[dict], rec: dict, out: Path, title: str,
          runs: list[tuple[str, dict]] | None = None, margin_rows: list[dict] | None = None) -> list[Path]:
    """sweep.md, sweep.csv, sweep.json and, with a finished point, frontier.png and report.html (every finished
    point's evaluation side by side, lowbit.eval.report) in `out`, each atomically."""
    from lowbit.io.atomic import atomic_file

    texts = {"sweep.md": markdown(results, rec, margin_rows), "sweep.csv": csv_text(results),
             "sweep.json": json.dumps({"results": results, "recommendation": rec, "margins": margin_rows or []},
                                      indent=1)}
    for name, text in texts.items():
        with atomic_file(out / name) as tmp:
            tmp.write_text(text)
    written = [out / name for name in texts]
    if finished(results):
        with atomic_file(out / "frontier.png") as tmp:
            chart_png(results, rec, tmp, title)
        written.append(out / "frontier.png")
    if runs:
        import base64

        from lowbit.eval.report import comparison_report

        png = base64.b64encode((out / "frontier.png").read_bytes()).decode()
        page = comparison_report(runs, f"<img alt='frontier' src='data:image/png;base64,{png}'>", title)
        with atomic_file(out / "report.html") as tmp:
            tmp.write_text(page, encoding="utf-8")
        written.append(out / "report.html")
    return written
