"""Method specs: the one parser of the text that names a method of a comparison.

A spec is a name with optional overrides after '@', comma-separated:

  awq                          a registered awqnb method with the run's settings
  full_praq                    `full_<method>`: the method per channel (group size -1)
  awq_ref                      a preset: awq as the reference tools run it (L1 salience,
                               duo_scaling, clip, FP propagation)
  robust_praq@n_calib=16       calibration overrides: n_calib, calib_seqlen, calib_dataset
  awq_gqa@gqa_rope=false       method parameters (the method's PARAMS)
  awq@salience=l1,n_grid=10    SearchConfig fields; config fields: bits, group_size, symmetric,
                               lm_head, lmhead_chunks, layer_batch_size, calib_batch_size, dtype
  fp, llmc_awq, llmc_gptq      no quantization / llm-compressor's AWQ and GPTQ (calibration
                               overrides only)
  ar@iters=0, hqq@axis=1       the peers AutoRound and HQQ (`awqnb.compare.reference`): their own
                               parameters passed through, checked by `reference.check_params`; the
                               spec's method is then 'ar@iters=0' (name and own parameters, what
                               `reference.quantize_reference` takes), its params those parameters

`parse_spec(text)` → `ParsedSpec` (label = the text, kind fp|awqnb|reference, the method, and the
overrides split into config / search / params / calibration); `parse_specs("a,b@k=1,k2=2,c")` a
list (a piece with '=' and no '@' continues the previous spec's overrides). `parse_value` is the
one reading of an override's value (int, float, true/false, else the text). Every mistake (an
unknown method or parameter, a malformed override, a value of the wrong type) is one AwqnbError
line naming what to do. `ParsedSpec.build(...)` turns a spec into the runner's `MethodSpec`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from awqnb.compare import reference as ref
from awqnb.compare.reference import PEERS, REFERENCE_METHODS, is_reference
from awqnb.core.config import QuantConfig, SearchConfig, parse_value
from awqnb.core.errors import AwqnbError
from awqnb.quant.method_config import MethodConfig
from awqnb.quant.methods import REGISTRY, get_method

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "awq_ref": ("awq", {"salience": "l1", "duo_scaling": True, "clip": True, "propagate": "fp"}),
}
CALIB_KEYS = {"n_calib": "n_calib", "calib_seqlen": "seqlen", "calib_dataset": "dataset"}  # spec key → CalibSpec field
RUN_KEYS = tuple(CALIB_KEYS)
SEARCH_KEYS = tuple(f.name for f in dataclasses.fields(SearchConfig))
QUANT_KEYS = ("bits", "group_size", "symmetric")
CONFIG_KEYS = QUANT_KEYS + ("lm_head", "lmhead_chunks", "layer_batch_size", "calib_batch_size", "dtype")
_DEFAULTS = {**{f.name: f.default for f in dataclasses.fields(QuantConfig)},
             **{f.name: f.default for f in dataclasses.fields(SearchConfig)},
             **{f.name: f.default for f in dataclasses.fields(MethodConfig) if f.name in CONFIG_KEYS},
             "n_calib": 128, "calib_seqlen": 512, "calib_dataset": "wikitext2"}
AWQNB_HELP = "a registered method (`awqnb quantize --list`), full_<method>, a preset (" + ", ".join(PRESETS) + ")"
SPEC_HELP = AWQNB_HELP + ", fp, " + ", ".join(REFERENCE_METHODS)


def parse_assignment(kv: str, what: str = "override", example: str = "outlier_percent=5") -> tuple[str, Any]:
    """'key=value' → (key with '-' as '_', parse_value(value)); AwqnbError otherwise."""
    k, eq, v = kv.partition("=")
    k = k.strip().replace("-", "_")
    if not eq or not k:
        raise AwqnbError(f"{what} {kv!r} must look like key=value, e.g. {example}")
    return k, parse_value(v)


def format_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


_ARTICLE = {int: "an"}


def _check_type(text: str, key: str, v, default) -> None:
    """A value of the default's type (an int where a float is expected is fine; None: any)."""
    if default is None:
        return
    want = type(default)
    ok = (isinstance(v, bool) if want is bool else
          isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else
          isinstance(v, int) and not isinstance(v, bool) if want is int else isinstance(v, want))
    if not ok:
        raise AwqnbError(f"method spec {text!r}: {key}={format_value(v)} is not {_ARTICLE.get(want, 'a')} {want.__name__} "
                         f"(default {format_value(default)}); give e.g. {key}={format_value(default)}.")


