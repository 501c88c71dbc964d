"""Mixed-precision plans: which (decoder layer, linear family) to keep at other bits than the run's.

A family is one of the architecture's scale groups (`awqnb.model.arch`): `qkv` (q/k/v_proj), `vo`
(o_proj), `gate_up` (gate/up_proj), `down` (down_proj) — so a fused q/k/v or gate/up projection of
an inference engine always has one precision. `bits` is 2, 3, 4 or 8 (rounded to nearest on the run's
grid, group size and symmetry) or 16 (kept in floating point, left out of the packed export's
quantized set).

JSON (`Plan.to_json`, `Plan.read`):
    {"format": "awqnb-plan/1", "keep": [{"layer": 12, "family": "down", "bits": 8}, ...], "note": "..."}
A bare list of such entries, or of `[layer, family, bits]` triples, is read too.
CLI spelling (`Plan.parse_keep`): `12.down,28.gate_up:16` (bits default 8).
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from awqnb.core.config import SUPPORTED_BITS
from awqnb.core.errors import AwqnbError
from awqnb.core.files import atomic_write
from awqnb.model.arch import SPECS, blocks, resolve_spec

PLAN_FORMAT = "awqnb-plan/1"
FP_BITS = 16  # "keep in floating point"
FAMILY_ALIASES = {"o": "vo", "o_proj": "vo", "qkv_proj": "qkv", "gate_up_proj": "gate_up", "down_proj": "down"}


def family_names() -> tuple[str, ...]:
    """The scale-group names every architecture spec shares (qkv, vo, gate_up, down)."""
    out: list[str] = []
    for s in SPECS:
        for g in s.groups:
            if g.name not in out:
                out.append(g.name)
    return tuple(out)


def plan_bits() -> tuple[int, ...]:
    """Bits a plan may give a family: the quantizer's grid bits, or 16 (floating point)."""
    return tuple(SUPPORTED_BITS) + (FP_BITS,)


def _int(v, what: str) -> int:
    if isinstance(v, bool):
        raise AwqnbError(f"{what} {v!r} is not a whole number.")
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    try:
        return operator.index(v)
    except TypeError:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise AwqnbError(f"{what} {v!r} is not a whole number.") from None


