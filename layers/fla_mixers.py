"""flash-linear-attention (fla) layers as vlt mixers.

    layout: "[swa, kda, kda, kda] * 9"                     # a registered short name
    layout: [swa, {mixer: "fla:Comba", head_dim: 16}]       # any fla.layers class, options passed through

A mixer here *is* the fla layer (a subclass of both ``TokenMixer`` and the fla class), so parameter
names and state dicts are fla's own (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``b_proj``,
``g_proj`` ... wherever fla uses them; LoRA targets and freezing patterns match those names) and an
fla checkpoint of the layer loads as it is. Options are fla's ``__init__`` arguments; they are
checked before allocation by building the layer on the meta device, so fla's own consistency checks
come back as a ValueError naming the layer and the allowed options.

vlt's contract on top: ``forward(x [B, T, D], state=, cu_seqlens=, use_cache=) -> (y, state)`` with
the state in vlt's format (converted to and from fla's per-layer cache each call) and a
``state_spec``. Each fla layer is built with ``layer_idx=0``: vlt keeps one cache per layer, and
layers with a cross-layer input act as their own first layer, so no tensor flows between vlt
layers. For RWKV-7 that means its value residual is off: every ``rwkv7`` layer is built as RWKV-7's
layer 0 (``v_first`` = its own ``v``, no ``v_lora``), unlike an RWKV-7 model proper, where layers
1.. mix in layer 0's values; threading ``v_first`` from block to block would need the decoder and
the inference engine to carry it (not done).

Where it runs: fla's layers call Triton kernels, so on CUDA the mixer runs fla's forward. On CPU a
mixer runs only where layers/fla_cpu.py has a torch path built from fla's naive reference for the
op (``CPU_PATHS``: kda, deltanet, gdn2, gla, rwkv7) or vlt's own kernels (mamba2, which takes that path on
CUDA too: ``EVERY_DEVICE``); any other raises a ValueError naming the mixer and listing those that
do run.

Decode of the sparse-attention layers (nsa, moba) runs fla's forward on a key/value cache that
grows by the new tokens each call (``state_grows``; their ``state_spec`` gives it at a capacity, which
is how the inference engine holds it); MoBA's decode attends to every cached key densely (fla's
choice: its top-k block selection is for prefill). MoBA (prefill and decode) and NSA's sliding-window
branch (``window_size`` > 0, fla's default 512) run through flash-attn; without it a call is a
ValueError saying so (``FlaMixer.check_fla_can_run``, with DeltaNet's float32 limit).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F

from vlt.kernels.fla_tables import use_shipped_tables
from vlt.layers.base import TensorSpec, TokenMixer, check_positive_int

#: short name -> fla.layers class name. What each carries in vlt's state is in ``_SPECS``.
SHORT_NAMES = {
    "kda": "KimiDeltaAttention",
    "gdn2": "GatedDeltaNet2",
    "mamba2": "Mamba2",
    "deltanet": "DeltaNet",
    "gla": "GatedLinearAttention",
    "rwkv7": "RWKV7Attention",
    "nsa": "NativeSparseAttention",
    "moba": "MoBA",
}


@functools.lru_cache(maxsize=1)
def _fla_layers():
    # importing fla costs seconds (Triton autotune tables): only when an fla mixer is asked for
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Triton is not supported on current platform" on CPU hosts
        import fla.layers
    return fla.layers


def fla_mixer_names() -> list[str]:
    """The short names (``fla:ClassName`` takes any other fla.layers class)."""
    return sorted(SHORT_NAMES)


def cpu_mixers() -> list[str]:
    return sorted(CPU_PATHS)


# ---- fla's per-layer cache <-> vlt's state ---------------------------------------------------

class OneLayerCache:
    """The slice of fla's ``Cache`` a layer touches (``len``, ``[0]``, ``update``,
    ``get_seq_length``), holding one layer: vlt carries states per layer itself."""

    def __init__(self, layer_state=None, seen=0):
        self.state, self.seen = layer_state, seen

    def __len__(self):
        return 0 if self.state is None else 1

    def __getitem__(self, idx):
        return self.state

    def get_seq_length(self, layer_idx=0):
        return self.seen

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None, layer_idx=0,
               offset=1, cache_kwargs=None, **_):
        st = self.state = dict(self.state or {"recurrent_state": None, "attn_state": None,
                                              "conv_state": None, "ffn_state": None})
        for key, val in (("recurrent_state", recurrent_state), ("conv_state", conv_state), ("ffn_state", ffn_state)):
            if val is not None:
                st[key] = val
        if attn_state is not None:  # attention layers hand over the new keys/values only: append
            old = st["attn_state"]
            st["attn_state"] = tuple(attn_state) if old is None else tuple(
                torch.cat([o, n], 1) for o, n in zip(old, attn_state))
            window = (cache_kwargs or {}).get("window_size")
            if window is not None:
                st["attn_state"] = tuple(s[:, -window:] for s in st["attn_state"])
        # not +=: ``seen`` may be the engine's device counter, which an in-place add would advance
        self.seen = self.seen + (offset or 1)
        return st


def _conv_to_fla(c):
    # vlt keeps the W-1 inputs a causal conv still needs; fla's cache holds W (its update kernel never reads
    # the oldest column, it rolls it out). A fresh tensor each call: fla shifts it in place, and vlt's
    # earlier state must stay as it was
    return None if c is None else F.pad(c, (1, 0))


def _convs_to_fla(convs):
    """The q/k/v conv states of one layer (widths may differ: value heads can be wider) padded in one
    buffer: rows [sum of B * D_i, W], split into one contiguous [B, D_i, W] cache per conv. When ``convs``
    are still the views _conv_from_fla made of the previous step's buffer (a decode loop on the mixer's own
    states), that buffer is padded as it is: one kernel; otherwise concatenated first: two (a decode step
    is launch-bound, and each small copy cost ~3 us on an H200 against fla's 40-120 us layer step)."""
    rows = [c.shape[:-1].numel() for c in convs]
    base = convs[0]._base
    if _views_of_one_buffer(base, convs, rows):
        src = base[:, 1:]
    else:
        src = torch.cat([c.reshape(n, -1) for c, n in zip(convs, rows)])
    return tuple(b.view(*c.shape[:-1], -1) for b, c in zip(F.pad(src, (1, 0)).split(rows), convs))


def _views_of_one_buffer(base, convs, rows):
    if base is None or base.dim() != 2 or base.shape != (sum(rows), convs[0].shape[-1] + 1):
        return False
    return all(c._base is base and _same_view(c, b.view(*c.shape[:-1], -1)[..., 1:])
               for b, c in zip(base.split(rows), convs))


def _same_view(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _conv_from_fla(c):
    # a view, not a copy: fla updated ``c`` in place, but ``c`` is the fresh tensor _conv_to_fla /
    # _convs_to_fla padded for this call, so no earlier state shares it
    return None if c is None else c[..., 1:]


class FlaMixer(TokenMixer):
    """Base of every fla-backed mixer; concrete classes are made by ``mixer_class``."""
    fla_class: type = None
    kind: str = "generic"          # key into _SPECS / CPU_PATHS

    @classmethod
    def validate_options(cls, where="", **options):
        name = cls.mixer_name
        check_positive_int(options.get("hidden_size"), "hidden_size", where)
        # the registry hands every option, defaults filled in: keep only those the user set, so the
        # check builds exactly what __init__ will (head_dim derived from the width when unset)
        params = _fla_options(cls.fla_class)
        opts = _with_defaults(cls.fla_class, {k: v for k, v in options.items()
                                              if k in params and v is not params[k].default})
        if cls.kind == "nsa":   # fla checks this in its kernel only (an assert at the first forward)
            heads, kv = opts.get("num_heads"), opts.get("num_kv_heads")
            group = heads // kv if heads and kv and heads % kv == 0 else 0
            if group < 16 or group & (group - 1):
                raise ValueError(f"{where}mixer {name!r} (fla.layers.{cls.fla_class.__name__}): num_heads / "
                                 f"num_kv_heads = {heads} / {kv}, and fla's NSA kernels need the query heads per "
                                 f"key/value head to be a power of 2 and >= 16; e.g. num_heads: 16, num_kv_heads: 1 "
                                 f"or num_heads: 32, num_kv_heads: 2")
        try:
            with torch.device("meta"), _quiet(cls.kind):  # fla's own checks run in __init__; meta allocates nothing
                cls.fla_class(**opts)
        except (ValueError, AssertionError, TypeError, ZeroDivisionError) as e:
            raise ValueError(f"{where}mixer {name!r} (fla.layers.{cls.fla_class.__name__}) rejects its options: "
                             f"{e or type(e).__name__}; "
                             f"allowed options: {sorted(_fla_options(cls.fla_class))}") from None

    # ---- vlt's forward ----------------------------------------------------------------------
    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        if self.kind in EVERY_DEVICE:
            return CPU_PATHS[self.kind](self, x, state, cu_seqlens, use_cache)
        if x.device.type != "cuda":
            path = CPU_PATHS.get(self.kind)
            if path is None:
                raise ValueError(f"mixer {self.mixer_name!r} (fla.layers.{self.fla_class.__name__}) runs fla's "
                                 f"Triton kernels only, so it needs a CUDA device; mixers from fla that run on "
                                 f"CPU: {cpu_mixers()}")
            return path(self, x, state, cu_seqlens, use_cache)
        return self.fla_forward(x, state, cu_seqlens, use_cache)

    # fla's layers launch Triton kernels that Dynamo cannot trace (the engine compiles its generic
    # step on CUDA): run them between compiled graphs, as vlt.kernels does with its fla calls
    @torch.compiler.disable
    def fla_forward(self, x, state, cu_seqlens, use_cache):
        """fla's own forward, the state converted to fla's layer cache and back."""
        use_shipped_tables(x.device)  # once per process: fla's autotuners read vlt's table for this GPU
        seen = 0 if state is None else state["seen"]
        self.check_fla_can_run(x, state)
        cache = OneLayerCache(None if state is None else to_fla_cache(self, state), seen)
        out = self.fla_class.forward(self, x, past_key_values=cache if (use_cache or state is not None) else None,
                                     use_cache=use_cache, cu_seqlens=cu_seqlens)
        y = out[0]
        if not use_cache:
            return y, None
        new = _from_fla(self, cache.state)
        new["seen"] = seen + x.shape[1]
        return y, new

    def check_fla_can_run(self, x, state):
        """What fla's CUDA kernels refuse deep inside (an assert, or a None called), said up front with the fix.
        Found on an H200 (2026-12-01): MoBA's prefill and decode and NSA's sliding-window branch call
        flash-attn; DeltaNet's chunk kernel (fla picks it above 64 tokens) asserts on float32."""
        name = f"mixer {self.mixer_name!r} (fla.layers.{self.fla_class.__name__})"
        if self.kind == "moba" and not flash_attn_installed():
            what = "decodes (a call with a cached state) through flash_attn_func" if state is not None else \
                "runs its block attention (parallel_moba) through flash-attn"
            raise ValueError(f"{name} {what}, and flash-attn is not installed; install flash-attn "
                             "(pip install flash-attn), or use nsa / swa / full")
        if self.kind == "nsa" and (self.window_size or 0) > 0 and not flash_attn_installed():
            raise ValueError(f"{name} runs its sliding-window branch (window_size={self.window_size}) through "
                             "flash-attn, which is not installed; install flash-attn (pip install flash-attn), "
                             "or set the option window_size: 0 (compressed + selected blocks only)")
        if (self.kind == "deltanet" and x.shape[1] > 64 and x.dtype == torch.float32
                and not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"{name}: fla's chunk DeltaNet kernel (used above 64 tokens) refuses float32 inputs; "
                             "train in bf16 (--trainer.precision bf16-mixed or bf16-true), or pick a delta-rule "
                             "mixer that runs in float32 (gdn, gdn2, kda)")

    def state_spec(self, batch_size, capacity, dtype=torch.bfloat16):
        spec = _SPECS.get(self.kind)
        if spec is None:
            return super().state_spec(batch_size, capacity, dtype)
        return spec(self, batch_size, capacity, dtype)


@functools.lru_cache(maxsize=1)
def flash_attn_installed() -> bool:
    """flash-attn is optional (built from source where users have it); fla's MoBA and NSA's window need it."""
    return importlib.util.find_spec("flash_attn") is not None


def _fla_options(fla_cls) -> dict:
    params = inspect.signature(fla_cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _with_defaults(fla_cls, options):
    """vlt's conventions over fla's defaults: head_dim = hidden_size // num_heads (fla defaults to a
    fixed 64/128 whatever the width), and layer_idx 0 (see the module docstring)."""
    opts = {k: v for k, v in options.items() if v is not None}
    allowed = _fla_options(fla_cls)
    if fla_cls.__name__ == "Mamba2" and "hidden_size" in opts:
        # Mamba-2 splits its inner width (expand * hidden_size) into heads: the decoder's num_heads
        # sets head_dim, unless head_dim is given, which then sets the heads
        inner = int(opts.get("expand", allowed["expand"].default) * opts["hidden_size"])
        if "head_dim" in opts:
            opts.pop("num_heads", None)
        elif opts.get("num_heads"):
            opts["head_dim"] = inner // opts["num_heads"]
    if "head_dim" in allowed and "head_dim" not in opts and "num_heads" in opts and "hidden_size" in opts:
        opts["head_dim"] = opts["hidden_size"] // opts["num_heads"]
    if "layer_idx" in allowed:
        opts["layer_idx"] = 0
    if "num_hidden_layers" in allowed and opts.get("num_hidden_layers") is None:
        opts["num_hidden_layers"] = 2   # RWKV-7's init reads layer_idx / (num_hidden_layers - 1)
    return opts


def _init(self, **options):
    self.vlt_layer_idx = options.get("layer_idx")
    with _quiet(self.kind):
        self.fla_class.__init__(self, **_with_defaults(self.fla_class, options))


@contextlib.contextmanager
def _quiet(kind):
    """fla's Mamba2 warns at every construction about mamba_ssm / causal_conv1d / its Triton conv;
    vlt runs Mamba-2 on its own kernels (fla_cpu.mamba2_path) and uses none of them."""
    log = logging.getLogger("fla.layers.mamba2")
    level = log.level
    if kind == "mamba2":
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=None)
def mixer_class(name: str) -> type:
    """The vlt mixer class for a short name or ``fla:ClassName``, made (and registered) on first use."""
    from vlt.layers.registry import register_mixer
    fla = _fla_layers()
    cls_name = SHORT_NAMES.get(name) or (name[4:] if name.startswith("fla:") else None)
    fla_cls = getattr(fla, cls_name or "", None)
    if not (inspect.isclass(fla_cls) and issubclass(fla_cls, torch.nn.Module)):
        names = sorted(n for n in dir(fla)
                       if inspect.isclass(getattr(fla, n)) and issubclass(getattr(fla, n), torch.nn.Module))
        raise ValueError(f"unknown fla mixer {name!r}: fla.layers has no layer class {cls_name!r}; "
                         f"fla layer classes: {names}; short names: {sorted(SHORT_NAMES)}")
    kind = name if name in SHORT_NAMES else next((k for k, v in SHORT_NAMES.items() if v == cls_name), "generic")
    def init(self, **options):  # a fresh function per class: each carries its own fla signature
        _init(self, **options)
    init.__doc__ = fla_cls.__init__.__doc__
    init.__signature__ = inspect.signature(fla_cls.__init__)  # the registry validates against fla's options
    body = {"__init__": init, "fla_class": fla_cls, "kind": kind, "__module__": __name__,
            "state_grows": kind in ("nsa", "moba"),
            "__doc__": f"fla.layers.{fla_cls.__name__} as a vlt mixer ({name!r})."}
    if kind in _MIMIC:  # conversion from attention (vlt/convert/student.py) calls it before copying q/k/v/o
        body["mimic_init"] = _MIMIC[kind]
    cls = type(f"Fla{fla_cls.__name__}", (FlaMixer, fla_cls), body)
    return register_mixer(name)(cls)


# ---- state declarations and conversions, per kind ---------------------------------------------

def _delta_spec(self, B, capacity, dtype):
    """q/k/v short-conv inputs [B, C, W-1] and the recurrent state [B, HV, K, V] in fp32."""
    hv = getattr(self, "num_v_heads", self.num_heads)
    W = self.conv_size - 1
    spec = {"ssm": TensorSpec((B, hv, self.head_k_dim, self.head_v_dim), torch.float32)}
    if self.use_short_conv:
        # GLA's k/v convs run on the k/v heads before they are repeated to the query heads
        if self.kind == "gla":
            kc, vc = self.key_dim_per_group, self.value_dim_per_group
        else:
            kc, vc = self.key_dim, self.value_dim
        spec["conv"] = tuple(TensorSpec((B, c, W), dtype) for c in (self.key_dim, kc, vc))
    return spec


def _rwkv7_spec(self, B, capacity, dtype):
    """Token shift (the previous token's input [B, D]) and the recurrent state [B, H, K, V] in fp32."""
    return {"shift": TensorSpec((B, self.hidden_size), dtype),
            "ssm": TensorSpec((B, self.num_heads, self.head_dim, self.head_v_dim), torch.float32)}


def _mamba2_spec(self, B, capacity, dtype):
    conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
    return {"conv": TensorSpec((B, conv_dim, self.conv_kernel_size - 1), dtype),
            "ssm": TensorSpec((B, self.num_heads, self.head_dim, self.ssm_state_size), torch.float32)}


def _kv_spec(self, B, capacity, dtype):
    width = self.num_kv_heads * self.head_dim
    return {"k": TensorSpec((B, capacity, width), dtype), "v": TensorSpec((B, capacity, width), dtype)}


_SPECS = {"kda": _delta_spec, "gdn2": _delta_spec, "deltanet": _delta_spec, "gla": _delta_spec,
          "mamba2": _mamba2_spec, "rwkv7": _rwkv7_spec, "nsa": _kv_spec, "moba": _kv_spec}
# fla's KDA and GLA layers keep their recurrent state [B, HV, V, K] (state_v_first=True); vlt's is
# [B, HV, K, V] like every other delta/linear mixer, so CPU and CUDA states are interchangeable.
_V_FIRST = {"kda", "gla"}


def to_fla_cache(self, state):
    k = self.kind
    if k in ("kda", "gdn2", "deltanet", "gla"):
        ssm = state["ssm"].transpose(-1, -2) if k in _V_FIRST else state["ssm"]
        conv = _convs_to_fla(state["conv"]) if "conv" in state else None
        return {"recurrent_state": ssm, "conv_state": conv, "attn_state": None, "ffn_state": None}
    if k == "mamba2":
        return {"recurrent_state": state["ssm"], "conv_state": _conv_to_fla(state["conv"]),
                "attn_state": None, "ffn_state": None}
    if k == "rwkv7":
        return {"recurrent_state": state["ssm"], "conv_state": state["shift"], "attn_state": None, "ffn_state": None}
    if k in ("nsa", "moba"):
        return {"recurrent_state": None, "conv_state": None, "attn_state": (state["k"], state["v"]), "ffn_state": None}
    return {key: v for key, v in state.items() if key != "seen"}   # generic: fla's own layer dict


def _from_fla(self, st):
    k = self.kind
    if k in ("kda", "gdn2", "deltanet", "gla"):
        ssm = st["recurrent_state"]
        # KDA / GLA: a transposed view of fla's [.., V, K] state (vlt's [.., K, V] by its strides), so the
        # next step's to_fla_cache transposes it back to the tensor fla wrote, without a copy either way
        out = {"ssm": (ssm.transpose(-1, -2) if k in _V_FIRST else ssm).float()}
        if st.get("conv_state") is not None:
            out["conv"] = tuple(_conv_from_fla(c) for c in st["conv_state"])
        return out
    if k == "mamba2":
        return {"conv": _conv_from_fla(st["conv_state"]), "ssm": st["recurrent_state"].float()}
    if k == "rwkv7":
        return {"shift": st["conv_state"], "ssm": st["recurrent_state"].float()}
    if k in ("nsa", "moba"):
        return {"k": st["attn_state"][0], "v": st["attn_state"][1]}
    return dict(st)


# ---- conversion from attention: InfiniteVL's mimic init ------------------------------------------

def _inv_softplus(y: float) -> float:
    t = torch.tensor(y)
    return float(t + torch.log(-torch.expm1(-t)))


def _identity_convs(m):
    if getattr(m, "use_short_conv", False):
        for conv in (m.q_conv1d, m.k_conv1d, m.v_conv1d):
            conv.weight.zero_()
            conv.weight[:, 0, -1] = 1.0   # the current token's tap: the conv passes its input through
            if conv.bias is not None:
                conv.bias.zero_()


@torch.no_grad()
def _mimic_gated_delta(self):
    """As vlt's GDN (layers/gdn.py): write/erase gates 0.5 (their projections zero), decay ~0.999
    (A_log 0, the gate projection's last layer zero, dt_bias = softplus^-1(1e-3)), identity convs."""
    self.b_proj.weight.zero_()
    if hasattr(self, "w_proj"):        # GDN-2's channel-wise write gate
        self.w_proj.weight.zero_()
    self.f_proj[-1].weight.zero_()
    self.A_log.zero_()
    self.dt_bias.fill_(_inv_softplus(1e-3))
    _identity_convs(self)


@torch.no_grad()
def _mimic_deltanet(self):
    if self.use_beta:
        self.b_proj.weight.zero_()
    _identity_convs(self)


_MIMIC = {"kda": _mimic_gated_delta, "gdn2": _mimic_gated_delta, "deltanet": _mimic_deltanet}


# ---- CPU paths (fla's naive references) -------------------------------------------------------

from vlt.layers.fla_cpu import CPU_PATHS, EVERY_DEVICE  # noqa: E402  (the torch paths read the classes above)
