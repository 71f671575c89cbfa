"""Backend discovery and selection, shared by every kernel entry point.

A backend is a string. ``"auto"`` picks the fastest one available for the op on the tensor's
device; an explicit name that cannot run here raises ``ValueError`` naming the op, the backend,
the reason and the backends that can run. The choice is logged once per (op, backend, device).
"""
from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger("vlt.kernels")

# "A few tokens" for every kernel entry point: a call with at most this many tokens is a decode step
# (one token, or a few draft tokens) and takes the recurrent / elementwise path - fla's fused
# recurrent kernels, the token-by-token recurrence or the conv's shifted multiply-adds, also inside
# torch.compile - instead of padding a whole chunk.
RECURRENT_MAX_T = 8

# Per op: backends in order of preference on CUDA. "torch" runs everywhere and is the reference.
PREFERENCE = {
    "gated_delta": ["fla", "torch"],
    "linear_attn": ["fla", "torch"],
    "attention": ["sdpa", "flex", "fla", "flash_attn", "torch"],  # the SWA kernels can be forced
    "swa": ["flex", "fla", "flash_attn", "torch"],
    "varlen_attention": ["flex", "fla", "flash_attn", "torch"],
    "short_conv": ["fla", "torch"],
    "norm": ["fla", "torch"],
}


# Looked up once at import (find_spec does not import): a plain dict read is also traceable by
# torch.compile, which the inference engine's small ops go through.
_INSTALLED = {name: importlib.util.find_spec(name) is not None for name in ("fla", "flash_attn")}


def _has_module(name: str) -> bool:
    return _INSTALLED[name]


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else why not."""
    if backend == "torch":
        return None
    if device.type != "cuda":
        return f"it needs a CUDA device (tensors are on {device.type})"
    if backend in ("fla",) and not _has_module("fla"):
        return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    if backend == "flash_attn" and not _has_module("flash_attn"):
        return "flash-attn is not installed (build it from source: pip install flash-attn --no-build-isolation)"
    if backend == "flex" and not hasattr(torch.nn.attention, "flex_attention"):
        return f"torch {torch.__version__} has no FlexAttention"
    return None


def available_backends(op: str, device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in PREFERENCE[op] if _unavailable_reason(b, device) is None]


_logged: set[tuple[str, str, str]] = set()


def resolve_backend(op: str, backend: str, device: torch.device | str) -> str:
    """Turn ``backend`` (a name or ``"auto"``) into a backend that runs ``op`` on ``device``."""
    device = torch.device(device)
    if op not in PREFERENCE:
        raise ValueError(f"unknown kernel op {op!r}; known: {sorted(PREFERENCE)}")
    allowed = PREFERENCE[op]
    if backend == "auto":
        chosen = available_backends(op, device)[0]
    elif backend not in allowed:
        raise ValueError(f"backend {backend!r} does not implement {op!r}; allowed: {['auto', *allowed]}")
    else:
        reason = _unavailable_reason(backend, device)
        if reason is not None:
            raise ValueError(
                f"backend {backend!r} for {op!r} cannot run here: {reason}. "
                f"Available here: {available_backends(op, device)} (or 'auto')")
        chosen = backend
    key = (op, chosen, device.type)
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        log.info("vlt.kernels: %s uses backend %r on %s", op, chosen, device.type)
        if chosen == "fla":  # before fla's first launch: its autotune picks from vlt's table for this GPU
            from vlt.kernels.fla_tables import use_shipped_tables
            use_shipped_tables(device)
    return chosen
