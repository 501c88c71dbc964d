"""What a checkpoint directory holds, checked before transformers reads its weights.

- `read_records`: config.json, its `quantization_config` and awqnb's `quantization_metadata.json`,
  each of the shape awqnb relies on, or one line saying which file is malformed.
- `check_tensors`: every tensor the architecture needs is in the safetensors files and nothing else
  is (a packed linear needs `weight_packed`, `weight_scale`, `weight_shape` and, asymmetric,
  `weight_zero_point`). transformers would initialise a missing tensor at random and go on.
- `check_records_agree`: config.json and quantization_metadata.json describe the same grid.
- `quiet_loaders`: transformers' load report, progress bars and tracebacks go to the DEBUG log
  (`awqnb -v` shows them) instead of around awqnb's one-line answer.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from awqnb.core.errors import AwqnbError

log = logging.getLogger(__name__)

CT_VERSION = "0.19.0"  # the pin in requirements.txt
CT_INSTALL = f"pip install compressed-tensors=={CT_VERSION}"


def require_compressed_tensors():
    """The `compressed_tensors` module, or an AwqnbError saying how to get it."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise AwqnbError(
            f"the packed format needs the `compressed-tensors` package, which is not installed; run "
            f"`{CT_INSTALL}`, or save the research copy with --format fake (format='fake')."
        )
    import compressed_tensors

    return compressed_tensors


PACKED_PARTS = ("weight_packed", "weight_scale", "weight_shape")
FIX = "re-download the checkpoint or re-save it with `awqnb quantize`"


def _names(xs, n: int = 3) -> str:
    xs = sorted(xs)
    return ", ".join(xs[:n]) + (f", … ({len(xs)} in all)" if len(xs) > n else "")


def _load_json(f: Path):
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AwqnbError(f"{f} is unreadable or not valid JSON ({type(e).__name__}); {FIX}.") from e


def _check_quant_config(qc, f: Path) -> None:
    bad = None
    if not isinstance(qc, dict):
        bad = f"its quantization_config is a {type(qc).__name__}, not an object"
    elif qc.get("quant_method") == "compressed-tensors":
        groups, ignore = qc.get("config_groups") or {}, qc.get("ignore") or []
        if not isinstance(groups, dict):
            bad = "quantization_config.config_groups is not an object"
        elif any(not isinstance(g, dict) or not isinstance(g.get("weights") or {}, dict)
                 or not isinstance(g.get("targets") or [], list) for g in groups.values()):
            bad = "a quantization_config group (or its weights/targets) has the wrong type"
        elif not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            bad = "quantization_config.ignore is not a list of module names"
    if bad:
        raise AwqnbError(f"{f} is malformed: {bad}; {FIX}.")


def read_records(path: str | Path) -> tuple[dict, dict | None, dict | None]:
    """(config, quantization_config or None, quantization_metadata or None) of a model directory,
    or AwqnbError naming the malformed file."""
    p = Path(path)
    if not p.is_dir():
        raise AwqnbError(f"{p} is not a model directory; pass a directory holding config.json.")
    f = p / "config.json"
    if not f.is_file():
        raise AwqnbError(f"{p} is not a Hugging Face model directory (no config.json).")
    conf = _load_json(f)
    if not isinstance(conf, dict):
        raise AwqnbError(f"{f} is not a JSON object; the checkpoint is damaged: {FIX}.")
    qc = conf.get("quantization_config")
    if qc is not None:
        _check_quant_config(qc, f)
    meta = None
    mf = p / "quantization_metadata.json"
    if mf.exists():
        meta = _load_json(mf)
        bad = None
        if not isinstance(meta, dict):
            bad = f"it is a JSON {type(meta).__name__}, not an object"
        elif not isinstance(meta.get("config") or {}, dict):
            bad = "its 'config' is not an object"
        elif not isinstance((meta.get("config") or {}).get("quant") or {}, dict):
            bad = "its config.quant is not an object"
        elif not isinstance(meta.get("export") or {}, dict):
            bad = "its 'export' is not an object"
        if bad:
            raise AwqnbError(f"{mf} is malformed ({bad}); re-save the model with `awqnb quantize`, or remove "
                             "the file to use the directory as an FP model.")
    return conf, qc, meta


def is_compressed(qc: dict | None) -> bool:
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


# --- tensors on disk vs the architecture ------------------------------------------------