@dataclass(frozen=True)
class ParsedSpec:
    """One parsed spec. label: the text as given (`parse_spec(s.label) == s`); name: before '@';
    method: the method it runs ('awq' for awq_ref, 'full_praq' as given); kind: 'fp', 'awqnb' or
    'reference'; overrides: (key, value) in the order given; search (preset + overrides), params,
    config (QuantConfig and MethodConfig fields) and calibration (CalibSpec fields: n_calib,
    seqlen, dataset): the overrides split by what they set."""

    label: str
    name: str
    method: str
    kind: str
    overrides: tuple = ()
    search: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> dict:
        """The calibration overrides by their spec keys (n_calib, calib_seqlen, calib_dataset)."""
        inv = {v: k for k, v in CALIB_KEYS.items()}
        return {inv[k]: v for k, v in self.calibration.items()}

    @property
    def text(self) -> str:
        """The canonical spelling: name@key=value,... (values as parse_value reads them back)."""
        return format_spec(self.name, self.overrides)

    def method_config(self, quant: QuantConfig | None = None, search: SearchConfig | None = None,
                      params: Mapping[str, Any] | None = None, seed: int = 42, **config_fields) -> MethodConfig:
        """The MethodConfig of an awqnb spec: the run's `quant`, `search`, `params` and
        `config_fields` (e.g. dtype, calib_batch_size) with this spec's overrides on top; the method
        validates its parameters here (AwqnbError)."""
        if self.kind != "awqnb":
            raise AwqnbError(f"{self.label!r} is not an awqnb quantization method (it is {self.kind}); "
                             f"use {AWQNB_HELP}.")
        q = dataclasses.replace(quant or QuantConfig(), **{k: v for k, v in self.config.items() if k in QUANT_KEYS})
        try:
            s = dataclasses.replace(search or SearchConfig(), **self.search)
        except AwqnbError as e:
            raise AwqnbError(f"method spec {self.label!r}: {e}") from None
        fields = {**config_fields, **{k: v for k, v in self.config.items() if k not in QUANT_KEYS}}
        try:
            cfg = MethodConfig(method=self.method, quant=q, search=s, params={**(params or {}), **self.params},
                               seed=seed, **fields)
            get_method(cfg.method)(cfg)
        except AwqnbError as e:
            raise AwqnbError(f"method spec {self.label!r}: {e}") from None
        return cfg

    def build(self, quant: QuantConfig | None = None, search: SearchConfig | None = None,
              params: Mapping[str, Any] | None = None, seed: int = 42, **config_fields):
        """The runner's MethodSpec of this spec (fp and reference methods: no config)."""
        cal = dict(self.calibration) or None
        if self.kind != "awqnb":
            return MethodSpec(self.label, self.method, None, cal)
        cfg = self.method_config(quant, search, params, seed, **config_fields)
        return MethodSpec(self.label, cfg.method, cfg, cal)


def format_spec(name: str, overrides: Iterable[tuple[str, Any]] = ()) -> str:
    over = ",".join(f"{k}={format_value(v)}" for k, v in overrides)
    return f"{name}@{over}" if over else name


def _kind(text: str, name: str) -> tuple[str, str, dict]:
    if name == "fp":
        return "fp", "fp", {}
    if is_reference(name):
        return "reference", name, {}
    if name in PRESETS:
        method, search = PRESETS[name]
        return "awqnb", method, dict(search)
    if not name:
        raise AwqnbError(f"method spec {text!r} has no method name; use {SPEC_HELP}.")
    try:
        get_method(name)
    except AwqnbError:
        raise AwqnbError(f"method spec {text!r}: unknown method {name!r}; use {SPEC_HELP} "
                         f"(registered: {', '.join(sorted(REGISTRY))}).") from None
    return "awqnb", name, {}


