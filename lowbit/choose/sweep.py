"""`lowbit sweep MODEL --grid FILE.yaml --out DIR`: a grid of configurations, each quantized and evaluated against
one saved reference record; the table, the Pareto chart and a recommendation.

The grid file names lists, whose product gives the points, and budgets for the allocator:

    methods: [rtn, gptq]          # required
    schemes: [w4a16, w3a16]       # required unless budgets are given
    group_sizes: [128, 64]        # optional (default: each scheme's)
    parts: [all, mlp]             # optional (lowbit.model.parts names; all = every block linear layer)
    budgets: [3.5, 4.25]          # optional: --target-bpw points, one per method
    choices: w3a16:64,w4a16:128,16   # optional: the allocator's menu
    calib: {samples: 64, seqlen: 512}
    eval: {max_prompts: 16, max_new_tokens: 64, ppl: [wikitext2], max_windows: 4}
    kl_threshold: 0.007           # the recommendation: the smallest point under it (Fireworks' "high quality")
    size_budget_bpw: 4.0          # and the best point at or under this size

Resumable: DIR/points/ID.json is written atomically when a point finishes, or fails (with its error; the sweep goes
on). A rerun skips every point that has one, so a killed sweep resumes where it stopped and nothing finished is
computed again. A point's ID hashes its configuration and the sweep's calibration and evaluation settings.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from lowbit.errors import LowbitError

GRID_KEYS = ("methods", "schemes", "group_sizes", "parts", "budgets", "choices", "options", "calib", "eval",
             "kl_threshold", "size_budget_bpw")
EVAL_KEYS = ("prompts", "max_prompts", "max_new_tokens", "ppl", "max_windows", "seqlen", "top_n")
DEFAULT_KL_THRESHOLD = 0.007


@dataclass(frozen=True)
class Point:
    """One configuration: a uniform recipe, or a budget for the allocator."""

    method: str
    scheme: str | None = None
    group_size: int | None = None
    parts: str | None = None
    target_bpw: float | None = None
    choices: str | None = None

    @property
    def label(self) -> str:
        if self.target_bpw is not None:
            return f"{self.method} mixed {self.target_bpw:g} bpw"
        group = "" if self.group_size is None else (" per-channel" if self.group_size <= 0 else f" g{self.group_size}")
        parts = f" {self.parts}" if self.parts and self.parts != "all" else ""
        return f"{self.method} {self.scheme}{group}{parts}"


@dataclass
class Grid:
    points: list[Point]
    options: dict = field(default_factory=dict)
    calib: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    kl_threshold: float = DEFAULT_KL_THRESHOLD
    size_budget_bpw: float | None = None

    @classmethod
    def load(cls, path: str | Path) -> Grid:
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"grid file {str(path)!r} does not exist.")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LowbitError(f"grid file {str(path)!r} is not valid YAML: {e}") from None
        return cls.from_dict(d, str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "grid") -> Grid:
        """The grid, every point checked (method, scheme, group size, parts, budget) before any work."""
        from lowbit.choose.mixed import check_target, parse_choices
        from lowbit.data.calibration import CalibConfig
        from lowbit.recipe import Recipe

        if not isinstance(d, dict):
            raise LowbitError(f"{source}: expected a mapping of grid keys, got {type(d).__name__}.")
        unknown = sorted(set(d) - set(GRID_KEYS))
        if unknown:
            raise LowbitError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(GRID_KEYS)}.")
        bad_eval = sorted(set(d.get("eval") or {}) - set(EVAL_KEYS))
        if bad_eval:
            raise LowbitError(f"{source}: unknown eval key(s) {', '.join(bad_eval)}; allowed: {', '.join(EVAL_KEYS)}.")
        lists = {k: _as_list(d.get(k)) for k in ("methods", "schemes", "group_sizes", "parts", "budgets")}
        if not lists["methods"]:
            raise LowbitError(f"{source}: 'methods' is required (e.g. methods: [rtn, gptq]).")
        if not lists["schemes"] and not lists["budgets"]:
            raise LowbitError(f"{source}: give 'schemes' (uniform points) or 'budgets' (mixed precision), or both.")
        options = dict(d.get("options") or {})
        points = []
        for method, scheme, group, parts in itertools.product(lists["methods"], lists["schemes"],
                                                              lists["group_sizes"] or [None],
                                                              lists["parts"] or [None]):
            point = Point(str(method), str(scheme), group, parts)
            _recipe(point, options)  # an unknown method, scheme, option or part is said here
            points.append(point)
        choices = d.get("choices")
        if choices is not None:
            parse_choices(str(choices))
        for method, budget in itertools.product(lists["methods"], lists["budgets"]):
            check_target(float(budget), str(method))
            Recipe(method=str(method), options=dict(options))
            points.append(Point(str(method), target_bpw=float(budget), choices=choices))
        calib = dict(d.get("calib") or {})
        CalibConfig(**calib)
        return cls(points, options, calib, dict(d.get("eval") or {}), float(d.get("kl_threshold",
                                                                                DEFAULT_KL_THRESHOLD)),
                   d.get("size_budget_bpw"))

    def point_id(self, point: Point) -> str:
        text = json.dumps({"point": asdict(point), "options": self.options, "calib": self.calib, "eval": self.eval},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _recipe(point: Point, options: dict):
    from lowbit.recipe import Recipe

    parts = () if point.parts in (None, "all") else (point.parts,)
    return Recipe(method=point.method, scheme=point.scheme or "w4a16", group_size=point.group_size, parts=parts,
                  options=dict(options))


def run_point(model_name: str, point: Point, grid: Grid, record: Path, work: Path, progress: bool = True) -> dict:
    """Quantize, save to a scratch checkpoint, evaluate against the record; the checkpoint is removed after."""
    from lowbit import api
    from lowbit.choose.mixed import DEFAULT_CHOICES, bits_per_targeted_weight, choose, parse_choices
    from lowbit.data.calibration import CalibConfig
    from lowbit.eval.runner import EvalConfig, evaluate
    from lowbit.model.loading import family_of

    start = time.perf_counter()
    recipe = _recipe(point, grid.options)
    calib = CalibConfig(**grid.calib)
    tokenizer = api.load_tokenizer(model_name)
    model, allocation = model_name, None
    if point.target_bpw is not None:
        model = api.load(model_name)
        mixed = choose(model, tokenizer, family_of(model), recipe, point.target_bpw,
                       parse_choices(point.choices or DEFAULT_CHOICES), calib, progress=progress,
                       cache_dir=work.parent / "costs")  # the sweep's budgets share one costing
        recipe, allocation = mixed.recipe, mixed
    result = api.quantize(model, recipe, tokenizer=tokenizer, calib=calib, progress=progress)
    bpw = bits_per_targeted_weight(result.model, family_of(result.model), result.sizes)
    ckpt = work / "checkpoint"
    api.save(result, ckpt, tokenizer=tokenizer, overwrite=True)
    quantize_s = time.perf_counter() - start
    ev = grid.eval
    out = evaluate(EvalConfig(candidate=str(ckpt), reference_record=str(record), kl=True,
                              ppl=tuple(ev.get("ppl") or ()), max_prompts=ev.get("max_prompts"),
                              max_windows=ev.get("max_windows"), seqlen=ev.get("seqlen", 2048), progress=progress))
    size = out["size"] or {}
    shutil.rmtree(ckpt, ignore_errors=True)
    kl = out["kl"]["all"]
    return {"label": point.label, "point": asdict(point), "bits_per_weight": bpw, "bytes": size.get("bytes"),
            "kl": kl["mean"], "kl_ci95": kl["ci95"], "token_rejection_rate": kl["token_rejection_rate"],
            "ppl": {k: v["candidate"] for k, v in (out.get("ppl") or {}).items()},
            "predicted_kl": allocation.info["predicted_kl"] if allocation else None,
            "quantize_s": round(quantize_s, 1), "seconds": round(time.perf_counter() - start, 1),
            "eval": {**out, "size": {**size, "bits_per_weight": bpw}}}


def make_record(model_name: str, grid: Grid, path: Path, progress: bool = True) -> None:
    """The float model's record: its generations and top-N on the prompts, its perplexity windows."""
    from lowbit.eval.runner import EvalConfig, evaluate
    from lowbit.io.atomic import atomic_file

    ev = grid.eval
    with atomic_file(path) as tmp:
        evaluate(EvalConfig(reference=model_name, kl=True, ppl=tuple(ev.get("ppl") or ()),
                            prompts=ev.get("prompts"), max_prompts=ev.get("max_prompts"),
                            max_new_tokens=ev.get("max_new_tokens", 256), top_n=ev.get("top_n", 16),
                            max_windows=ev.get("max_windows"), seqlen=ev.get("seqlen", 2048),
                            save_reference=str(tmp), progress=progress))