def tensor_files(path: str | Path) -> dict[str, str]:
    """tensor name → safetensors file name, read from the headers only ({} when the directory has
    no safetensors files)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        doc = _load_json(index)
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict):
            raise AwqnbError(f"{index} has no weight_map object; {FIX}.")
        files = sorted(set(map(str, wm.values())))
    else:
        files = ["model.safetensors"] if (p / "model.safetensors").is_file() else []
    out: dict[str, str] = {}
    for name in files:
        f = p / name
        if not f.is_file():
            raise AwqnbError(f"{f} is missing (listed in {index.name}); the checkpoint is incomplete: {FIX}.")
        try:
            with safe_open(str(f), framework="pt") as h:
                out.update(dict.fromkeys(h.keys(), name))
        except (SafetensorError, OSError, ValueError) as e:
            raise AwqnbError(f"could not read {f}: its files look corrupt or truncated ({type(e).__name__}: "
                             f"{str(e).strip()[:200]}); {FIX}.") from e
    return out


def _matches(target: str, name: str, cls: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, cls)


def _linear_scheme(name: str, cls: str, qc: dict) -> dict | None:
    """The weights args of the compressed-tensors group that quantizes module `name` (None: stays
    dense). A name or regex target outranks a class-name target, as in compressed-tensors."""
    if any(_matches(t, name, cls) for t in qc.get("ignore") or []):
        return None
    by_name, by_class = None, None
    for g in (qc.get("config_groups") or {}).values():
        for t in g.get("targets") or []:
            if t == cls:
                by_class = by_class or g
            elif _matches(t, name, cls):
                by_name = by_name or g
    g = by_name or by_class
    return None if g is None else (g.get("weights") or None)


def expected_tensors(path: str | Path, qc: dict | None) -> tuple[set[str], set[str]]:
    """(required, optional) tensor names of the architecture in `path`'s config.json, built on the
    meta device (no memory); with a packed `qc`, a quantized linear's `weight` becomes its parts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    required = set(model.state_dict())
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    optional = set(tied)
    if getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None),
                                                                 "tie_word_embeddings", False):
        optional |= {k for k in required if k.endswith("lm_head.weight")}
    required -= optional
    if is_compressed(qc):
        packed = qc.get("format") == "pack-quantized"
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear) or f"{name}.weight" not in required | optional:
                continue
            w = _linear_scheme(name, type(mod).__name__, qc)
            if w is None:
                continue
            required.discard(f"{name}.weight")
            optional.discard(f"{name}.weight")
            parts = {f"{name}.{s}" for s in PACKED_PARTS}
            zp = {f"{name}.weight_zero_point"}
            if packed:
                required |= parts | (set() if w.get("symmetric", True) else zp)
                optional |= zp | {f"{name}.weight_g_idx"}
            else:  # other compressed-tensors formats: accept what they store for a linear
                optional |= parts | zp | {f"{name}.weight", f"{name}.weight_g_idx"}
    return required, optional


def check_tensors(path: str | Path, qc: dict | None) -> None:
    """Refuse a directory whose safetensors files lack a tensor the model needs or hold one it
    does not have; one line naming the file and the first names."""
    p = Path(path)
    present = tensor_files(p)
    if not present:
        return  # no safetensors: transformers says what is missing
    required, optional = expected_tensors(p, qc)
    missing = required - set(present)
    unexpected = set(present) - required - optional
    where = "model.safetensors.index.json" if (p / "model.safetensors.index.json").is_file() else "model.safetensors"
    if qc is None and any(n.endswith(".weight_packed") for n in unexpected):
        raise AwqnbError(f"{p / where} holds packed tensors ({_names(n for n in unexpected if n.endswith('.weight_packed'))}) "
                         "but config.json has no quantization_config, so every packed linear would load at random; "
                         "restore the config.json saved with the checkpoint.")
    if missing:
        raise AwqnbError(f"{p / where} is missing {len(missing)} tensor(s) the model needs ({_names(missing)}); "
                         f"they would load at random: {FIX}.")
    if unexpected:
        raise AwqnbError(f"{p / where} holds {len(unexpected)} tensor(s) the model does not have "
                         f"({_names(unexpected)}); the checkpoint does not match its config.json: {FIX}.")


