"""AWQ's motivating experiment (Lin et al., §3.1, Table 1) on SmolLM2-135M: INT3 g64 round-to-nearest with 1% of
each layer's input channels kept in 16 bits, chosen by activation magnitude, by weight magnitude, or at random.

The paper (OPT-6.7B, INT3 g128, WikiText-2 perplexity): 43.2 with plain RTN, 13.0 keeping 1% of the channels
by activation magnitude; keeping them by weight magnitude or at random helps far less. Here: every linear layer
of the decoder blocks, symmetric INT3 in groups of 64 with the full-range scale (lowbit's default for RTN); activation
magnitude = mean |x_j| over the calibration tokens (C4, 64 × 512) on the float model; weight magnitude = mean
|W_:j|; random with seed 0. Each candidate is a float model (fake-quantized weights with the kept columns
restored), evaluated like the other tables (KL on 80 prompts, 20 WikiText-2 windows by default).

    .venv/bin/python benchmarks/awq_salient.py
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gptq_spqr_table import evaluate_row, print_table, table_args

import lowbit
from lowbit.data.calibration import CalibConfig, calibration_ids
from lowbit.formats import IntFormat, PerGroup, fake_quantize
from lowbit.model.loading import family_of
from lowbit.model.targets import linear_layers

KEEP = 0.01


@torch.no_grad()
def activation_magnitude(model, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    count = [0]
    linears = linear_layers(model)

    def hook_for(name):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
        return hook

    handles = [linears[n].register_forward_pre_hook(hook_for(n)) for n in names]
    for batch in ids.split(8):
        model(input_ids=batch, use_cache=False)
        count[0] += batch.numel()
    for h in handles:
        h.remove()
    return {n: s / count[0] for n, s in sums.items()}


def main() -> None:
    args = table_args(__doc__.splitlines()[0], "out/bench/salient")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = lowbit.load("smollm2-135m")
    tok = lowbit.load_tokenizer("smollm2-135m")
    family = family_of(model)
    names = [n for n in linear_layers(model) if n.startswith(family.blocks + ".")]
    ids = calibration_ids(tok, CalibConfig("c4", args.samples, args.seqlen), model.config.max_position_embeddings)
    act = activation_magnitude(model, ids, names)
    fmt = IntFormat(3, True, PerGroup(64), full_range=True)
    gen = torch.Generator().manual_seed(0)
    choosers = {
        "RTN w3a16 g64, nothing kept": None,
        "1% kept by activation magnitude": lambda n, w: act[n],
        "1% kept by weight magnitude": lambda n, w: w.abs().mean(0),
        "1% kept at random": lambda n, w: torch.rand(w.shape[1], generator=gen),
    }
    for name, chooser in choosers.items():
        slug = name.lower().split(",")[0].replace(" ", "-").replace("%", "pct")
        if (out / f"{slug}.json").exists():
            continue
        t = time.perf_counter()
        candidate = copy.deepcopy(model)
        linears = linear_layers(candidate)
        kept = 0
        with torch.no_grad():
            for n in names:
                w = linears[n].weight
                q = fake_quantize(w, fmt)
                if chooser is not None:
                    cols = chooser(n, w).topk(math.ceil(KEEP * w.shape[1])).indices
                    q[:, cols] = w[:, cols]
                    kept += cols.numel() * w.shape[0]
                w.copy_(q)
        weights = sum(linears[n].weight.numel() for n in names)
        bits = fmt.bits + 16 * weights / 64 / weights + (16 - fmt.bits) * kept / weights  # codes, scales, kept
        candidate.save_pretrained(out / slug)
        tok.save_pretrained(out / slug)
        row = evaluate_row(name, out / slug, bits, time.perf_counter() - t, args)
        (out / f"{slug}.json").write_text(json.dumps(row))
        print(json.dumps(row), flush=True)
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    order = list(choosers)
    print_table(sorted(rows, key=lambda r: order.index(r["name"])))


if __name__ == "__main__":
    main()
