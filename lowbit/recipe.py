"""Recipes: what gets quantized, and how.

A recipe names a method and a scheme (vLLM / llm-compressor names: w8a16, w4a16, w3a16, w2a16, w8a8, fp8; any
w{b}a16 with 2 ≤ b ≤ 8 also works), the weight granularity and symmetry, which linear layers are targeted
(default: every linear layer inside the decoder blocks — not the embeddings, not lm_head) and per-layer
overrides. Patterns are Python regular expressions searched in the module's full name
(`model.layers.3.mlp.down_proj`). Overrides apply in order; a later one wins.

The method's own options (GPTQ's damp, SmoothQuant's alpha, …) are `options`, checked against the frozen config
each method module declares (lowbit.methods.registry); only values that differ from the defaults are kept, and the
saved form lists every option with its value.

It loads from YAML and is saved with every checkpoint, so a checkpoint says exactly how it was made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError
from lowbit.formats import (
    ActFormat,
    FP8Format,
    IntFormat,
    PerGroup,
    PerTensor,
    granularity_from_group_size,
)
from lowbit.formats.activation import check_kv_kind
from lowbit.formats.ggml import LEGACY
from lowbit.formats.ggml_mix import MIXES
from lowbit.formats.kquant import KTYPES, KQuantFormat
from lowbit.formats.spec import LayerSpec
from lowbit.formats.spqr import SpQRFormat
from lowbit.methods.registry import all_options, configure, non_defaults
from lowbit.methods.spqr import SpQRConfig
from lowbit.model.parts import expand_parts

RECIPE_VERSION = 1
NAMED_SCHEMES = ("w8a16", "w4a16", "w3a16", "w2a16", "w8a8", "fp8")
# Default group size per scheme when --group-size is not given (0 = per output channel).
DEFAULT_GROUP_SIZE = {"w8a16": 0, "w8a8": 0, "fp8": 0, "w2a16": 64}
DEFAULT_WEIGHT_ONLY_GROUP = 128
_WEIGHT_ONLY = re.compile(r"^w(\d+)a16$")
SPQR_DEFAULT_BETA1 = 16

# Named starting points (`--preset`); options given with them still override their fields.
PRESETS: dict[str, dict] = {
    # SpQR paper (Dettmers et al.), §5: 4-bit weights, 3-bit statistics, β1 = β2 = 16, about 1% outliers.
    "spqr-near-lossless": {"method": "spqr", "scheme": "w4a16", "group_size": 16, "symmetric": False,
                           "options": {"stat_bits": 3, "stat_group": 16, "outlier_rate": 0.01}},
    "spqr-3bit": {"method": "spqr", "scheme": "w3a16", "group_size": 16, "symmetric": False,
                  "options": {"stat_bits": 3, "stat_group": 16, "outlier_rate": 0.01}},
    # SmoothQuant paper (Xiao et al.), Table 2: int8 per-tensor weights; activations per-token dynamic (O1),
    # per-tensor dynamic (O2), per-tensor static (O3).
    "smoothquant-o1": {"method": "smoothquant", "scheme": "w8a8", "per_tensor": True},
    "smoothquant-o2": {"method": "smoothquant", "scheme": "w8a8", "per_tensor": True, "act_granularity": "tensor"},
    "smoothquant-o3": {"method": "smoothquant", "scheme": "w8a8", "per_tensor": True, "act_granularity": "tensor",
                       "act_static": True},
}


def check_scheme(scheme: str) -> str:
    """Validate a scheme name; returns it lower-cased."""
    s = str(scheme).lower()
    m = _WEIGHT_ONLY.match(s)
    if m:
        bits = int(m.group(1))
        if not 2 <= bits <= 8:
            raise LowbitError(f"scheme {scheme!r} asks for {bits}-bit weights; lowbit's integer grids have 2 to 8 bits "
                              f"(w2a16 … w8a16).")
        return s
    if s in NAMED_SCHEMES or s in LEGACY or s in KTYPES or s in MIXES:
        return s
    raise LowbitError(f"unknown scheme {scheme!r}. Known schemes: {', '.join(NAMED_SCHEMES)} "
                      f"(and any w{{b}}a16 with b in 2..8), llama.cpp's types {', '.join([*LEGACY, *KTYPES])} and "
                      f"its mixes {', '.join(MIXES)}.")


def scheme_spec(scheme: str, group_size: int | None, symmetric: bool, clip: bool,
                zero_point: str = "int", per_tensor: bool = False, act_granularity: str = "token",
                act_static: bool = False, full_range: bool = False) -> LayerSpec:
    """LayerSpec for a scheme name and its options (group_size None = the scheme's default)."""
    s = check_scheme(scheme)
    if s in KTYPES or s in MIXES:  # llama.cpp's k-quants, IQ4_NL and mixes: grid, blocks, statistics are the type's
        if group_size is not None or not symmetric or zero_point != "int" or clip or per_tensor \
                or act_granularity != "token" or act_static:  # (its own grid: the full-range choice does not apply)
            raise LowbitError(f"scheme {s} is llama.cpp's type of that name, which fixes its blocks, grid and "
                              "statistics (searched per sub-block); drop --group-size, --asym, --zero-point, --clip, "
                              "--per-tensor and the activation options.")
        return LayerSpec(KQuantFormat(s[:4] if s in MIXES else s))  # a mix's base type (per layer: model.targets)
    if s in LEGACY:  # llama.cpp's block types: the grid and the groups of 32 are the type's
        if group_size not in (None, 32):
            raise LowbitError(f"scheme {s} is llama.cpp's type of that name: groups of 32 columns; drop "
                              f"--group-size {group_size}.")
        if act_granularity != "token" or act_static or per_tensor:
            raise LowbitError(f"scheme {s} is weight-only with one scale per 32 columns; --per-tensor, "
                              "--act-granularity and --act-static do not apply.")
        t = LEGACY[s]
        if not t.minimum and (not symmetric or zero_point != "int"):
            raise LowbitError(f"scheme {s} is symmetric (no zero point); for a float minimum per block use "
                              f"q{t.bits}_1, or drop --asym / --zero-point.")
        return LayerSpec(t.lowbit_format(full_range=full_range, clip=clip))
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE.get(s, DEFAULT_WEIGHT_ONLY_GROUP)
    gran = PerTensor() if per_tensor else granularity_from_group_size(group_size)
    if s in ("fp8", "w8a8"):
        act = ActFormat("fp8" if s == "fp8" else "int8", act_granularity, act_static)
    elif act_granularity != "token" or act_static:
        raise LowbitError(f"scheme {s} keeps activations in 16 bits; --act-granularity and --act-static apply to "
                          f"w8a8 and fp8.")
    if s == "fp8":
        if not symmetric or zero_point != "int":
            raise LowbitError("fp8 is a sign-magnitude format and has no zero point: drop --asym with --scheme fp8.")
        return LayerSpec(FP8Format(gran), act)
    if s == "w8a8":
        return LayerSpec(IntFormat(8, symmetric, gran, clip, zero_point, full_range and symmetric), act)
    bits = int(_WEIGHT_ONLY.match(s).group(1))
    return LayerSpec(IntFormat(bits, symmetric, gran, clip, zero_point, full_range and symmetric))


@dataclass(frozen=True)
class Override:
    """Per-layer change: layers whose name matches `pattern` get these fields (None = keep), or are skipped."""

    pattern: str
    scheme: str | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    clip: bool | None = None
    zero_point: str | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        _compile(self.pattern, "override pattern")
        if self.scheme is not None:
            check_scheme(self.scheme)


# Methods whose symmetric grids default to the restricted scale, which puts ±max|w| exactly on a code. AWQ scales
# its salient channels up until they are their groups' maxima; on SmolLM2-135M the full range costs it KL 0.258 →
# 0.346 (w4a16 g64) and perplexity 82 → 122 (w3a16 g64) (BENCHMARKS.md).
RESTRICTED_GRID_METHODS = frozenset({"awq"})


@dataclass(frozen=True)
class Recipe:
    """Method, scheme and the choice of layers. Validated on construction."""

    method: str = "rtn"
    scheme: str = "w4a16"
    group_size: int | None = None
    symmetric: bool = True
    clip: bool = False
    zero_point: str = "int"
    options: dict[str, Any] = field(default_factory=dict)  # the method's own (its Config's fields, by name)
    per_tensor: bool = False  # one weight scale per tensor (overrides group_size)
    # symmetric grids: True = s = max|w| / (2^(b−1) − ½) (GPTQ's reference), False = / (2^(b−1) − 1), which keeps
    # ±max|w| exactly on a code; None = by method (see uses_full_range)
    full_range: bool | None = None
    act_granularity: str = "token"  # w8a8 / fp8 activations: one scale per token, or per tensor
    act_static: bool = False  # the activation scale is calibrated once (per tensor), not computed at run time
    expert_min_tokens: int = 16  # mixture of experts: fewer routed calibration tokens → calibrate on every token
    experts_all_tokens: bool = False  # mixture of experts: calibrate every expert on every token of its block
    parts: tuple[str, ...] = ()  # which parts are quantized (lowbit.model.parts); () = every block linear layer
    kv_cache: str | None = None  # int8 or fp8: keys and values stored quantized
    kv_static: bool = False  # KV scales calibrated once per layer (vLLM's k_scale / v_scale), not per token and head
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", str(self.method).lower())
        object.__setattr__(self, "scheme", check_scheme(self.scheme))
        if not isinstance(self.options, dict):
            raise LowbitError(f"a recipe's options are a mapping of the method's option names to values, got "
                              f"{self.options!r}.")
        object.__setattr__(self, "options", non_defaults(configure(self.method, self.options)))  # checks the method
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "parts", expand_parts(self.parts))
        if self.kv_cache is None and {"kv_cache", "attention"} & set(self.parts):
            if self.scheme not in ("fp8", "w8a8"):
                raise LowbitError(f"--parts {','.join(self.parts)} quantizes the KV cache or attention, but scheme "
                                  f"{self.scheme} has no activation format to take: add --kv-cache int8 or fp8.")
            object.__setattr__(self, "kv_cache", "fp8" if self.scheme == "fp8" else "int8")
        if self.expert_min_tokens < 1:
            raise LowbitError(f"--expert-min-tokens must be at least 1, not {self.expert_min_tokens}: an expert "
                              f"without calibration statistics cannot be quantized by GPTQ.")
        if self.kv_cache is not None:
            check_kv_kind(self.kv_cache)
        if self.kv_static and self.kv_cache is None:
            raise LowbitError("--kv-static calibrates the KV cache's scales, but the KV cache is not quantized: add "
                              "--kv-cache fp8 (or int8).")
        for p in self.targets:
            _compile(p, "target pattern")
        for p in self.ignore:
            _compile(p, "ignore pattern")
        if self.method.startswith("smoothquant") and self.scheme not in ("w8a8", "fp8"):
            raise LowbitError(f"SmoothQuant prepares activations for quantization, but scheme {self.scheme} keeps "
                              f"them in 16 bits: use --scheme w8a8 (or fp8).")
        self.default_spec  # noqa: B018  (builds the default spec, which validates the combination)

    @cached_property
    def _configs(self) -> dict[type, Any]:
        """The method's option classes built once from the (frozen) options."""
        return configure(self.method, self.options)

    def config(self, cls: type | None) -> Any:
        """The recipe's options as the method's frozen config `cls` (its defaults where none is set); None for None."""
        return None if cls is None else self._configs[cls]

    def configs(self) -> list[Any]:
        """The method's option objects (each a frozen config class, defaults where the recipe sets none)."""
        return list(self._configs.values())

    def option(self, name: str) -> Any:
        """One option's value, the method's default where the recipe sets none (None when the method has no such
        option)."""
        return all_options(self._configs).get(name)

    def layer_spec(self, name: str) -> LayerSpec | None:
        """The spec for a targeted layer after overrides, or None when an override skips it."""
        return self._with_overrides([o for o in self.overrides if re.search(o.pattern, name)])

    def override_spec(self, override: Override) -> LayerSpec | None:
        """The spec of a layer that only this override matches (None when it skips)."""
        return self._with_overrides([override])

    def _with_overrides(self, matching: list[Override]) -> LayerSpec | None:
        scheme, group_size, symmetric = self.scheme, self.group_size, self.symmetric
        clip, zero_point = self.clip, self.zero_point
        for o in matching:
            if o.skip:
                return None
            if o.scheme is not None and o.scheme != scheme:
                scheme, group_size = o.scheme, None
            group_size = o.group_size if o.group_size is not None else group_size
            symmetric = o.symmetric if o.symmetric is not None else symmetric
            clip = o.clip if o.clip is not None else clip
            zero_point = o.zero_point if o.zero_point is not None else zero_point
        return self._spec(scheme, group_size, symmetric, clip, zero_point)

    @property
    def uses_full_range(self) -> bool:
        """The recipe's choice, else the full range for every method but those in RESTRICTED_GRID_METHODS."""
        return self.full_range if self.full_range is not None else self.method not in RESTRICTED_GRID_METHODS

    def _spec(self, scheme: str, group_size: int | None, symmetric: bool, clip: bool, zero_point: str) -> LayerSpec:
        if group_size is None and self.method == "spqr":
            group_size = SPQR_DEFAULT_BETA1
        own = scheme == self.scheme  # per-tensor and activation options belong to the recipe's scheme
        return self.method_spec(scheme_spec(scheme, group_size, symmetric, clip, zero_point,
                                             self.per_tensor and own, self.act_granularity if own else "token",
                                             self.act_static and own, self.uses_full_range))

    def method_spec(self, spec: LayerSpec) -> LayerSpec:
        """SpQR stores its own format: the scheme's bits in groups of β1 (= the group size, default 16). GPTQ rounds
        Q4_0/Q5_0 on the full-range grid rather than llama.cpp's signed scale, whose largest weight sits exactly on
        the last code: GPTQ's updates push later columns past it (SmolLM2-135M q4_0, KL 0.49 signed vs 0.41 full
        range; BENCHMARKS.md). Both are the same ggml type. And it searches each block's range, weighted by the
        Hessian's diagonal, as llama.cpp's quantizer does with an imatrix (SmolLM2-135M Q4_K_M: KL 0.056 → 0.033)."""
        w = spec.weight
        if "gptq" in self.method and isinstance(w, IntFormat) and w.signed_scale:
            return replace(spec, weight=replace(w, signed_scale=False, full_range=True, clip=True))
        if self.method != "spqr":
            return spec
        w = spec.weight
        if not isinstance(w, IntFormat) or spec.act is not None:
            raise LowbitError("SpQR quantizes weights only, onto integer grids: use a w{b}a16 scheme (e.g. w4a16).")
        if not isinstance(w.granularity, PerGroup):
            raise LowbitError("SpQR works in small groups of input columns (β1, default 16); it has no "
                              "per-channel form. Use --group-size 16 (or another small group).")
        cfg = self.config(SpQRConfig)
        return LayerSpec(SpQRFormat(w.bits, w.granularity.size, cfg.stat_group, cfg.stat_bits))

    def with_options(self, **changes) -> Recipe:
        """A copy with the given fields replaced (None values are ignored); `options` are added to the recipe's."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "options" in changes:
            changes["options"] = {**self.options, **changes["options"]}
        return replace(self, **changes)

    @property
    def default_spec(self) -> LayerSpec:
        return self._spec(self.scheme, self.group_size, self.symmetric, self.clip, self.zero_point)

    @classmethod
    def of(cls, spec: str | Recipe | Mapping | None = None, **settings: Any) -> Recipe:
        """A recipe from what a Python caller gives: a Recipe, a mapping of recipe fields (as recipe.yaml holds
        them), a preset's name, or a scheme's name (None: the defaults, w4a16 by RTN); then `settings` by name,
        each a recipe field (method, group_size, symmetric, targets, …) or an option of the method (act_order,
        damp, …). Settings that are None are left as they are."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in settings.items() if v is not None and k in names}
        options = {**given.pop("options", {}), **{k: v for k, v in settings.items() if v is not None
                                                  and k not in names}}
        if isinstance(spec, str) and spec not in PRESETS:
            return cls(**{"scheme": spec, **given, "options": options})
        if spec is None:
            return cls(**given, options=options)
        if isinstance(spec, str):
            base = cls.preset(spec)
        elif isinstance(spec, Recipe):
            base = spec
        elif isinstance(spec, Mapping):
            base = cls.from_dict(dict(spec), source="the recipe mapping")
        else:
            raise LowbitError(f"a recipe is a scheme's name (e.g. 'w4a16'), a preset's ({', '.join(PRESETS)}), a "
                              f"mapping of recipe fields or a lowbit.Recipe; got {spec!r} ({type(spec).__name__}).")
        return base.with_options(**given, options=options) if given or options else base

    @classmethod
    def preset(cls, name: str) -> Recipe:
        if name not in PRESETS:
            raise LowbitError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}.")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"], d["ignore"], d["parts"] = list(self.targets), list(self.ignore), list(self.parts)
        d["options"] = all_options(self._configs)
        d["overrides"] = [{k: v for k, v in asdict(o).items() if v is not None and not (k == "skip" and not v)}
                          for o in self.overrides]
        return {"lowbit_recipe": RECIPE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise LowbitError(f"{source}: expected a mapping of recipe fields, got {type(d).__name__}.")
        d = dict(d)
        version = d.pop("lowbit_recipe", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise LowbitError(f"{source}: recipe version {version} is not supported (this lowbit reads version "
                              f"{RECIPE_VERSION}); upgrade lowbit.")
        options = d.get("options") or {}
        if not isinstance(options, dict):
            raise LowbitError(f"{source}: 'options' must be a mapping of the method's option names to values, got "
                              f"{options!r}.")
        options = dict(options)
        flat = {key: d.pop(key) for key in _FLAT_OPTIONS if key in d}  # recipes written before `options`
        if flat:
            now = _current_defaults(str(d.get("method", cls.method)).lower())
            # a value is kept where it differs from the default then, or (None being "unset") from today's
            for key, value in flat.items():
                if value != _FLAT_OPTIONS[key] or (value is not None and key in now and now[key] != value):
                    options.setdefault(key, value)
        d["options"] = options
        _check_keys(d, [f.name for f in fields(cls)], source)
        overrides = []
        for i, o in enumerate(d.pop("overrides", None) or []):
            if not isinstance(o, dict) or "pattern" not in o:
                raise LowbitError(f"{source}: override {i} must be a mapping with a 'pattern' key, got {o!r}.")
            _check_keys(o, [f.name for f in fields(Override)], f"{source}: override {i}")
            overrides.append(Override(**o))
        for key in ("targets", "ignore", "parts"):
            if isinstance(d.get(key), str):
                d[key] = [d[key]]
            d[key] = tuple(d.get(key) or ())
        return cls(**d, overrides=tuple(overrides))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise LowbitError(f"recipe file {str(path)!r} does not exist.")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise LowbitError(f"recipe file {str(path)!r} is not valid YAML: {e}") from None
        return cls.from_dict(data or {}, source=str(path))


# Method options that recipes before `options` kept at the top level, with the defaults they were written with.
_FLAT_OPTIONS: dict[str, Any] = {"act_order": False, "damp": 0.01, "block_size": 128, "stat_bits": 3,
                                 "stat_group": 16, "outlier_threshold": None, "outlier_rate": None, "alpha": None,
                                 "smooth_all": False, "awq_clip": True}


def _current_defaults(method: str) -> dict[str, Any]:
    """The method's options with today's defaults; none for an unknown method (the recipe's check names it)."""
    try:
        return all_options(configure(method, {}))
    except LowbitError:
        return {}


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise LowbitError(f"{what} {pattern!r} is not a valid regular expression: {e}.") from None


def _check_keys(d: dict, allowed: list[str], source: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise LowbitError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(allowed)}.")