def check_record(model_name: str, record_path: Path) -> None:
    """A record made by another model is refused before any work."""
    from lowbit.eval.record import ReferenceRecord
    from lowbit.model.loading import load

    record = ReferenceRecord.load(record_path)
    if not record.made_by(load(model_name)):
        raise LowbitError(f"the reference record {str(record_path)!r} was made by another model "
                          f"({record.meta.get('model')!r}) than {model_name!r}; drop --reference-record to record "
                          f"this model.")


def attempt(model_name: str, point: Point, grid: Grid, record: Path, work: Path, progress: bool = True) -> dict:
    """run_point, or the point's error as its result (the sweep goes on); the scratch directory is removed."""
    try:
        return run_point(model_name, point, grid, record, work, progress)
    except Exception as e:  # a failed point is recorded with its error
        detail = str(e) if isinstance(e, LowbitError) else "".join(traceback.format_exception_only(e)).strip()
        return {"label": point.label, "point": asdict(point), "error": detail}
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class RayOptions:
    """Where and how points run on Ray: an existing cluster's address (None: RAY_ADDRESS, else a local instance)
    and what each point reserves."""

    address: str | None = None
    cpus_per_point: float = 1
    gpus_per_point: float = 0


def _ray_point(model_name: str, point: Point, grid: Grid, record_bytes: bytes) -> dict:
    """A point on a Ray worker: the record arrives as bytes (no shared filesystem needed), the checkpoint goes to
    the worker's scratch space, torch uses the CPUs the task reserved."""
    import tempfile

    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(int(cpus), 1))
    with tempfile.TemporaryDirectory(prefix="lowbit-sweep-") as tmp:
        record = Path(tmp) / "reference.safetensors"
        record.write_bytes(record_bytes)
        return attempt(model_name, point, grid, record, Path(tmp) / "work", progress=False)


