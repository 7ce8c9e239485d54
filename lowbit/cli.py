"""The `lowbit` command: parses arguments, builds a config, calls lowbit.api, prints a summary."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from lowbit.errors import LowbitError


def _recipe_from_args(args: argparse.Namespace):
    from lowbit.recipe import Recipe

    if args.recipe and args.preset:
        raise LowbitError("give either --recipe or --preset, not both (a preset is a recipe).")
    recipe = Recipe.from_yaml(args.recipe) if args.recipe else Recipe.preset(args.preset) if args.preset else Recipe()
    scheme = args.scheme or ("fp8" if args.method == "fp8" else None)
    if scheme is None and (args.method or "").startswith("smoothquant") and recipe.scheme not in ("w8a8", "fp8"):
        scheme = "w8a8"
    options = {"act_order": args.act_order, "damp": args.damp, "block_size": args.block_size,
               "stat_bits": args.stat_bits, "stat_group": args.stat_group,
               "outlier_threshold": args.outlier_threshold, "outlier_rate": args.outlier_rate, "alpha": args.alpha,
               "smooth_all": True if args.smooth_all else None, "awq_clip": False if args.no_awq_clip else None}
    recipe = recipe.with_options(
        method=args.method, scheme=scheme, group_size=args.group_size,
        symmetric=False if (args.asym or args.zero_point) else None, clip=True if args.clip else None,
        zero_point=args.zero_point,
        targets=tuple(args.targets) if args.targets else None, ignore=tuple(args.ignore) if args.ignore else None,
        options={k: v for k, v in options.items() if v is not None}, per_tensor=True if args.per_tensor else None,
        full_range=False if args.restricted_range else (True if args.full_range else None),
        act_granularity=args.act_granularity, act_static=True if args.act_static else None,
        parts=_names(args.parts) or None, kv_cache=args.kv_cache,
        kv_static=True if args.kv_static else None, expert_min_tokens=args.expert_min_tokens,
        experts_all_tokens=True if args.experts_all_tokens else None,
    )
    if getattr(args, "format", "lowbit") == "compressed-tensors" and recipe.kv_cache and not recipe.kv_static:
        recipe = recipe.with_options(kv_static=True)  # vLLM reads static k_scale / v_scale: calibrate them
    return recipe


def _calib_from_args(args: argparse.Namespace, needed: bool = True):
    """The calibration the options ask for (None: the method's default); `needed`: the method calibrates (--fast
    changes nothing for one that does not)."""
    from lowbit.data.calibration import FAST, CalibConfig

    if getattr(args, "fast", False) and needed:
        if args.calib_samples is not None or args.calib_seqlen is not None:
            raise LowbitError("--fast sets the calibration's size (32 windows of 512 tokens); give either --fast or "
                              "--calib-samples/--calib-seqlen.")
        args.calib_samples, args.calib_seqlen = FAST.samples, FAST.seqlen
    given = {k: v for k, v in {"dataset": args.calib, "samples": args.calib_samples, "seqlen": args.calib_seqlen,
                               "seed": args.seed}.items() if v is not None}
    return CalibConfig(**given) if given else None


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit import api
    from lowbit.io.export import check_family, check_recipe, check_writable, export
    from lowbit.model.architectures import family_for
    from lowbit.model.sources import resolve
    from lowbit.summary import print_summary

    recipe = _recipe_from_args(args)
    if args.format == "gguf":  # one file; refuse what it cannot hold, or where it cannot go, before quantizing
        from lowbit.io.gguf_export import check_gguf_target

        out = check_gguf_target(args.model, recipe, args.out, args.overwrite)
    else:
        out = check_writable(args.out, args.overwrite)
    if args.format == "compressed-tensors":
        check_recipe(recipe)  # refuse what the format cannot hold before quantizing
        check_family(api.model_type(args.model))
    calib = _calib_from_args(args, api.calibration_needed(recipe, args.reuse_scales))
    api.check_calibration_data(recipe, calib, args.reuse_scales)
    if resolve(args.model).kind == "hf":  # an architecture lowbit cannot quantize is said before anything loads
        family_for(api.model_type(args.model))
    tokenizer = api.load_tokenizer(args.model)
    whole, source = _whole_model_reasons(args, recipe)
    if not whole:
        import shlex

        from lowbit.streaming import quantize_streamed

        again = " ".join(shlex.quote(a) for a in ["lowbit", *sys.argv[1:]] if a != "--resume") + " --resume"
        result, header = quantize_streamed(source, recipe, out, tokenizer=tokenizer, calib=calib,
                                           device=args.device, dtype=args.dtype, compute_dtype=args.compute_dtype,
                                           progress=not args.quiet, reuse_scales=args.reuse_scales,
                                           resume=args.resume, overwrite=args.overwrite, resume_hint=again)
        print_summary(result, header, out)
        return 0
    if args.resume:
        raise LowbitError(f"--resume continues a run that reads the model block by block from disk; this one loads "
                          f"it whole ({', '.join(whole)}) and is not checkpointed. Drop --resume.")
    model, mixed = args.model, None
    if args.target_bpw is not None or args.target_size is not None:
        from lowbit.choose.mixed import (
            DEFAULT_CHOICES,
            bits_per_targeted_weight,
            check_target,
            choose,
            parse_choices,
            parse_size,
            size_to_bpw,
        )
        from lowbit.data.calibration import CalibConfig
        from lowbit.model.loading import family_of

        if args.target_bpw is not None and args.target_size is not None:
            raise LowbitError("give either --target-bpw or --target-size, not both.")
        size = parse_size(args.target_size) if args.target_size is not None else None
        check_target(args.target_bpw if size is None else 16.0, recipe.method)
        menu = parse_choices(args.choices or DEFAULT_CHOICES)
        model = api.load(args.model)
        family = family_of(model)
        target = args.target_bpw if size is None else size_to_bpw(model, family, recipe, size,
                                                                  api.storage_dtype(model, args.dtype))
        mixed = choose(model, tokenizer, family, recipe, target, menu, calib or CalibConfig(samples=16, seqlen=512),
                       progress=not args.quiet)
        if size is not None:
            mixed.info["target_size_bytes"] = size
        recipe = mixed.recipe
    result = api.quantize(model, recipe, tokenizer=tokenizer, calib=calib, device=args.device, dtype=args.dtype,
                          reuse_scales=args.reuse_scales,
                          compute_dtype=args.compute_dtype, progress=not args.quiet)
    if mixed is not None:
        result.source = args.model
        result.allocation = {**mixed.info, "bits_per_weight_measured": bits_per_targeted_weight(
            result.model, family, result.sizes)}
    if args.format == "compressed-tensors":
        header = export(result, "compressed-tensors", out, tokenizer=tokenizer, overwrite=args.overwrite)
    elif args.format == "gguf":
        written = export(result, "gguf", out, overwrite=args.overwrite)
        header = {"bytes_on_disk": written["bytes_on_disk"]}
    else:
        header = api.save(result, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print_summary(result, header, out)
    return 0


def _whole_model_reasons(args: argparse.Namespace, recipe) -> tuple[list[str], object]:
    """Why the run loads the whole model; none, with the model opened for it, when it reads it block by block from
    disk (the default)."""
    from lowbit.model.sources import resolve
    from lowbit.streaming import whole_model_reason

    reasons = [("--in-memory", args.in_memory), (f"--format {args.format}", args.format != "lowbit"),
               ("--target-bpw/--target-size", args.target_bpw is not None or args.target_size is not None),
               ("--kv-cache", bool(recipe.kv_cache)),
               ("the model is not a Hugging Face directory", resolve(args.model).kind not in ("hf", "builtin"))]
    why = [name for name, applies in reasons if applies]
    if why:
        return why, None
    source, reason = whole_model_reason(args.model)
    if reason:
        print(f"lowbit: loading the whole model: it cannot be read block by block ({reason})", file=sys.stderr)
        why.append(reason)
    return why, source


def cmd_export(args: argparse.Namespace) -> int:
    from lowbit.io.export import export

    written = export(args.checkpoint, args.to, args.out, overwrite=args.overwrite,
                     max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"exported {args.checkpoint} as {args.to}: {len(written['files'])} files, "
          f"{written['bytes_on_disk'] / 1e6:.1f} MB in {args.out}")
    return 0


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.preflight import check_eval_inputs
    from lowbit.eval.report import html_report, text_report, write_text
    from lowbit.eval.runner import EvalConfig, evaluate, write_json

    candidates = args.candidate or []
    if len(candidates) > 1 and not args.out:
        raise LowbitError("several candidates are evaluated into a folder: give --out DIR (a rerun keeps what is "
                          "finished there).")
    if args.out and (args.json or args.report):
        raise LowbitError("with --out, each candidate's results are DIR/<candidate>.json and the report "
                          "DIR/report.html; drop --json and --report.")
    cfg = EvalConfig(
        reference=args.reference, candidate=candidates[0] if len(candidates) == 1 else None, kl=args.kl,
        kl_text=_names(args.kl_text), ppl=_names(args.ppl), tasks=_names(args.tasks),
        prompts=args.prompts, max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens, top_n=args.top_n,
        save_reference=args.save_reference, reference_record=args.reference_record, record_dtype=args.record_dtype,
        seqlen=args.seqlen, max_windows=args.max_windows, limit=args.limit, batch_tokens=args.batch_tokens,
        seed=args.seed, device=args.device, progress=not args.quiet, tokenizer=args.tokenizer,
        served=_served_options(args))
    check_eval_inputs(cfg, {"--json": args.json, "--report": args.report})
    if args.out:
        from lowbit.io.atomic import check_writable_folder

        check_writable_folder(args.out, "--out")
    if args.out:
        from lowbit.eval.many import REPORT, evaluate_many, summary_lines

        runs = evaluate_many(cfg, candidates, args.out)
        print("\n".join(summary_lines(runs)))
        print(f"\nwrote {len(runs)} results and {REPORT} in {args.out}")
        return 0
    result = evaluate(cfg)
    print(text_report(result))
    if args.json:
        write_json(result, args.json)
        print(f"\nwrote {args.json}")
    if args.report:
        write_text(html_report(result), args.report)
        print(f"wrote {args.report}")
    if args.save_reference:
        print(f"saved the reference record to {args.save_reference}")
    return 0


def _served_options(args: argparse.Namespace):
    from lowbit.eval.openai_client import RetryPolicy
    from lowbit.eval.served import ServedOptions

    return ServedOptions(api_key_env=args.api_key_env, top_k=args.endpoint_top_k, concurrency=args.concurrency,
                         timeout=args.request_timeout, retry=RetryPolicy(total=max(0.0, args.retry_seconds)),
                         cache=not args.no_endpoint_cache, progress=not args.quiet)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from lowbit.choose.study import SensitivityConfig, markdown, run, write
    from lowbit.io.export import check_writable

    cfg = SensitivityConfig(
        model=args.model, schemes=tuple(_names(args.scheme)), method=args.method, group_size=args.group_size,
        symmetric=not args.asym, by=args.by, prompts=args.prompts, max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens, reference_record=args.reference_record, measure=not args.proxy_only,
        device=args.device, progress=not args.quiet)
    cfg.recipes()  # a bad scheme, method or unit is said before anything loads
    check_writable(args.out, args.overwrite)
    result = run(cfg)
    print(markdown(result, limit=args.show))
    for path in write(result, args.out, args.overwrite):
        print(f"wrote {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lowbit.choose.sweep import Grid, RayOptions, conclude, sweep

    grid = Grid.load(args.grid)  # every point is checked before any work
    if args.kl_threshold is not None:
        grid.kl_threshold = args.kl_threshold
    if args.size_budget is not None:
        grid.size_budget_bpw = args.size_budget
    out = Path(args.out)
    if out.exists() and not (out / "grid.json").exists():
        raise LowbitError(f"{str(out)!r} exists and is not a sweep's directory; choose another --out (a sweep's own "
                          f"directory is resumed).")
    ray = RayOptions(args.ray_address, args.cpus_per_point, args.gpus_per_point)
    record = Path(args.reference_record) if args.reference_record else None
    results = sweep(args.model, grid, out, record, progress=not args.quiet, executor=args.executor, ray_options=ray)
    title = f"{args.model}: {sum('error' not in r for r in results)} configurations"
    summary, written = conclude(grid, out, results, title, record)
    print(summary)
    print(f"wrote {', '.join(p.name for p in written)} in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.demo import run_demo

    return run_demo(out=args.out, quiet=args.quiet)


def cmd_info(args: argparse.Namespace) -> int:
    from lowbit.io.checkpoint import header_hashed, read_header, verify_files
    from lowbit.model.loading import describe_gguf
    from lowbit.model.sources import resolve

    source = resolve(args.checkpoint)
    if source.kind == "gguf":
        info = {**describe_gguf(source.path), "note": f"{NOT_LOWBIT}: a GGUF file (llama.cpp's format), described "
                                                     "from its header"}
    elif source.kind != "lowbit":
        info = _model_info(args.checkpoint, source)
    else:
        header = read_header(source.path)
        verify_files(source.path, header)
        info = {k: v for k, v in header.items() if k not in ("layers", "files", "blocks")}
        info["checked"] = ("the sha256 of the header and of every file it names" if header_hashed(header) else
                           "the sha256 of every file the header names; the header itself is not covered by a hash "
                           "(it was written before lowbit hashed headers), so its own fields are unchecked")
    print(json.dumps(info, indent=1))
    return 0


NOT_LOWBIT = "not a lowbit checkpoint, so there are no hashes to check"


def _model_info(name: str, source) -> dict:
    """What any other model argument holds: its format, quantized layers by format, bits per weight, bytes."""
    from collections import Counter

    from lowbit import api
    from lowbit.io.checkpoint import quantized_layers
    from lowbit.summary import describe_spec

    model = api.load(name, progress=False)
    sizes = api.size_report(model, _dtype_of(model))
    formats = Counter(describe_spec(m.spec) for m in quantized_layers(model).values())
    files = list(source.path.glob("*.safetensors")) if source.kind != "builtin" else []
    what = {"hf": "a Hugging Face model directory", "builtin": "lowbit's built-in model"}.get(
        source.kind, f"a {source.kind} checkpoint (as its config.json's quantization_config says)")
    return {"format": source.kind, "model_type": model.config.model_type,
            "quantized_layers": sizes["quantized_layers"], "bits_per_weight": sizes["bits_per_weight"],
            "layer_formats": dict(formats), "kv_cache": getattr(model, "lowbit_kv_cache", None),
            "bytes_on_disk": sum(f.stat().st_size for f in files) or None, "note": f"{NOT_LOWBIT}: {what}"}


def _dtype_of(model):
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    p = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs after training and measure what it cost.")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a lowbit checkpoint")
    q.add_argument("model", help="built-in name (smollm2-135m), Hugging Face directory or .gguf file")
    q.add_argument("--method", help="rtn, imatrix, gptq, awq, smoothquant, smoothquant+gptq, spqr or fp8 (default: "
                                    "the recipe's, else rtn)")
    q.add_argument("--preset", help="a named recipe: spqr-near-lossless, spqr-3bit, smoothquant-o1/o2/o3 (options "
                                    "override its fields)")
    q.add_argument("--scheme", help="w8a16, w4a16, w3a16, w2a16 (any w{b}a16, b in 2..8), w8a8, fp8; llama.cpp's "
                                    "q8_0, q4_0, q4_1, q5_0, q5_1 (groups of 32)")
    q.add_argument("--group-size", type=int, help="input columns per scale; 0 or -1 = per output channel")
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (overrides --group-size)")
    span = q.add_mutually_exclusive_group()
    span.add_argument("--restricted-range", action="store_true",
                      help="symmetric grids: s = max|w| / (2^(b-1) - 1), so ±max|w| sit on a code (default for awq)")
    span.add_argument("--full-range", action="store_true",
                      help="symmetric grids: s = max|w| / (2^(b-1) - 1/2), a finer step (GPTQ's reference code, "
                           "AutoGPTQ, llm-compressor; default for every method but awq)")
    q.add_argument("--asym", action="store_true", help="asymmetric grid with a zero point (default symmetric)")
    q.add_argument("--zero-point", choices=("int", "float"),
                   help="asymmetric zero point: int (GPTQ/vLLM, default) or float (llama.cpp Q4_1-style "
                        "minimum); implies --asym")
    q.add_argument("--clip", action="store_true", help="choose each group's range by an error-minimizing search")
    m = q.add_argument_group("method options", "each belongs to one method (in a recipe file: its `options`); "
                             "given to another method, it is an error")
    m.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: columns by descending Hessian diagonal, with static groups (default: on, except on "
                        "llama.cpp's k-quant grids; --no-act-order: column order)")
    m.add_argument("--damp", type=float, help="GPTQ, SpQR: dampening, a fraction of the mean Hessian diagonal (0.01)")
    m.add_argument("--block-size", type=int, help="GPTQ, SpQR: columns per lazy batch (128)")
    m.add_argument("--stat-bits", type=int, help="SpQR: bits of the quantized scales and zeros (3; 16 = float16)")
    m.add_argument("--stat-group", type=int, help="SpQR: β2, output rows per second-level statistics grid (16)")
    m.add_argument("--outlier-threshold", type=float,
                   help="SpQR: τ, relative outlier threshold (0.2; inf = no outliers)")
    m.add_argument("--outlier-rate", type=float, help="SpQR: target outlier fraction, e.g. 0.01 (τ found per layer)")
    q.add_argument("--act-granularity", choices=("token", "tensor"),
                   help="w8a8/fp8 activations: one scale per token (default) or per tensor")
    q.add_argument("--act-static", action="store_true",
                   help="w8a8/fp8: the per-tensor activation scale is calibrated once (SmoothQuant O3)")
    m.add_argument("--alpha", type=float, help="SmoothQuant: migration strength in [0, 1] (default: searched per "
                                               "group; the paper's fixed choice is 0.5)")
    m.add_argument("--smooth-all", action="store_true",
                   help="SmoothQuant: also smooth down_proj's and o_proj's inputs (folded into up_proj and v_proj), "
                        "not only the norm-fed groups of the paper")
    m.add_argument("--no-awq-clip", action="store_true", help="AWQ: skip the clipping-range search")
    q.add_argument("--target-bpw", type=float, metavar="BITS",
                   help="mixed precision: choose each layer's format from --choices for the least predicted KL "
                        "(Fisher estimate on calibration text) within BITS per targeted weight, everything counted; "
                        "the chosen formats become the recipe's overrides (recipe.yaml reproduces the checkpoint)")
    q.add_argument("--target-size", metavar="SIZE",
                   help="mixed precision like --target-bpw, with the budget given as the size of every stored "
                        "tensor (e.g. 80MB, 1.5GB; model.safetensors less its JSON header): what the unquantized "
                        "tensors leave goes to the targeted layers")
    q.add_argument("--choices",
                   help="formats --target-bpw may give a layer: SCHEME[:GROUP] and 16 (kept in 16 bits), comma-"
                        "separated (default: w2a16:64, w3a16:128, w3a16:64, w4a16:128, w4a16:64, w4a16:32, "
                        "w5a16:64, w6a16:128, w8a16:0 and 16)")
    q.add_argument("--reuse-scales", metavar="PATH",
                   help="AWQ / SmoothQuant: apply the scales (and AWQ's clipping) that an earlier run saved — its "
                        "checkpoint directory or scales.safetensors — instead of searching them")
    q.add_argument("--expert-min-tokens", type=int, metavar="N",
                   help="mixture of experts: an expert routed fewer than N calibration tokens (default 16) is "
                        "calibrated on every token that reaches its block")
    q.add_argument("--experts-all-tokens", action="store_true",
                   help="mixture of experts: calibrate every expert on every token of its block, not only the "
                        "tokens routed to it")
    q.add_argument("--parts", help="comma-separated parts to quantize: mlp, qkv, o_proj, first_last, lm_head, "
                                   "kv_cache, attention; or a Fireworks level L1..L4 (default: every linear layer "
                                   "of the decoder blocks)")
    q.add_argument("--kv-cache", choices=("int8", "fp8"), help="store keys and values quantized")
    q.add_argument("--kv-static", action="store_true",
                   help="calibrate one KV scale per layer for keys and one for values (vLLM's k_scale / v_scale) "
                        "instead of computing one per token and head at run time")
    q.add_argument("--recipe", help="YAML recipe; command-line options override its fields")
    q.add_argument("--targets", action="append", metavar="REGEX", help="quantize linear layers whose name matches")
    q.add_argument("--ignore", action="append", metavar="REGEX", help="leave matching layers in 16 bits")
    q.add_argument("--calib", help="calibration set: c4 (default), wikitext2, ptb, or a file")
    q.add_argument("--calib-samples", type=int, help="calibration windows (default 128)")
    q.add_argument("--calib-seqlen", type=int, help="tokens per window (default 1024, capped at the context)")
    q.add_argument("--fast", action="store_true",
                   help="a small calibration: 32 windows of 512 tokens, 1/8 of the default's tokens (the quality "
                        "cost measured on SmolLM2 is in the README)")
    q.add_argument("--seed", type=int, help="seed for drawing calibration windows (default 0)")
    q.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    q.add_argument("--dtype", default="auto", help="16-bit dtype for unquantized tensors: auto, float16, bfloat16")
    q.add_argument("--compute-dtype", default="auto",
                   help="dtype of the calibration forward passes: auto (bfloat16 on a GPU or a CPU with AVX512-BF16/"
                        "AMX, else float32), float32, bfloat16, float16; statistics stay float32")
    q.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--format", choices=("lowbit", "compressed-tensors", "gguf"), default="lowbit",
                   help="what --out holds: a lowbit checkpoint (default), a compressed-tensors directory that vLLM, "
                        "SGLang and transformers load (with --kv-cache fp8 the KV scales are then calibrated), or one "
                        "GGUF file for llama.cpp (llama.cpp's schemes: q4_0 …, q2_k … q6_k, iq4_nl, q4_k_m …)")
    q.add_argument("--resume", action="store_true",
                   help="go on with an interrupted run of the same command from its last finished block (the output "
                        "is the same, bit for bit, as an uninterrupted run's)")
    q.add_argument("--in-memory", action="store_true",
                   help="load the whole model into memory instead of reading it block by block from disk (the way "
                        "taken anyway for --format compressed-tensors/gguf, --target-bpw/--target-size and --kv-cache)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    x = sub.add_parser("export", help="write a lowbit checkpoint in a format other engines load")
    x.add_argument("checkpoint", help="a lowbit checkpoint directory")
    x.add_argument("--to", required=True, help="compressed-tensors (vLLM, SGLang, transformers) or gguf (llama.cpp: "
                                                "llama.cpp block types, from a GGUF source)")
    x.add_argument("--out", required=True, help="output directory, or the .gguf file (refused if it exists, unless "
                                                "--overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    x.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard in GiB (5)")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="compare a candidate with its reference: KL, perplexity, tasks")
    e.add_argument("--reference", help="reference model (built-in name, Hugging Face directory, .gguf), or a served "
                                       "model openai+http://HOST:PORT/v1#MODEL (--kl only, with --tokenizer)")
    e.add_argument("--candidate", action="append",
                   help="candidate: lowbit checkpoint, Hugging Face directory, .gguf, built-in name, or a served "
                        "model openai+http://HOST:PORT/v1#MODEL (OpenAI-compatible API, teacher-forced through the "
                        "completions API's echoed log-probs; --kl only). Repeat it for several, with --out")
    e.add_argument("--kl", action="store_true", help="divergence on reference generations (Fireworks method)")
    e.add_argument("--kl-text", help="divergence over the perplexity windows of these texts (every position is "
                                     "prefill; what llama-perplexity --kl-divergence measures)")
    e.add_argument("--ppl", help="comma-separated perplexity sets: wikitext2, ptb, c4, or text files")
    e.add_argument("--tasks", help="comma-separated tasks: piqa, arc_easy, arc_challenge, winogrande, hellaswag, "
                                   "lambada_openai, boolq, mmlu, mmlu_5shot, openbook_qa, copa, siqa, "
                                   "commonsense_qa")
    e.add_argument("--prompts", help="prompt set: mt_bench, vicuna_bench, builtin, a .jsonl (MT-bench format) or "
                                     "a .txt file (default: MT-bench and Vicuna-bench first turns)")
    e.add_argument("--max-prompts", type=int, help="use the first N prompts")
    e.add_argument("--max-new-tokens", type=int, default=256, help="reference generation length limit (default 256)")
    e.add_argument("--top-n", type=int, default=16, help="reference log-probs recorded per position (default 16)")
    e.add_argument("--save-reference", metavar="FILE",
                   help="save the reference record (reuse it with --reference-record)")
    e.add_argument("--reference-record", metavar="FILE", help="a record saved earlier; the reference is not re-run")
    e.add_argument("--record-dtype", choices=("float32", "float16"), default="float32",
                   help="log-prob precision in a saved record (float16 halves its size)")
    e.add_argument("--seqlen", type=int, default=2048, help="perplexity window (capped at the model's context)")
    e.add_argument("--max-windows", type=int, help="perplexity: first N windows only")
    e.add_argument("--limit", type=int, help="tasks: an evenly spaced subset of N items")
    e.add_argument("--batch-tokens", type=int, default=2048, help="tokens per forward batch")
    e.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence intervals")
    e.add_argument("--device", default="cpu",
                   help="cpu (default: float32, the reference runtime) or cuda / cuda:N (both models in 16 bits, "
                        "quantized layers on lowbit's GPU kernels)")
    e.add_argument("--out", metavar="DIR",
                   help="evaluate the candidates into this folder: the reference recorded once (reference."
                        "safetensors), each candidate's results as it finishes (<candidate>.json), report.html; a "
                        "rerun keeps every candidate finished with the same settings and files")
    e.add_argument("--json", metavar="FILE", help="write the results as JSON")
    e.add_argument("--report", metavar="FILE.html", help="write a self-contained HTML report with plots")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    v = e.add_argument_group("served models", "a candidate or reference given as openai+http(s)://HOST:PORT/v1#MODEL")
    v.add_argument("--tokenizer", metavar="MODEL",
                   help="a local model (directory, .gguf or built-in name) with the served model's tokenizer: needed "
                        "for a served reference; for a served candidate where no --reference MODEL gives it "
                        "(default: the record's model, if it is here)")
    v.add_argument("--api-key-env", metavar="NAME",
                   help="the environment variable holding the API key (sent as Authorization: Bearer; never "
                        "printed or saved)")
    v.add_argument("--endpoint-top-k", type=int, default=20, metavar="K",
                   help="log-probs asked for per position (default 20; lowered to 5, then 1, if the server refuses)")
    v.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    v.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                   help="seconds a request may wait for a connection or for data (default 300)")
    v.add_argument("--retry-seconds", type=float, default=180.0, metavar="S",
                   help="connection errors, timeouts, 429 and 5xx are retried with exponential backoff for up to S "
                        "seconds of waiting per request (default 180)")
    v.add_argument("--no-endpoint-cache", action="store_true",
                   help="neither reuse nor keep the answers of each sequence (kept by default under "
                        "$LOWBIT_CACHE/served, so that a rerun continues where a failed one stopped)")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sensitivity", help="the KL that quantizing each layer (layer kind, block) alone causes, "
                                           "ranked, with a heat map and two cheap proxies' rank correlations")
    s.add_argument("model", help="built-in name (smollm2-135m), Hugging Face directory or .gguf file")
    s.add_argument("--scheme", default="w3a16",
                   help="comma-separated schemes to measure each unit at (default w3a16), e.g. w2a16,w3a16,w4a16")
    s.add_argument("--group-size", type=int, help="columns per scale (0 = per output channel); scheme default")
    s.add_argument("--asym", action="store_true", help="asymmetric grids")
    s.add_argument("--method", default="rtn", help="rounding: rtn (default), imatrix, gptq or spqr, each layer "
                                                    "from its own float inputs")
    s.add_argument("--by", default="layer", choices=("layer", "type", "block"),
                   help="unit quantized alone: each layer (default), each layer kind across all blocks, each block")
    s.add_argument("--prompts", help="prompt set, as for eval (default: MT-bench and Vicuna-bench first turns)")
    s.add_argument("--max-prompts", type=int, default=16, help="first N prompts (default 16)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="reference generation length (default 64)")
    s.add_argument("--reference-record", metavar="FILE", help="use a saved record's sequences (made by this model)")
    s.add_argument("--proxy-only", action="store_true",
                   help="only the proxies (Fisher KL estimate, importance-weighted error): one forward and backward "
                        "pass, no measurement per unit")
    s.add_argument("--show", type=int, default=20, help="rows printed (default 20; the files hold all)")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--out", required=True, help="directory for sensitivity.json/.csv/.md and heatmap.png")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_sensitivity)

    w = sub.add_parser("sweep", help="quantize and evaluate a grid of configurations; table, Pareto chart and a "
                                     "recommendation (resumes where it stopped)")
    w.add_argument("model", help="built-in name (smollm2-135m), Hugging Face directory or .gguf file")
    w.add_argument("--grid", required=True, help="YAML grid: methods, schemes, group_sizes, parts, budgets, choices, "
                                                 "options, calib, eval, kl_threshold, size_budget_bpw")
    w.add_argument("--out", required=True, help="the sweep's directory (rerun with the same --out to resume)")
    w.add_argument("--reference-record", metavar="FILE", help="a record of this model saved by lowbit eval")
    w.add_argument("--kl-threshold", type=float, help="recommend the smallest point under this mean KL (0.007)")
    w.add_argument("--size-budget", type=float, metavar="BPW", help="also recommend the best point within this size")
    w.add_argument("--executor", choices=("sequential", "ray"), default="sequential",
                   help="sequential (default: one point after another here) or ray: points as tasks on an existing "
                        "Ray cluster (RAY_ADDRESS or --ray-address; else a local Ray instance), the same table")
    w.add_argument("--ray-address", help="the Ray cluster to join (default: RAY_ADDRESS, else start one here)")
    w.add_argument("--cpus-per-point", type=float, default=1, help="Ray: CPUs each point reserves (default 1)")
    w.add_argument("--gpus-per-point", type=float, default=0, help="Ray: GPUs each point reserves (default 0)")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(func=cmd_sweep)

    d = sub.add_parser("demo", help="quantize the built-in model and show what it did")
    d.add_argument("--out", help="where to write the demo checkpoint (default: in the lowbit cache)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="show a checkpoint's header after checking its hash and its files' (or, for a "
                                    "compressed-tensors, GPTQ, AWQ, Hugging Face or .gguf model, what it holds)")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_info)
    return p


def _for_terminal(text: str) -> str:
    """A message wrapped at 100 columns for a person at a terminal; one line for logs and programs (where a wrapped
    path or phrase would no longer match a search)."""
    return textwrap.fill(text, width=100, break_on_hyphens=False) if sys.stderr.isatty() else text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except LowbitError as e:
        print(_for_terminal(f"lowbit: error: {e}"), file=sys.stderr)
        return 2
    except Exception as e:  # a write that ran out of room, wherever it was: said in one sentence
        from lowbit.io.atomic import disk_full

        if (why := disk_full(e)) is None:
            raise
        print(_for_terminal(f"lowbit: error: could not write the output: {why} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}). Nothing was written in its place; make room and run "
                            f"again."), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"lowbit: {e.args[0] if e.args else 'interrupted; nothing was written.'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that stopped reading (head, less)
        sys.stderr.close()
        return 0


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