@dataclass(frozen=True)
class Plan:
    """entries: `((layer, family, bits), ...)`, one per (layer, family), sorted by (layer, family).

    Validated on construction (family names, bits, no duplicates, layer ≥ 0); `check` validates it
    against a model's depth and scale groups. note: free text (where the plan came from), written
    to JSON but not part of a run's identity.
    """

    entries: tuple[tuple[int, str, int], ...] = ()
    note: str = ""

    def __post_init__(self):
        fams = family_names()
        allowed = plan_bits()
        seen = {}
        out = []
        for e in self.entries:
            if isinstance(e, Mapping):
                missing = {"layer", "family"} - set(e)
                if missing:
                    raise AwqnbError(f"plan entry {dict(e)!r} lacks {', '.join(sorted(missing))}; "
                                     "write {\"layer\": 12, \"family\": \"down\", \"bits\": 8}.")
                layer, fam, bits = e["layer"], e["family"], e.get("bits", 8)
            elif isinstance(e, (list, tuple)) and len(e) in (2, 3):
                layer, fam, bits = (*e, 8) if len(e) == 2 else e
            else:
                raise AwqnbError(f"plan entry {e!r} is not (layer, family, bits).")
            layer = _int(layer, "plan layer")
            if layer < 0:
                raise AwqnbError(f"plan layer {layer} is negative; give decoder layer indices from 0.")
            fam = FAMILY_ALIASES.get(str(fam), str(fam))
            if fam not in fams:
                raise AwqnbError(f"plan family {fam!r} does not exist; families are {', '.join(fams)}.")
            bits = _int(bits, "plan bits")
            if bits not in allowed:
                raise AwqnbError(f"plan bits {bits} for {layer}.{fam} cannot be done by the quantizer; use one of "
                                 f"{', '.join(map(str, allowed))} (16 = keep in floating point).")
            if (layer, fam) in seen:
                raise AwqnbError(f"plan names {layer}.{fam} twice (bits {seen[(layer, fam)]} and {bits}).")
            seen[(layer, fam)] = bits
            out.append((layer, fam, bits))
        order = {f: i for i, f in enumerate(fams)}
        object.__setattr__(self, "entries", tuple(sorted(out, key=lambda t: (t[0], order[t[1]]))))
        object.__setattr__(self, "note", str(self.note or ""))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_obj(cls, obj: Any) -> "Plan":
        """A Plan from a Plan, a JSON document (dict with `keep`), or a list of entries."""
        if isinstance(obj, Plan):
            return obj
        if isinstance(obj, Mapping):
            if "keep" not in obj:
                raise AwqnbError("a plan document needs a 'keep' list of {layer, family, bits} entries.")
            fmt = obj.get("format", PLAN_FORMAT)
            if fmt != PLAN_FORMAT:
                raise AwqnbError(f"plan format {fmt!r} is unknown; this awqnb reads {PLAN_FORMAT!r}.")
            keep = obj["keep"]
            note = obj.get("note", "")
        else:
            keep, note = obj, ""
        if not isinstance(keep, (list, tuple)):
            raise AwqnbError(f"a plan's 'keep' must be a list of entries, not {type(keep).__name__}.")
        return cls(tuple(keep), note)

    @classmethod
    def read(cls, path: str | Path) -> "Plan":
        """A plan from a JSON file, or AwqnbError saying what is wrong with it."""
        if not str(path).strip():
            raise AwqnbError("the plan file name is empty; give a plan JSON file, e.g. --plan plan.json.")
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AwqnbError(f"plan file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise AwqnbError(f"plan file {path} is not JSON ({e}).") from None
        try:
            return cls.from_obj(doc)
        except AwqnbError as e:
            raise AwqnbError(f"plan file {path}: {e}") from None

    @classmethod
    def parse_keep(cls, text: str, default_bits: int = 8) -> "Plan":
        """`'12.down,28.gate_up:16'` → Plan (bits after ':' , default `default_bits`)."""
        entries = []
        for item in filter(None, (s.strip() for s in str(text).split(","))):
            head, _, bits = item.partition(":")
            layer, dot, fam = head.partition(".")
            if not dot or not layer.strip() or not fam.strip():
                raise AwqnbError(f"--keep item {item!r} must look like LAYER.FAMILY[:BITS], e.g. 12.down or "
                                 f"28.gate_up:16 (families: {', '.join(family_names())}).")
            entries.append((_int(layer.strip(), "--keep layer"), fam.strip(),
                            _int(bits.strip(), "--keep bits") if bits else default_bits))
        if not entries:
            raise AwqnbError("--keep is empty; give LAYER.FAMILY[:BITS] items, e.g. 12.down,28.gate_up:16.")
        return cls(tuple(entries))

    # -- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def bits_of(self, layer: int, family: str) -> int | None:
        """The planned bits of (layer, family), None when the plan leaves it to the run."""
        for l, f, b in self.entries:
            if l == layer and f == family:
                return b
        return None

    def as_dict(self) -> dict[tuple[int, str], int]:
        return {(l, f): b for l, f, b in self.entries}

    def to_list(self) -> list[dict]:
        return [{"layer": l, "family": f, "bits": b} for l, f, b in self.entries]

    def to_doc(self) -> dict:
        return {"format": PLAN_FORMAT, "keep": self.to_list(), "note": self.note}

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text; written (atomically) to `path` when given."""
        text = json.dumps(self.to_doc(), indent=1)
        if path is not None:
            atomic_write(Path(path), text + "\n")
        return text

    def describe(self) -> str:
        """`'12.down:8, 28.gate_up:16'`."""
        return ", ".join(f"{l}.{f}:{b}" for l, f, b in self.entries) or "(empty)"

    def check_base_bits(self, bits: int, source: str = "the plan") -> None:
        """AwqnbError for entries at the run's own `bits`: they change no weight, so the plan would
        only save the same model under another directory name."""
        same = [f"{l}.{f}" for l, f, b in self.entries if b == bits]
        if same:
            other = ", ".join(str(b) for b in plan_bits() if b != bits)
            it = "it" if len(same) == 1 else "them"
            raise AwqnbError(f"{source}: {', '.join(same)} at {bits} bits is the run's own precision: that changes "
                             f"no weight and would only save the same model under another name; drop {it} or "
                             f"give other bits ({other}).")

    def check(self, n_layers: int, families: Iterable[str], where: str = "the model") -> None:
        """AwqnbError unless every entry names a layer < n_layers and one of `families`."""
        fams = tuple(families)
        for l, f, _ in self.entries:
            if l >= n_layers:
                raise AwqnbError(f"plan entry {l}.{f}: layer {l} does not exist; {where} has {n_layers} decoder "
                                 f"layers (0–{n_layers - 1}).")
            if f not in fams:
                raise AwqnbError(f"plan entry {l}.{f}: {where} has no family {f!r} (its families: {', '.join(fams)}).")

    def avg_bits(self, n_params: Mapping[tuple[int, str], int], base_bits: int) -> float:
        """Bits per weight over the candidate linears `n_params` ((layer, family) → weights):
        Σ n·bits / Σ n, families outside the plan at `base_bits` (16 counts as 16)."""
        plan = self.as_dict()
        tot = sum(n_params.values())
        if tot <= 0:
            return float(base_bits)
        return sum(n * plan.get(k, base_bits) for k, n in n_params.items()) / tot


def linear_bits(plan: "Plan | None", spec, layer: int, base_bits: int) -> dict[str, int]:
    """Block-relative linear name → planned bits for decoder block `layer`, for the linears whose
    family the plan gives bits other than the run's `base_bits` (those are left to the method)."""
    if not plan:
        return {}
    out = {}
    for g in spec.groups:
        b = plan.bits_of(layer, g.name)
        if b is not None and b != base_bits:
            for name in g.layers:
                out[name] = b
    return out


def check_model(plan: "Plan | None", model, where: str | None = None) -> None:
    """`plan.check` against a loaded model's decoder depth and scale groups (no-op without a plan)."""
    if not plan:
        return
    spec = resolve_spec(model)
    plan.check(len(blocks(model, spec)), [g.name for g in spec.groups],
               where or f"this {getattr(model.config, 'model_type', '')} model".replace("this  ", "this "))