def _run_on_ray(model_name: str, grid: Grid, record: Path, todo: list[tuple[Point, Path]], options: RayOptions,
                done, log) -> None:
    try:
        import ray
    except ImportError:
        raise LowbitError("--executor ray needs Ray: pip install ray (the version your cluster runs).") from None
    if not ray.is_initialized():
        ray.init(address=options.address, log_to_driver=False, include_dashboard=False)
    task = ray.remote(_ray_point).options(num_cpus=options.cpus_per_point, num_gpus=options.gpus_per_point,
                                          max_retries=0)
    record_ref = ray.put(record.read_bytes())
    pending = {task.remote(model_name, point, grid, record_ref): (point, path) for point, path in todo}
    log(f"{len(pending)} points submitted to Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):g} GPUs)")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        point, path = pending.pop(ready[0])
        done(point, path, ray.get(ready[0]))


def sweep(model_name: str, grid: Grid, out: Path, record: Path | None = None, progress: bool = True,
          log=print, executor: str = "sequential", ray_options: RayOptions | None = None) -> list[dict]:
    """Run every point without a result yet (one after another, or as Ray tasks); returns every point's result
    (finished and failed), in grid order. Each result is written when its point ends."""
    from lowbit.io.atomic import atomic_file

    if executor not in ("sequential", "ray"):
        raise LowbitError(f"--executor {executor!r}: choose sequential or ray.")
    if record is not None:
        check_record(model_name, record)
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps({"model": model_name, "points": [asdict(p) for p in grid.points],
                                               "options": grid.options, "calib": grid.calib, "eval": grid.eval},
                                              indent=1))
    if record is None:
        record = out / "reference.safetensors"
        if not record.exists():
            log(f"recording the reference ({model_name}) once for every point")
            make_record(model_name, grid, record, progress)
    paths = {point: points_dir / f"{grid.point_id(point)}.json" for point in grid.points}
    todo = []
    for i, point in enumerate(grid.points, 1):
        if paths[point].exists():
            log(f"[{i}/{len(grid.points)}] {point.label}: done before, kept")
        else:
            todo.append((point, paths[point]))

    def done(point: Point, path: Path, row: dict) -> None:
        full = row.pop("eval", None)  # the whole evaluation, for the report, beside the point's result
        if full is not None:
            with atomic_file(path.with_suffix(".eval.json")) as tmp:
                tmp.write_text(json.dumps(full))
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(row, indent=1))
        log(f"    {point.label}: failed: {row['error']}" if "error" in row else
            f"    {point.label}: mean KL {row['kl']:.5f} at {row['bits_per_weight']:.3f} bits per weight")

    if executor == "ray":
        _run_on_ray(model_name, grid, record, todo, ray_options or RayOptions(), done, log)
    else:
        for point, path in todo:
            log(f"[{grid.points.index(point) + 1}/{len(grid.points)}] {point.label}")
            done(point, path, attempt(model_name, point, grid, record, out / "work", progress))
    return [json.loads(paths[point].read_text()) for point in grid.points]


def conclude(grid: Grid, out: Path, results: list[dict], title: str, record: Path | None = None) -> tuple[str, list]:
    """The recommendation, the mixed-vs-uniform margins and every file of lowbit.choose.frontier.write in `out`;
    returns the Markdown summary and the paths written."""
    import numpy as np

    from lowbit.choose import frontier
    from lowbit.eval.record import ReferenceRecord

    runs = evaluations(grid, out)
    rec = frontier.recommend(results, grid.kl_threshold, grid.size_budget_bpw)
    rows = None
    if runs:
        positions = ReferenceRecord.load(record or out / "reference.safetensors").position_offsets().numpy()
        rows = frontier.margins(results, {label: ev["kl"]["per_prompt"] for label, ev in runs}, np.diff(positions))
    written = frontier.write(results, rec, out, title, runs, rows)
    return frontier.markdown(results, rec, rows), written


def evaluations(grid: Grid, out: Path) -> list[tuple[str, dict]]:
    """Each finished point's whole evaluation (label, lowbit eval's result), in grid order."""
    runs = []
    for point in grid.points:
        path = out / "points" / f"{grid.point_id(point)}.eval.json"
        if path.exists():
            runs.append((point.label, json.loads(path.read_text())))
    return runs


__all__ = ["Grid", "Point", "RayOptions", "attempt", "check_record", "conclude", "evaluations", "make_record",
           "run_point", "sweep"]