def check_loading_info(info: dict, name: str) -> None:
    """transformers' own account of a load (output_loading_info=True): anything missing,
    unexpected or mismatched refuses the model (the directory check catches most of it first)."""
    for key, what in (("missing_keys", "is missing"), ("mismatched_keys", "has wrongly shaped"),
                      ("unexpected_keys", "has unexpected")):
        bad = [k if isinstance(k, str) else str(k[0]) for k in info.get(key) or []]
        if bad:
            raise AwqnbError(f"{name} {what} tensors ({_names(bad)}); the weights would not be the "
                             f"checkpoint's: {FIX}.")


@torch.no_grad()
def redecode_other_groups(model: nn.Module, path: str | Path, qc: dict | None) -> list[str]:
    """Decode again, with their own scheme, the packed linears of every config group but the first.

    transformers' dequantize-on-load (`CompressedTensorsConfig(dequantize=True)`, 5.23) decodes every
    dense module with one group (`get_dense_scheme`: the first), so an 8-bit group of a mixed-precision
    checkpoint comes out on a 4-bit grid. Returns the names re-decoded."""
    groups = list((qc or {}).get("config_groups") or {}) if is_compressed(qc) else []
    if len(groups) < 2:
        return []
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    first = qc["config_groups"][groups[0]].get("weights")
    files = tensor_files(path)
    done = []
    with contextlib.ExitStack() as stack:
        handles = {}
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            w = _linear_scheme(name, type(mod).__name__, qc)
            if w is None or w == first or f"{name}.weight_packed" not in files:
                continue
            sd = {}
            for part in (*PACKED_PARTS, "weight_zero_point"):
                f = files.get(f"{name}.{part}")
                if f is not None:
                    if f not in handles:
                        handles[f] = stack.enter_context(safe_open(str(Path(path) / f), framework="pt"))
                    sd[part] = handles[f].get_tensor(f"{name}.{part}")
            scheme = QuantizationScheme(targets=[name], weights=w, format=qc.get("format"))
            dense = BaseCompressor.get_value_from_registry(qc.get("format")).decompress(sd, scheme)["weight"]
            mod.weight.copy_(dense.to(device=mod.weight.device, dtype=mod.weight.dtype))
            done.append(name)
    return done


# --- the two quantization records ---------------------------------------------------------

def _grid_of(weights: dict) -> tuple:
    gs = -1 if weights.get("strategy") == "channel" else weights.get("group_size")
    return weights.get("num_bits"), gs, bool(weights.get("symmetric"))


def check_records_agree(path: str | Path, qc: dict | None, meta: dict | None) -> None:
    """A packed directory's config.json (what transformers loads) and quantization_metadata.json
    (what awqnb reports) must describe the same grid; otherwise the load is refused."""
    if not is_compressed(qc) or not meta or not (meta.get("config") or {}).get("quant"):
        return
    q = meta["config"]["quant"]
    want = (q.get("bits"), q.get("group_size"), bool(q.get("symmetric")))
    groups = [g for g in (qc.get("config_groups") or {}).values()]
    # the run's grid: the group over class `Linear`, or group_0 (awqnb's exact-name mixed-precision layout)
    main = [g.get("weights") or {} for g in groups if "Linear" in (g.get("targets") or [])] or \
        [g.get("weights") or {} for g in groups[:1]]
    if not main:
        raise AwqnbError(f"{Path(path) / 'config.json'} has no quantization group, but "
                         f"quantization_metadata.json records a {want[0]}-bit grid; the two records disagree: {FIX}.")
    got = _grid_of(main[0])
    if got != want:
        fmt = "bits={}, group_size={}, symmetric={}".format
        raise AwqnbError(f"{Path(path) / 'config.json'} says {fmt(*got)} but quantization_metadata.json says "
                         f"{fmt(*want)}; the two records disagree, so the loaded weights would not be the "
                         f"reported ones: {FIX}.")


# --- transformers' own output -----------------------------------------------------------------

@contextlib.contextmanager
def quiet_loaders():
    """Route transformers' logging, warnings and stdout/stderr (load reports, progress bars,
    conversion tracebacks) to the DEBUG log for the duration of a load."""
    buf = io.StringIO()
    tlog = logging.getLogger("transformers")
    handlers, propagate = tlog.handlers[:], tlog.propagate
    tlog.handlers = [logging.StreamHandler(buf)]
    tlog.propagate = False
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf):
            warnings.simplefilter("always")
            yield
    finally:
        tlog.handlers, tlog.propagate = handlers, propagate
        text = "\n".join([buf.getvalue().strip()] + [f"{w.category.__name__}: {w.message}" for w in caught or []]).strip()
        if text:
            log.debug("transformers said while loading:\n%s", text)
