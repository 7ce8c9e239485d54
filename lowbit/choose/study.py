"""`lowbit sensitivity`: a model, one or more formats, a prompt set → the ranked table, the heat map, the files.

Everything a user can get wrong (scheme, method, unit, a record from another model) is checked before the model
runs. The files go into one directory, written atomically: sensitivity.json (every row, the proxies' rank
correlations per format), sensitivity.csv, sensitivity.md (ranked by measured KL), per layer heatmap.png (block ×
layer kind, log10 KL), and sensitivity.html (both on one self-contained page).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lowbit.choose.sensitivity import UNITS, Row, block_of, group_units, probe, rank_correlation, sensitivity
from lowbit.errors import LowbitError
from lowbit.formats import PerGroup
from lowbit.formats.spec import LayerSpec
from lowbit.methods.registry import get_method
from lowbit.recipe import Recipe

# Methods that round one layer from its own statistics; transforms (AWQ, SmoothQuant) act on groups of layers.
ROUNDING_METHODS = ("rtn", "imatrix", "gptq", "spqr")


@dataclass(frozen=True)
class SensitivityConfig:
    model: str
    schemes: tuple[str, ...] = ("w3a16",)
    method: str = "rtn"
    group_size: int | None = None
    symmetric: bool = True
    by: str = "layer"
    prompts: str | None = None
    max_prompts: int = 16
    max_new_tokens: int = 64
    top_n: int = 16
    reference_record: str | None = None
    measure: bool = True
    device: str = "cpu"
    progress: bool = True

    def recipes(self) -> dict[str, Recipe]:
        """One recipe per scheme, labelled by scheme and group size (checked: a bad scheme fails here)."""
        if self.method not in ROUNDING_METHODS:
            raise LowbitError(f"sensitivity quantizes one layer at a time, which {self.method} cannot (it transforms "
                              f"groups of layers); use one of {', '.join(ROUNDING_METHODS)}.")
        if self.by not in UNITS:
            raise LowbitError(f"--by {self.by!r} is not a unit; choose one of {', '.join(UNITS)}.")
        if not self.schemes:
            raise LowbitError("give at least one --scheme.")
        out = {}
        for scheme in self.schemes:
            recipe = Recipe(method=self.method, scheme=scheme, group_size=self.group_size, symmetric=self.symmetric)
            out[format_label(recipe.default_spec, recipe.scheme)] = recipe
        return out


def format_label(spec: LayerSpec, scheme: str) -> str:
    """w3a16 g64, w4a16 per-channel, q4_k: short enough for a table column."""
    gran = getattr(spec.weight, "granularity", None)
    if gran is None:
        return scheme
    if isinstance(gran, PerGroup):
        return f"{scheme} g{gran.size}"
    return f"{scheme} {gran.to_dict()['type'].replace('_', '-')}"


def run(cfg: SensitivityConfig) -> dict:
    """Measure; returns what `write` saves."""
    from lowbit.eval.divergence import make_record
    from lowbit.eval.prompts import load_prompts
    from lowbit.eval.record import ReferenceRecord
    from lowbit.model.loading import family_of, load, load_tokenizer
    from lowbit.model.targets import fit_group_size, select_layers

    recipes = cfg.recipes()
    record = ReferenceRecord.load(cfg.reference_record) if cfg.reference_record else None
    prompts = None if record else load_prompts(cfg.prompts, cfg.max_prompts)
    start = time.perf_counter()
    model = load(cfg.model, device=cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    if record is not None:
        record.check_tokenizer(tokenizer, "model")
        if not record.made_by(model):
            raise LowbitError(f"the reference record was made by another model ({record.meta.get('model')!r}) than "
                              f"{cfg.model!r}; record this model's generations instead (drop --reference-record).")
        if cfg.max_prompts and cfg.max_prompts < record.num_sequences:
            record = record.first(cfg.max_prompts)
    else:
        texts, source = prompts
        record = make_record(model, tokenizer, texts, source=source, model_name=cfg.model,
                             max_new_tokens=cfg.max_new_tokens, top_n=cfg.top_n, progress=cfg.progress)
    family = family_of(model)
    recipes = {label: fit_group_size(model, family, r)[0] for label, r in recipes.items()}
    plans = {label: select_layers(model, family, r) for label, r in recipes.items()}
    first = next(iter(recipes.values()))
    method = get_method(first.method)
    base = next(iter(plans.values()))
    names = [n for n in base if all(n in p for p in plans.values())]  # a layer some override skips is left out
    pr = probe(model, family, record, {n: base[n] for n in names}, method, cfg.top_n, progress=cfg.progress)
    units = group_units(names, family, cfg.by)
    rows = sensitivity(pr, units, plans, method, first.config(method.module.Config), measure=cfg.measure,
                       progress=cfg.progress)
    correlation = {label: {proxy: rank_correlation([getattr(r, proxy) for r in rows if r.fmt == label],
                                                   [r.kl for r in rows if r.fmt == label]) if cfg.measure else None
                           for proxy in ("proxy", "weighted_error")} for label in plans}
    return {"model": cfg.model, "method": first.method, "by": cfg.by, "formats": list(plans),
            "prompts": record.num_sequences, "positions": int(record.position_offsets()[-1]),
            "rank_correlation": correlation, "seconds": round(time.perf_counter() - start, 1),
            "blocks": family.blocks, "rows": [asdict(r) for r in rows]}


def ranked(result: dict) -> list[dict]:
    key = "kl" if result["rows"] and result["rows"][0]["kl"] is not None else "proxy"
    return sorted(result["rows"], key=lambda r: -r[key])


def markdown(result: dict, limit: int | None = None) -> str:
    measured = bool(result["rows"]) and result["rows"][0]["kl"] is not None
    lines = [f"Sensitivity of {result['model']} ({result['method']}, by {result['by']}; {result['prompts']} prompts, "
             f"{result['positions']} positions)", ""]
    for label, rho in result["rank_correlation"].items():
        if rho["proxy"] is not None:
            lines.append(f"- {label}: Spearman rank correlation with the measured KL: Fisher estimate "
                         f"{rho['proxy']:.3f}, importance-weighted error {rho['weighted_error']:.3f}")
    lines += ["", "| rank | unit | format | bits/weight | measured KL | Fisher estimate | weighted error |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for i, r in enumerate(ranked(result)[:limit], 1):
        kl = f"{r['kl']:.5f}" if measured else "–"
        lines.append(f"| {i} | {r['unit']} | {r['fmt']} | {r['bits'] / r['weights']:.3f} | {kl} | {r['proxy']:.4g} "
                     f"| {r['weighted_error']:.4g} |")
    return "\n".join(lines) + "\n"


def csv_text(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["unit", "format", "bits", "weights", "bits_per_weight", "fisher_kl_estimate", "weighted_error", "kl"])
    for r in result["rows"]:
        w.writerow([r["unit"], r["fmt"], r["bits"], r["weights"], f"{r['bits'] / r['weights']:.4f}", r["proxy"],
                    r["weighted_error"], "" if r["kl"] is None else r["kl"]])
    return buf.getvalue()


def heatmap_png(result: dict, path: Path) -> bool:
    """Block × layer kind, one panel per format, log10 of the measured KL (else the proxy). False when the rows
    are not per layer."""
    if result["by"] != "layer" or not result["rows"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    key = "kl" if result["rows"][0]["kl"] is not None else "proxy"
    cells = {(r["fmt"], *block_of(r["unit"], result["blocks"])): r[key] for r in result["rows"]}
    kinds = list(dict.fromkeys(k for _, _, k in cells))
    blocks = sorted({b for _, b, _ in cells})
    fig, axes = plt.subplots(1, len(result["formats"]), squeeze=False,
                             figsize=(1.2 + 0.55 * len(kinds) * len(result["formats"]), 1.5 + 0.22 * len(blocks)))
    for ax, label in zip(axes[0], result["formats"], strict=True):
        grid = np.array([[cells.get((label, b, k), np.nan) for k in kinds] for b in blocks], dtype=float)
        im = ax.imshow(np.log10(np.maximum(grid, 1e-12)), aspect="auto", cmap="magma_r")
        ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=60, fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=6)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax, label=f"log10 {'KL' if key == 'kl' else 'Fisher KL estimate'}")
    fig.suptitle(f"{result['model']}: one layer quantized at a time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def html_page(result: dict, heatmap: Path | None) -> str:
    """The heat map and the ranked table on one self-contained page."""
    import base64
    import html

    from lowbit.eval.report import STYLE

    esc = html.escape
    md = markdown(result).splitlines()
    notes = "".join(f"<li>{esc(line[2:])}</li>" for line in md if line.startswith("- "))
    rows = [line.strip("|").split("|") for line in md if line.startswith("| ") and not line.startswith("| rank")]
    table = "".join("<tr>" + "".join(f"<td>{esc(c.strip())}</td>" for c in r) + "</tr>" for r in rows)
    img = "" if heatmap is None else (f"<img alt='heat map' src='data:image/png;base64,"
                                      f"{base64.b64encode(heatmap.read_bytes()).decode()}'>")
    head = ("<tr><th>rank</th><th>unit</th><th>format</th><th>bits/weight</th><th>measured KL</th>"
            "<th>Fisher estimate</th><th>weighted error</th></tr>")
    return (f"<!doctype html><html lang='en'><meta charset='utf-8'><title>lowbit sensitivity</title>"
            f"<style>{STYLE}</style><body><h1>{esc(md[0])}</h1><ul>{notes}</ul>{img}<table>{head}{table}</table>"
            f"</body></html>")


def write(result: dict, out: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every file into `out` atomically; returns the written paths."""
    from lowbit.io.atomic import atomic_directory

    with atomic_directory(out, overwrite) as tmp:
        (tmp / "sensitivity.json").write_text(json.dumps(result, indent=1))
        (tmp / "sensitivity.csv").write_text(csv_text(result))
        (tmp / "sensitivity.md").write_text(markdown(result))
        drawn = heatmap_png(result, tmp / "heatmap.png")
        (tmp / "sensitivity.html").write_text(html_page(result, tmp / "heatmap.png" if drawn else None),
                                              encoding="utf-8")
        names = sorted(p.name for p in tmp.iterdir())
    return [Path(out) / n for n in names]


__all__ = ["Row", "SensitivityConfig", "csv_text", "heatmap_png", "markdown", "ranked", "run", "write"]
