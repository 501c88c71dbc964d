"""A 4-bit runtime for awqnb's packed checkpoints: `load_int4` builds the model with its quantized
linears as `Int4Linear` modules on a 4-bit kernel, never holding their dense weights. Kernels
(`kernel=`): 'torch' (torch's built-in int4pack, CPU and CUDA: fast at 1–8 rows, slow from 32 on),
'gemlite' (CUDA only, the optional `gemlite` package's Triton kernels: GEMV for ≤ 4 rows, split-K
GEMM ≤ 64, GEMM above; `pip install gemlite`), 'dequant' (codes dequantized per call), and 'auto'
(gemlite on CUDA where importable and the shape fits, else torch's, else dequant). Each linear
holds exactly one packed copy, in the layout of the kernel chosen for it.

Kernel (torch ≥ 2.5, aten ops, no extra package):
    CUDA  `_convert_weight_to_int4pack(uint8 [N, K/2] = q[:, 0::2] << 4 | q[:, 1::2], inner_k_tiles)`
          + `_weight_int4pack_mm(x bf16 [M, K], packed, group, sz)`; bf16 only, sm80+.
    CPU   `_convert_weight_to_int4pack_for_cpu(int32 [N, K], inner_k_tiles)`
          + `_weight_int4pack_mm_for_cpu(x, packed, group, sz)`; float32, bfloat16, float16.
    Both compute W = (q − 8)·s + zp per group, sz = [K/group, N, 2] = (s, zp) in x's dtype.
    awqnb's asymmetric code (q, zero z, scale s) is (q − z)·s, so zp = (8 − z)·s; a symmetric
    compressed-tensors code q_ct becomes q = q_ct + 8, z = 8 (zp = 0). Codes of 2 and 3 bits fit too.
    Constraints (torch 2.13 CPU, by experiment; CUDA from int4mm.cu): group ∈ {32, 64, 128, 256},
    K % group == 0; N % 16 == 0 on the CPU, N % 8 == 0 on CUDA. Per channel runs as the largest of
    those groups that divides K, its scale repeated (exact).

gemlite (0.6, HQQ's convention W ≈ (W_q − zeros)·scales, i.e. awqnb's (q − z)·s) packs uint8 codes
[N, K] into int32 [K/8, N] with bf16 scales and zeros [K/g, N] (it stores −z·s: "fma mode"); it
needs K % 32 == 0, K % g == 0, g ≥ 16, bf16/fp16. Its autotune configs ship per GPU name; a GPU
whose name matches none (an H200 is 'nvidia_h200') would autotune on first use, so on sm_90 the
H100 file is loaded (one log line says so); a shape the file lacks (an lm_head's N) takes the tuned
configs of the nearest N with its K and group (`gemlite_borrow_config`) instead of autotuning.

Shapes or groups torch's kernel refuses (g16, N not a multiple of 16, bf16-less CUDA dtypes) fall back
to `dequant`: the same 4-bit codes kept nibble-packed, dequantized at every call (one log line per
load says how many and why). 8-bit linears of a mixed-precision plan do not fit 4 bits: they are
dequantized once at load and stay dense nn.Linear (counted in `int4_summary`).

Prefill (rows M > `prefill_rows`, default PREFILL_ROWS = 128; a module attribute and a load_int4
argument, None = never): the 4-bit kernels lose to bf16 there (gemlite's GEMM 3–3.5× bf16's time at
M = 2048 on an H200), so the linear's one packed copy (gemlite's W_q/scales/zeros, or the nibbles) is
dequantized to a bf16 weight by ONE fused kernel — inductor's, from torch.compile of the unpack /
shift / mask / subtract-zero / scale ops, compiled once per (shape, dtype) on the devices in
COMPILE_DEVICES (eager ops elsewhere, or where compiling fails: one log line) — and F.linear (cuBLAS)
runs with it; the weight is freed after the call. torch's int4pack layout (tiled) is not read back:
its linears keep their kernel at every M.

The packed layout read here is compressed-tensors' `pack-quantized` (awqnb.export.packed):
`weight_packed` int32 [N, ⌈K·b/32⌉] (element i at bit i·b of its row, stored as q_ct + 2^(b−1)),
`weight_scale` [N, G], `weight_zero_point` int32 packed along dim 0 [⌈N·b/32⌉, G] (asymmetric
only), `weight_shape` [N, K]; codes are unpacked here (no compressed-tensors import needed).
"""
from __future__ import annotations

import ast
import copy
import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from awqnb.core.errors import AwqnbError
from awqnb.model import checkpoint
from awqnb.model.devices import resolve_device

log = logging.getLogger(__name__)

KERNEL_GROUPS = (32, 64, 128, 256)
KERNELS = ("auto", "gemlite", "torch", "dequant")
# gemlite's default "fma mode" stores −z·s rounded to bf16 and computes q·s + (−z·s): one op less,
# but that rounding (up to 2⁻⁹·15·s) is several times a bf16 weight's. Off: (q − z)·s, exact integers
# times s, so the product equals the dequantized bf16 weight's to bf16 rounding.
GEMLITE_FMA = False
GEMLITE_BORROW = True  # shapes missing from gemlite's autotune file take a tuned neighbour's configs
_GEMLITE: dict = {}  # the gemlite import, tried once per process: {"mod", "why", "config", "warned"}
# rows above which forward dequantizes to a dense weight and runs cuBLAS (gemlite / dequant linears)
PREFILL_ROWS = 128
# devices where that dequantization is one torch.compile'd kernel (a CPU compile takes seconds per
# shape and needs a C++ compiler; there the same ops run eagerly)
COMPILE_DEVICES = ("cuda",)
_COMPILED: dict = {}  # (layout, shapes, dtype, device, group) → compiled function
_COMPILE_STATE: dict = {"broken": None}  # why compiling failed (then eager ops, one log line)
PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