def parse_spec(text: str) -> ParsedSpec:
    """One spec → ParsedSpec (see the module docstring); AwqnbError (one line) for an unknown
    method, an unknown parameter, a malformed override or a value of the wrong type."""
    if isinstance(text, ParsedSpec):
        return text
    if not isinstance(text, str):
        raise AwqnbError(f"method spec {text!r}: give a string such as 'awq' or 'awq_sh@outlier_percent=1'.")
    text = text.strip()
    name, at, over = text.partition("@")
    name = name.strip()
    kind, method, search = _kind(text, name)
    method_params = get_method(method).PARAMS if kind == "awqnb" else {}
    overrides, params, config, calib = [], {}, {}, {}
    pieces = over.split(",") if at else []
    if at and not over.strip():
        raise AwqnbError(f"method spec {text!r} has '@' but no overrides; drop the '@' or add key=value.")
    for kv in pieces:
        k, v = parse_assignment(kv, f"method spec {text!r}: override", "awq_sh@outlier_percent=1")
        if k in dict(overrides):
            raise AwqnbError(f"method spec {text!r} sets {k} twice; give it once.")
        overrides.append((k, v))
        if k in CALIB_KEYS:
            _check_type(text, k, v, _DEFAULTS[k])
            calib[CALIB_KEYS[k]] = v
            continue
        if kind == "reference" and name in PEERS:
            params[k] = v  # the peer's own; checked below
            continue
        if kind != "awqnb":
            raise AwqnbError(f"method spec {text!r}: {method} takes no search, config or method parameters "
                             f"(only {', '.join(RUN_KEYS)}).")
        if k in SEARCH_KEYS:
            _check_type(text, k, v, _DEFAULTS[k])
            search[k] = v
        elif k in CONFIG_KEYS:
            _check_type(text, k, v, _DEFAULTS[k])
            config[k] = v
        elif k in method_params:
            _check_type(text, k, v, method_params[k])
            params[k] = v
        else:
            raise AwqnbError(f"method spec {text!r}: {method} has no parameter {k!r}; its parameters are "
                             f"{', '.join(sorted(method_params)) or 'none'} (search: {', '.join(SEARCH_KEYS)}; "
                             f"config: {', '.join(CONFIG_KEYS)}; calibration: {', '.join(RUN_KEYS)}).")
    if kind == "reference" and params:
        params = ref.check_params(text, params)
        method = format_spec(name, params.items())
    if search:
        try:
            SearchConfig(**search)  # a bad choice (salience=l3) fails here, not when the run starts
        except AwqnbError as e:
            raise AwqnbError(f"method spec {text!r}: {e}") from None
    return ParsedSpec(text, name, method, kind, tuple(overrides), search, params, config, calib)


def split_specs(text: str) -> list[str]:
    """'a,b@k=1,k2=2,c' → ['a', 'b@k=1,k2=2', 'c']: a piece with '=' and no '@' continues the
    previous spec's overrides."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and "@" not in piece:
            if not out or "@" not in out[-1]:
                raise AwqnbError(f"method spec {piece!r} is an override without a method; write method@{piece}.")
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def parse_specs(specs) -> list[ParsedSpec]:
    """Comma-separated text (see `split_specs`) or an iterable of specs → ParsedSpecs; AwqnbError
    for none or a label given twice."""
    items = split_specs(specs) if isinstance(specs, str) else list(specs)
    out = [parse_spec(s) for s in items]
    labels = [s.label for s in out]
    dup = sorted({lb for lb in labels if labels.count(lb) > 1})
    if dup:
        raise AwqnbError(f"method spec(s) {', '.join(dup)} given twice; give each once.")
    if not out:
        raise AwqnbError(f"no method specs in {specs!r}; give at least one, e.g. 'rtn,awq'.")
    return out


@dataclass
class MethodSpec:
    """One label of a comparison: `method` is 'fp' (no quantization), a registered awqnb method
    (with its `config`), or a reference method (`llmc_awq`, `llmc_gptq`, `ar`, `hqq`, a peer with its
    own parameters as 'ar@iters=0'; the run's bits and group size). `calibration`: overrides of
    the run's CalibSpec fields for this label."""

    label: str
    method: str
    config: MethodConfig | None = None
    calibration: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        return "fp" if self.method == "fp" else ("reference" if is_reference(self.method) else "awqnb")

    @property
    def needs_calibration(self) -> bool:
        if self.kind == "fp":
            return False
        if self.kind == "reference":
            return ref.needs_calibration(self.method)  # hqq: calibration-free, one run for every seed
        return bool(get_method(self.config.method).needs_calibration)

    def describe(self, quant: QuantConfig) -> dict:
        d = {"label": self.label, "method": self.method, "kind": self.kind}
        if self.config is not None:
            d["config"] = self.config.to_dict()
        elif self.kind == "reference":
            d["config"] = {**ref.describe(self.method), "quant": quant.to_dict()}
        if self.calibration:
            d["calibration"] = dict(self.calibration)
        return d