# --- compressed-tensors' int32 packing -------------------------------------------------------

def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """The unsigned b-bit fields (int32, in [0, 2^b)) of compressed-tensors' dense int32 packing
    along `dim`: element i of a row is bits i·b … i·b + b − 1 of the row's bit stream (little-endian
    words), `length` elements per row. Signed code = field − 2^(b−1)."""
    if packed.dtype != torch.int32:
        raise AwqnbError(f"packed codes are {packed.dtype}, not int32; the checkpoint is not compressed-tensors' "
                         "pack-quantized format: re-export it with `awqnb quantize --format packed`.")
    words = packed.transpose(0, 1) if dim == 0 else packed
    words = words.to(torch.int64) & 0xFFFFFFFF  # unsigned view of each word
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: whole fields per word
        per = 32 // bits
        shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
        out = ((words.unsqueeze(-1) >> shifts) & mask).reshape(words.shape[0], -1)
    else:  # 3, 5, 6, 7 bits: a field may straddle two words
        start = torch.arange(length, device=words.device, dtype=torch.int64) * bits
        w, off = start // 32, start % 32
        nxt = torch.cat([words, torch.zeros_like(words[:, :1])], 1)
        out = ((nxt[:, w] >> off) | (nxt[:, w + 1] << (32 - off))) & mask
    out = out[:, :length].to(torch.int32)
    if out.shape[1] != length:
        raise AwqnbError(f"packed codes hold {out.shape[1]} values per row, fewer than the {length} the shape "
                         "needs; the checkpoint is damaged: re-export it with `awqnb quantize --format packed`.")
    return out.transpose(0, 1).contiguous() if dim == 0 else out


# --- dense weights from the packed layouts (the prefill path) -------------------------------

def gemlite_dense(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                  fma: bool = False) -> torch.Tensor:
    """Wᵀ [K, N] in scales' dtype from gemlite's 4-bit layout: w_q int32 [K/8, N], code k of column
    n at bits 4·(k % 8) of word k // 8 (packed over K, packing_bitwidth 32, elements_per_sample 8);
    scales, zeros [K/group, N]; W = (q − zeros)·scales, or q·scales + zeros in fma mode. [K, N] is
    the layout's own order (reads and writes coalesced); `.t()` is the [N, K] weight F.linear takes."""
    kw, n = w_q.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w_q.device)
    q = ((w_q.unsqueeze(1) >> shifts.view(1, 8, 1)) & 15).reshape(kw * 8, n).to(scales.dtype)
    s = scales.unsqueeze(1).expand(-1, group, -1).reshape(kw * 8, n)
    z = zeros.unsqueeze(1).expand(-1, group, -1).reshape(kw * 8, n)
    return q * s + z if fma else (q - z) * s


def nibble_dense(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """W [N, K] in scale's dtype from awqnb's nibbles: codes uint8 [N, ⌈K/2⌉], even k in the low
    nibble; scale, zero [N, G] over groups of `group` (the last may be shorter); W = (q − zero)·scale."""
    n, g = scale.shape
    q = torch.stack([codes & 15, codes >> 4], -1).reshape(n, -1)[:, :k].to(scale.dtype)
    s = scale.unsqueeze(-1).expand(n, g, group).reshape(n, g * group)[:, :k]
    z = zero.unsqueeze(-1).expand(n, g, group).reshape(n, g * group)[:, :k]
    return (q - z) * s


def fused(fn, *args, use_compile: bool | None = None, **static):
    """fn(*args, **static) as one inductor kernel: torch.compile'd once per (fn, shapes, dtypes,
    device, static args), dynamic=False. use_compile None: on the devices of COMPILE_DEVICES. A
    compile that fails logs one line per process and every later call runs the eager ops."""
    dev = args[0].device
    if use_compile is None:
        use_compile = dev.type in COMPILE_DEVICES
    if not use_compile or _COMPILE_STATE["broken"]:
        return fn(*args, **static)
    key = (fn.__name__, tuple((tuple(a.shape), a.dtype) for a in args), str(dev), tuple(sorted(static.items())))
    c = _COMPILED.get(key)
    if c is None:
        # dynamo keeps compiled graphs per code object and recompiles one at most 8 times; a copy
        # of fn's code per key keeps every shape compiled once, whatever the model's count of shapes
        name = f"{fn.__name__}_{len(_COMPILED)}"
        own = type(fn)(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__)
        c = _COMPILED[key] = torch.compile(own, dynamic=False, fullgraph=True)
    try:
        return c(*args, **static)
    except Exception as e:  # noqa: BLE001 - no Triton, no C++ compiler, an inductor bug: eager ops still work
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        _COMPILE_STATE["broken"] = why
        _COMPILED.pop(key, None)
        log.warning("INT4 prefill: torch.compile of the fused dequantization failed (%s); dequantizing with "
                    "eager ops from now on (slower, more memory)", why)
        return fn(*args, **static)


def compile_status() -> dict:
    """How the prefill dequantization runs in this process: the devices it is compiled on, the count
    of (shape, dtype) kernels compiled so far, and why compiling failed (None: it has not)."""
    return {"devices": list(COMPILE_DEVICES), "compiled": len(_COMPILED), "failed": _COMPILE_STATE["broken"]}


# --- the module -----------------------------------------------------------------------------

def kernel_group(k: int, group_size: int) -> int | None:
    """The group size the int4 kernel runs for K = k with groups of `group_size` (−1 or k: per
    channel, as the largest kernel group dividing k), or None."""
    if group_size in (-1, k):
        return next((g for g in reversed(KERNEL_GROUPS) if k % g == 0), None)
    return group_size if group_size in KERNEL_GROUPS and k % group_size == 0 else None


def kernel_refusal(n: int, k: int, group_size: int, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch's int4 kernel cannot run this linear (None: it can)."""
    if kernel_group(k, group_size) is None:
        return f"group {group_size} (K={k}): the kernel takes groups of {'/'.join(map(str, KERNEL_GROUPS))} dividing K"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA int4 kernel needs compute capability 8.0 or newer"
        if dtype != torch.bfloat16:
            return f"{dtype}: the CUDA kernel computes in bfloat16 only"
        if n % 8:
            return f"N={n}: the CUDA kernel needs N % 8 == 0"
        return None
    if device.type == "cpu":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this torch has no CPU int4 kernel (needs torch ≥ 2.6)"
        return f"N={n}: the CPU kernel needs N % 16 == 0" if n % 16 else None
    return f"no int4 kernel on {device.type}"


def gemlite_import():
    """(the gemlite module, None) or (None, why it cannot be imported). Tried once per process; any
    exception counts (gemlite queries the GPU at import, so it fails on a CPU-only machine)."""
    if "why" not in _GEMLITE:
        try:
            import gemlite
        except Exception as e:  # noqa: BLE001 - ImportError, no Triton, no CUDA device: all mean "not here"
            first = (str(e).splitlines() or [""])[0][:160]
            _GEMLITE.update(mod=None, why=f"gemlite is not importable ({type(e).__name__}: {first})")
        else:
            _GEMLITE.update(mod=gemlite, why=None, config=None)
    return _GEMLITE["mod"], _GEMLITE["why"]


def gemlite_config(device: torch.device) -> str | None:
    """The autotune config file gemlite uses. gemlite picks one by GPU name at import; an H200
    ('nvidia_h200') matches none and would autotune every (M, N, K) on first use (seconds each), so
    on sm_90 with no match the H100 file is loaded (same architecture; one log line)."""
    gl, _ = gemlite_import()
    if gl is None or device.type != "cuda":
        return None
    if "config_done" not in _GEMLITE:
        _GEMLITE["config_done"] = True
        from gemlite import core as gl_core

        found = gl_core.get_default_cache_config()
        if found is None and torch.cuda.get_device_capability(device) == (9, 0):
            h100 = Path(gl.__file__).parent / "configs" / "h100.json"
            if h100.is_file() and gl.load_config(str(h100)):
                found = str(h100)
                log.info("gemlite: no autotune config for %s; loaded the H100 one (sm_90): %s",
                         torch.cuda.get_device_name(device), h100.name)
        _GEMLITE["config"] = found
    return _GEMLITE.get("config")


def gemlite_borrow_config(n: int, k: int, group: int) -> dict[str, int]:
    """gemlite's autotune file holds configs per (M bucket, N, K, group, …); a shape it lacks (an
    lm_head's N = 128256, say) is autotuned at the first call of each M bucket (≈ 20 Triton
    compiles each). Where configs exist for the same K and group at other N, the nearest such
    N's (by ratio) are copied for this N (tile sizes suit any N of that size; gemlite recomputes
    its EVEN_N flag). Returns {matmul type: donor N} ({}: nothing borrowed); off with
    GEMLITE_BORROW = False."""
    if not GEMLITE_BORROW:
        return {}
    done = _GEMLITE.setdefault("borrowed", {})  # once per shape: a load makes hundreds of linears
    if (n, k, group) in done:
        return done[(n, k, group)]
    from gemlite import core as gl_core

    cache = getattr(gl_core, "GEMLITE_TRITON_CONFIG_CACHE", None)  # rebound by load_config: read it now
    donors = {}
    for typ, entries in (cache or {}).items():
        if not isinstance(entries, dict):
            continue
        keys = {}
        for key in entries:  # gemlite's signature: str((M bucket, N, K, group, elements_per_sample, type_id))
            try:
                t = ast.literal_eval(key)
            except (ValueError, SyntaxError):
                continue
            if isinstance(t, tuple) and len(t) == 6 and t[2] == k and t[3] == group:
                keys[key] = t
        if not keys or any(t[1] == n for t in keys.values()):
            continue  # nothing for this K and group, or this shape is tuned already
        dn = min({t[1] for t in keys.values()}, key=lambda x: abs(math.log(x / n)))
        for key, t in keys.items():
            if t[1] == dn:
                entries.setdefault(str((t[0], n) + t[2:]), copy.deepcopy(entries[key]))
        donors[typ] = dn
    done[(n, k, group)] = donors
    if donors:
        log.info("gemlite: no tuned config for N=%d, K=%d, group %d; using those of %s (no autotune at first use)",
                 n, k, group, ", ".join(f"N={d} for {t}" for t, d in donors.items()))
    return donors


def gemlite_group(k: int, group_size: int) -> int | None:
    """The group gemlite runs for K = k (per channel: the largest of KERNEL_GROUPS dividing k, its
    scale repeated, as for torch's kernel), or None."""
    if group_size in (-1, k):
        return kernel_group(k, group_size)
    return group_size if group_size >= 16 and k % group_size == 0 else None


def gemlite_refusal(n: int, k: int, group_size: int, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why gemlite cannot run this linear (None: it can). Importability is checked last: a CPU
    device is refused without importing gemlite."""
    if device.type != "cuda":
        return f"gemlite runs on CUDA only, not {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dtype}: gemlite computes in bfloat16 or float16"
    if k % 32:
        return f"K={k}: gemlite needs K % 32 == 0"
    g = gemlite_group(k, group_size)
    if g is None:
        return f"group {group_size} (K={k}): gemlite takes groups ≥ 16 dividing K"
    if g == k:  # one group per row switches gemlite to its channel-wise path, not the one used here
        return f"K={k} is a single group of {g}: gemlite needs at least two groups per row here"
    return gemlite_import()[1]


def select_kernel(kernel: str, n: int, k: int, group_size: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[str, str | None]:
    """(the kernel a linear [N=n, K=k] runs on, why the preferred one refused it or None) for the
    asked `kernel` (see KERNELS). An explicit 'gemlite' / 'torch' that cannot run raises one line;
    'auto' falls back gemlite → torch → dequant, logging a missing gemlite once per process."""
    kernel = "torch" if kernel == "tinygemm" else kernel
    if kernel not in KERNELS:
        raise AwqnbError(f"kernel={kernel!r} is unknown; use one of {', '.join(KERNELS)}.")
    if kernel == "dequant":
        return "dequant", "asked for"
    if kernel in ("auto", "gemlite"):
        gl_why = gemlite_refusal(n, k, group_size, device, dtype)
        if gl_why is None:
            return "gemlite", None
        if kernel == "gemlite":
            hint = ("`pip install gemlite` (or awqnb[int4]) on a CUDA machine with Triton"
                    if _GEMLITE.get("why") and gl_why == _GEMLITE["why"] else "kernel='auto' or 'torch'")
            raise AwqnbError(f"kernel='gemlite' cannot run this linear ({gl_why}); use {hint}.")
        if device.type == "cuda" and gl_why == _GEMLITE.get("why") and not _GEMLITE.get("warned"):
            _GEMLITE["warned"] = True  # one line per process, not one per linear
            log.info("INT4 runtime: %s; using torch's int4 kernel (`pip install gemlite` for batched speed)", gl_why)
    why = kernel_refusal(n, k, group_size, device, dtype)
    if why is None:
        return "torch", None
    if kernel == "torch":
        raise AwqnbError(f"torch's int4 kernel cannot run this linear ({why}); use kernel='auto' to dequantize per call.")
    return "dequant", why


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)  # k % 32 == 0 holds for every kernel group


def _expand(t: torch.Tensor, group: int, k: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)[:, :k]


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W = (q − z)·s held as 4-bit codes: on gemlite's Triton kernels (`kernel` =
    'gemlite', CUDA), on torch's int4 kernel ('torch'), or nibble-packed and dequantized at each
    call ('dequant', the fallback). One packed copy, no dense weight. Build it with `from_codes`.
    Above `prefill_rows` rows (gemlite / dequant), forward dequantizes that copy with one fused
    kernel and runs F.linear instead (module docstring); None: never."""

    prefill_rows: int | None = PREFILL_ROWS

    def __init__(self, in_features: int, out_features: int, group_size: int, kernel: str,
                 layout: str, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel, self.layout = kernel, layout
        self.kernel_group = None
        self.refusal: str | None = None  # why the kernel refused this linear (kernel 'dequant')
        self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                   bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16, device=None,
                   kernel: str = "auto") -> "Int4Linear":
        """q: integer codes [N, K] in [0, 15]; scale [N, G] and zero [N, G] (integer-valued, in
        [0, 15]; None = 8, i.e. symmetric) with W = (q − zero)·scale over groups of `group_size`
        (−1: per channel). On `device` in `dtype`. kernel: 'auto' (gemlite on CUDA where importable
        and the shape fits, else torch's int4 kernel where it runs, else 'dequant'); 'gemlite' or
        'torch' (refuse, one line, where that kernel cannot run); 'dequant' (dequantize per call).
        'tinygemm' is accepted as the old name of 'torch'."""
        device = resolve_device(device) if device is not None else q.device
        n, k = q.shape
        gs = k if group_size == -1 else group_size
        if int(q.min()) < 0 or int(q.max()) > 15:
            raise AwqnbError(f"int4 codes must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]; "
                             "only grids of 4 bits or fewer run as INT4.")
        q = q.to(device=device, dtype=torch.int32)
        s = scale.to(device=device, dtype=torch.float32)
        z = torch.full_like(s, 8.0) if zero is None else zero.to(device=device, dtype=torch.float32)
        chosen, why = select_kernel(kernel, n, k, gs, device, dtype)
        mod = cls(k, n, gs, chosen, device.type, dtype)
        mod.refusal = why
        if chosen == "gemlite":
            gl, _ = gemlite_import()
            gemlite_config(device)
            g = gemlite_group(k, gs)
            mod.kernel_group = g
            gemlite_borrow_config(n, k, g)
            reps = gs // g if gs != k else k // g
            gdt = gl.DType.BF16 if dtype == torch.bfloat16 else gl.DType.FP16
            lin = gl.GemLiteLinear(4, group_size=g, in_features=k, out_features=n, input_dtype=gdt, output_dtype=gdt)
            # zeros as floats (integers ≤ 15, exact); see GEMLITE_FMA for the mode
            lin.pack(q.to(torch.uint8).contiguous(), s.repeat_interleave(reps, 1).to(dtype).contiguous(),
                     z.repeat_interleave(reps, 1).to(dtype).contiguous(), None, fma_mode=GEMLITE_FMA)
            mod.gl = lin
        elif chosen == "torch":
            g = kernel_group(k, gs)
            mod.kernel_group = g
            reps = gs // g if gs != k else k // g  # a wider group (per channel) repeats its scale
            s_k, z_k = s.repeat_interleave(reps, 1), z.repeat_interleave(reps, 1)
            sz = torch.stack([s_k, (8.0 - z_k) * s_k], -1).transpose(0, 1).contiguous().to(dtype)
            tiles = _inner_k_tiles(k)
            if device.type == "cuda":
                u8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
                packed = torch.ops.aten._convert_weight_to_int4pack(u8, tiles)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), tiles)
            mod.register_buffer("packed", packed)
            mod.register_buffer("scale_zero", sz)
        else:  # dequant
            qq = F.pad(q, (0, k % 2)) if k % 2 else q
            mod.register_buffer("codes", (qq[:, 0::2] | (qq[:, 1::2] << 4)).to(torch.uint8).contiguous())
            mod.register_buffer("scale", s.to(dtype))
            mod.register_buffer("zero", z.to(dtype))  # integers ≤ 15: exact in every float dtype
        if bias is not None:
            mod.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        return mod

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the scales: they follow `module.to(dtype)`)."""
        if self.kernel == "gemlite":
            return self.gl.scales.dtype
        return (self.scale_zero if self.kernel == "torch" else self.scale).dtype

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel={self.kernel}, dtype={str(self.dtype).replace('torch.', '')}")

    def _check_layout(self, t: torch.Tensor) -> None:
        if t.device.type != self.layout:  # the packed layouts of CPU and CUDA differ
            raise AwqnbError(f"this Int4Linear was packed for {self.layout} but sits on {t.device.type}; "
                             f"reload it with load_int4(..., device='{t.device}') instead of moving it.")

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The dense W [N, K] in float32 (for tests and checks: it materialises the weight)."""
        if self.prefill_layout() is not None:
            return self._dense(torch.float32, use_compile=False)
        eye = torch.eye(self.in_features, device=self._device(), dtype=self.dtype)
        return self._mm(eye).float().t().contiguous()

    def prefill_layout(self) -> str | None:
        """The packed layout the prefill path reads ('gemlite' or 'nibbles'), None if it cannot
        (torch's tiled int4pack, a gemlite mode other than (q − z)·s or q·s + z)."""
        if self.kernel == "dequant":
            return "nibbles"
        if self.kernel == "gemlite":
            gl = self.gl
            ok = (gl.W_q.dtype == torch.int32 and tuple(gl.W_q.shape) == (self.in_features // 8, self.out_features)
                  and getattr(gl, "elements_per_sample", None) == 8 and getattr(gl, "W_group_mode", None) in (3, 4)
                  and tuple(gl.scales.shape) == tuple(gl.zeros.shape) == (self.in_features // self.kernel_group,
                                                                          self.out_features))
            return "gemlite" if ok else None
        return None

    @torch.no_grad()
    def prefill_weight(self) -> torch.Tensor:
        """W [N, K] in the module's dtype (for gemlite a transposed view of a contiguous [K, N]),
        dequantized from the one packed copy by the fused kernel; a temporary of the caller's."""
        return self._dense(self.dtype)

    def _dense(self, dtype: torch.dtype, use_compile: bool | None = None) -> torch.Tensor:
        if self.kernel == "gemlite":
            gl = self.gl
            # detach: plain tensors in, not gemlite's Parameters (nothing for dynamo to guard by identity)
            w_t = fused(gemlite_dense, gl.W_q.detach(), gl.scales.detach().to(dtype), gl.zeros.detach().to(dtype),
                        use_compile=use_compile, group=self.kernel_group, fma=gl.W_group_mode == 4)
            return w_t.t()
        return fused(nibble_dense, self.codes, self.scale.to(dtype), self.zero.to(dtype), use_compile=use_compile,
                     group=self.group_size, k=self.in_features)

    def _device(self) -> torch.device:
        return self.gl.W_q.device if self.kernel == "gemlite" else self.packed.device

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel == "gemlite":
            return self.gl(x2)
        self._check_layout(self.packed)
        if self.layout == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.kernel_group, self.scale_zero)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.kernel_group, self.scale_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dt = x.shape, x.dtype
        rows = x.numel() // self.in_features
        if self.prefill_rows is not None and rows > self.prefill_rows and self.prefill_layout() is not None:
            w = self.prefill_weight()  # one fused dequantization, then cuBLAS
            return F.linear(x.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype)).to(dt)
        if self.kernel in ("torch", "gemlite"):
            x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
            y = self._mm(x2).reshape(*shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.to(dt)
        w = self._dense(self.scale.dtype, use_compile=False)  # the per-call fallback: eager ops
        return F.linear(x.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype)).to(dt)

    def nbytes(self) -> int:
        """Bytes this module holds (codes, scales, zeros, bias)."""
        return sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))


# --- the checkpoint -------------------------------------------------------------------------

def linear_scheme(name: str, qc: dict) -> dict | None:
    """The `weights` args of the compressed-tensors group quantizing linear `name` (None: dense).
    Ignored names first; an exact-name or regex target outranks the class target `Linear`."""
    def hit(t: str) -> bool:
        return re.match(t[3:], name) is not None if t.startswith("re:") else t == name

    if any(hit(t) for t in qc.get("ignore") or []):
        return None
    by_name = by_class = None
    for g in (qc.get("config_groups") or {}).values():
        for t in g.get("targets") or []:
            if t == "Linear":
                by_class = by_class or g
            elif hit(t):
                by_name = by_name or g
    g = by_name or by_class
    return None if g is None else (g.get("weights") or None)


def _codes_of(parts: dict[str, torch.Tensor], w: dict, name: str):
    """(signed codes [N, K], scale [N, G], signed zero [N, G] or None, group size) of one packed
    linear, from its compressed-tensors tensors."""
    bits = int(w.get("num_bits") or 0)
    if w.get("type", "int") != "int" or not 1 <= bits <= 8:
        raise AwqnbError(f"{name}: {w.get('type')} {bits}-bit weights are not awqnb's INT grid; "
                         "use --runtime dense.")
    gidx = parts.get("weight_g_idx")
    if gidx is not None and not torch.equal(gidx.long().cpu(), torch.arange(gidx.numel()) // int(w["group_size"])):
        raise AwqnbError(f"{name} has an act-order group index (weight_g_idx); the INT4 runtime runs "
                         "contiguous groups only: use --runtime dense.")
    n, k = (int(v) for v in parts["weight_shape"].tolist())
    off = 1 << (bits - 1)
    q = unpack_int32(parts["weight_packed"], bits, k) - off
    scale = parts["weight_scale"]
    z = None
    if not w.get("symmetric", True):
        if "weight_zero_point" not in parts:
            raise AwqnbError(f"{name} is asymmetric but has no weight_zero_point; the checkpoint is damaged: "
                             "re-export it with `awqnb quantize --format packed`.")
        z = unpack_int32(parts["weight_zero_point"], bits, n, dim=0) - off
    if q.shape != (n, k) or scale.shape[0] != n:
        raise AwqnbError(f"{name}: packed codes {tuple(q.shape)} / scales {tuple(scale.shape)} do not match "
                         f"weight_shape {(n, k)}; the checkpoint is damaged: re-export it.")
    gs = -1 if w.get("strategy") == "channel" else int(w.get("group_size") or -1)
    return q, scale, z, gs, bits


def _dequantize(q: torch.Tensor, scale: torch.Tensor, z: torch.Tensor | None, gs: int) -> torch.Tensor:
    k = q.shape[1]
    g = k if gs == -1 else gs
    zz = 0.0 if z is None else _expand(z.float(), g, k)
    return (q.float() - zz) * _expand(scale.float(), g, k)


def _resolve_dtype(path: Path, device: torch.device, dtype) -> torch.dtype:
    from awqnb.core.dtypes import parse_dtype

    want = parse_dtype(dtype) if dtype is not None else None
    if device.type == "cuda":
        if want not in (None, torch.bfloat16):
            raise AwqnbError(f"the CUDA int4 kernel computes in bfloat16; load with dtype bfloat16 (not {want}), "
                             "or use --runtime dense.")
        return torch.bfloat16
    if want is not None:
        return want
    conf = json.loads((path / "config.json").read_text())
    name = conf.get("dtype") or conf.get("torch_dtype")
    got = parse_dtype(name) if isinstance(name, str) else None
    return got or torch.float32


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise AwqnbError(f"the checkpoint holds {key}, which its architecture does not have; the checkpoint "
                         "does not match its config.json: re-export it.")


@torch.no_grad()
def load_int4(path: str | Path, device="cpu", dtype=None, kernel: str = "auto",
              prefill_rows: int | None = PREFILL_ROWS):
    """(model, tokenizer or None if the directory has none) of an awqnb packed directory with its
    ≤4-bit linears as Int4Linear.

    The model is built on the meta device; each quantized linear is made from its packed codes on
    `device` (never as a dense weight), every other tensor is read from the safetensors files and
    cast to `dtype` (None: the config's dtype; always bfloat16 on CUDA, the kernel's dtype). Linears
    a plan keeps at 8 bits are dequantized to dense nn.Linear; see `int4_summary(model)`.
    kernel: 'auto' | 'gemlite' | 'torch' | 'dequant', for every ≤4-bit linear (Int4Linear.from_codes).
    prefill_rows: above this many rows a gemlite / dequant linear dequantizes its codes with one
    fused kernel and runs F.linear (None: never); a packed lm_head is an Int4Linear like the rest."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    _, qc, meta = checkpoint.read_records(p)
    if not checkpoint.is_compressed(qc) or qc.get("format") != "pack-quantized":
        raise AwqnbError(f"{p} is not a packed (compressed-tensors pack-quantized) checkpoint; the INT4 runtime "
                         "loads those only: use --runtime dense, or export with `awqnb quantize --format packed`.")
    checkpoint.check_records_agree(p, qc, meta)
    checkpoint.check_tensors(p, qc)
    device = resolve_device(device)
    if kernel not in KERNELS + ("tinygemm",):
        raise AwqnbError(f"kernel={kernel!r} is unknown; use one of {', '.join(KERNELS)}.")
    if prefill_rows is not None and (not isinstance(prefill_rows, int) or prefill_rows < 0):
        raise AwqnbError(f"prefill_rows={prefill_rows!r} must be a row count ≥ 0, or None to keep the 4-bit kernel "
                         "at every batch size.")
    dtype = _resolve_dtype(p, device, dtype)
    files = checkpoint.tensor_files(p)
    packed_names = sorted({k.rsplit(".", 1)[0] for k in files if k.endswith(".weight_packed")})

    with checkpoint.quiet_loaders():
        config = AutoConfig.from_pretrained(p)
        # a tokenizer-less export (a random-weight benchmark model) loads with tokenizer None
        has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        tok = AutoTokenizer.from_pretrained(p) if has_tok else None
    config.quantization_config = None
    del config.quantization_config
    head_packed = any(n.endswith("lm_head") for n in packed_names)
    if head_packed:
        config.tie_word_embeddings = False  # a packed head is its own tensor
    with init_empty_weights():  # parameters on meta, buffers (RoPE inv_freq, ...) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    handles = {f: safe_open(str(p / f), framework="pt", device="cpu") for f in set(files.values())}

    def get(key: str) -> torch.Tensor:
        return handles[files[key]].get_tensor(key)

    summary = {"int4": 0, "gemlite": 0, "torch": 0, "dequant": 0, "dense_8bit": 0, "refusals": {}}
    used: set[str] = set()
    for name in packed_names:
        parts = {s: get(f"{name}.{s}").to(device) for s in PACKED_SUFFIXES if f"{name}.{s}" in files}
        used |= {f"{name}.{s}" for s in parts}
        w = linear_scheme(name, qc)
        if w is None:
            raise AwqnbError(f"{p / 'config.json'} does not quantize {name}, yet its packed tensors are in the "
                             "checkpoint; the two do not match: re-export it.")
        q, scale, z, gs, bits = _codes_of(parts, w, name)
        bias = get(f"{name}.bias").to(device) if f"{name}.bias" in files else None
        used |= {f"{name}.bias"} if bias is not None else set()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if bits <= 4:
            off = 8  # signed compressed-tensors codes → the kernel's [0, 15]
            mod = Int4Linear.from_codes(q + off, scale, None if z is None else z + off, gs, bias, dtype, device,
                                        kernel=kernel)
            mod.prefill_rows = prefill_rows
            summary["int4"] += 1
            summary[mod.kernel] += 1
            if mod.refusal and mod.kernel == "dequant":
                summary["refusals"].setdefault(mod.refusal, []).append(name)
        else:
            mod = nn.Linear(q.shape[1], q.shape[0], bias=bias is not None, device="meta")
            mod.weight = nn.Parameter(_dequantize(q, scale, z, gs).to(dtype), requires_grad=False)
            if bias is not None:
                mod.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
            summary["dense_8bit"] += 1
        setattr(parent, child, mod)
        del q, scale, z, parts
    for key in sorted(set(files) - used):
        t = get(key)
        _set_tensor(model, key, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
    _finish(model, config, device)
    if summary["dequant"]:  # one line per load, however many linears
        log.warning("INT4 runtime: %d linear(s) dequantized at every call, the int4 kernel refuses them: %s",
                    summary["dequant"], "; ".join(f"{len(v)} × {why}, e.g. {v[0]}"
                                                  for why, v in summary["refusals"].items()))
    if summary["dense_8bit"]:
        log.info("INT4 runtime: %d linear(s) above 4 bits kept dense (dequantized at load)", summary["dense_8bit"])
    model.eval()
    model.awqnb_runtime = "int4"
    log.info("INT4 runtime: %d linears on %s (%d on gemlite, %d on torch's int4 kernel, %d dequantized per call), %s",
             summary["int4"], device, summary["gemlite"], summary["torch"], summary["dequant"], dtype)
    return model, tok


def _finish(model: nn.Module, config, device: torch.device) -> None:
    """Tie the head where the config says so, move the buffers made at build time to `device`, and
    refuse anything still on the meta device (it would be random or missing)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and out is not None and getattr(out, "weight", None) is not None and out.weight.is_meta:
        out.weight = inp.weight
    for mod in model.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta and b.device != device:
                mod._buffers[k] = b.to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise AwqnbError(f"the checkpoint has no tensor for {len(left)} part(s) of the model (e.g. {left[0]}); "
                         "it does not match its config.json: re-export it.")


def int4_summary(model: nn.Module) -> dict:
    """How a model's linears run and what they hold: counts per kernel, bytes of the Int4Linear
    modules, bytes a dense copy of their weights would take in their dtype, dense linears left."""
    mods = [m for m in model.modules() if isinstance(m, Int4Linear)]
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return {
        "int4_linears": len(mods),
        "gemlite": sum(m.kernel == "gemlite" for m in mods),
        "torch": sum(m.kernel == "torch" for m in mods),
        "dequant": sum(m.kernel == "dequant" for m in mods),
        # linears that switch to the fused dequantization + F.linear above their prefill_rows
        "prefill_dequant": sum(m.prefill_rows is not None and m.prefill_layout() is not None for m in mods),
        "prefill_rows": sorted({m.prefill_rows for m in mods if m.prefill_rows is not None}),
        "dense_linears": len(dense),
        "int4_bytes": sum(m.nbytes() for m in mods),
        "dense_equivalent_bytes": sum(m.in_features * m.out_features * torch.finfo(m.dtype).bits // 8 for m in mods),
    }


# --- evaluation entry point: the runtime a model path gets ------------------------------------

RUNTIMES = ("auto", "int4", "dense")


def resolve_runtime(path: str | Path, runtime: str = "auto", kernel: str = "auto") -> tuple[str, str]:
    """('int4' | 'dense', why) for evaluating `path` (an alias, a directory, a .gguf file, a Hub id).

    auto: int4 for a packed directory (compressed-tensors pack-quantized, awqnb's packed export),
    dense otherwise; int4: a packed directory or one clear line; dense: always dense (packed weights
    decoded at load by transformers). An unknown runtime or kernel is one line, before any loading."""
    if runtime not in RUNTIMES:
        raise AwqnbError(f"runtime={runtime!r} is unknown; use one of {', '.join(RUNTIMES)}.")
    if kernel not in KERNELS:
        raise AwqnbError(f"int4 kernel={kernel!r} is unknown; use one of {', '.join(KERNELS)}.")
    p = Path(str(path)).expanduser()
    qc = None
    if p.is_dir() and (p / "config.json").is_file():
        qc = checkpoint.read_records(p)[1]  # a malformed config.json: one line
    packed = checkpoint.is_compressed(qc) and qc.get("format") == "pack-quantized"
    if runtime == "dense":
        return "dense", "runtime dense asked for" + (" (packed weights decoded at load)" if packed else "")
    if packed:
        return "int4", f"a packed directory, runtime {runtime}"
    if runtime == "int4":
        raise AwqnbError(f"{path} is not a packed checkpoint (compressed-tensors pack-quantized), which the INT4 "
                         "runtime needs: use runtime dense (`awqnb eval --runtime dense`), or export one with "
                         "`awqnb quantize --format packed`.")
    return "dense", "not a packed directory"


def load_for_eval(path: str | Path, device="cpu", runtime: str = "auto", kernel: str = "auto",
                  dtype=None, dense_device=None):
    """(model, tokenizer, provenance) of a model to evaluate, on the runtime `resolve_runtime` picks.

    int4: `load_int4(path, device, dtype, kernel)` (Int4Linear modules, no dense copy); dense:
    `awqnb.model.loading.load_model(path)` on `dense_device` (default `device`), in `dtype` (None: the
    checkpoint's). provenance: {'runtime': 'int4' | 'dense', 'requested', 'why', 'kernel' (the
    kernel asked for; None when dense), 'int4': `int4_summary(model)` (None when dense), 'device'}.
    `runtime_words(provenance)` says it in one line for a report."""
    from awqnb.model.loading import load_model

    which, why = resolve_runtime(path, runtime, kernel)
    if which == "int4":
        model, tok = load_int4(path, device=device, dtype=dtype, kernel=kernel)
        summary, dev = int4_summary(model), resolve_device(device)
    else:
        dev = resolve_device(dense_device if dense_device is not None else device)
        model, tok = load_model(str(path), device=dev, dtype="auto" if dtype is None else dtype)
        summary, kernel = None, None
    prov = {"runtime": which, "requested": runtime, "why": why, "kernel": kernel, "int4": summary,
            "device": str(dev)}
    return model, tok, prov


def runtime_words(prov: dict) -> str:
    """One line (Markdown) saying which runtime and kernels a `load_for_eval` model runs on."""
    s = prov.get("int4")
    if prov.get("runtime") != "int4" or not s:
        return f"**Runtime: dense** ({prov.get('why', '')}): every linear a dense weight, on {prov.get('device')}."
    mb = 1024 ** 2
    kernels = ", ".join(f"{s[k]} on {k}" for k in ("gemlite", "torch", "dequant") if s[k])
    prefill = (f"; above {', '.join(map(str, s['prefill_rows']))} rows {s['prefill_dequant']} of them dequantize "
               "once per call and run F.linear" if s["prefill_dequant"] else "")
    return (f"**Runtime: INT4** ({prov.get('why', '')}; kernel asked: {prov.get('kernel')}) on {prov.get('device')}: "
            f"{s['int4_linears']} linears as Int4Linear ({kernels or 'none'}; 'torch' is torch's int4 kernel, "
            f"'dequant' dequantizes at every call){prefill}; they hold {s['int4_bytes'] / mb:.2f} MiB against "
            f"{s['dense_equivalent_bytes'] / mb:.2f} MiB as dense weights; {s['dense_linears']} linear(s) stay dense "
            "(an FP lm_head, a plan's 8-bit linears).")
