"""Causal depthwise short convolution (GDN's kernel-4 conv on q, k, v) with carried state and varlen.

x [B, T, C], weight [C, W] (tap W-1 multiplies the current token), conv_state [B, C, W-1] holding
the last W-1 inputs of the previous call (zeros at the start of a sequence). With ``cu_seqlens``
(B == 1) taps never reach across a sequence boundary: the conv restarts from zeros at every
sequence start, so nothing leaks between packed samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlt.kernels.backends import RECURRENT_MAX_T, resolve_backend


def short_conv(x, weight, bias=None, *, activation: str | None = "silu", conv_state=None,
               output_final_state: bool = False, cu_seqlens=None, backend: str = "auto"):
    """Returns ``(y [B, T, C], new_conv_state [B or N, C, W-1] or None)``."""
    B, T, C = x.shape
    W = weight.shape[-1]
    backend = resolve_backend("short_conv", backend, x.device)
    if activation not in ("silu", None):
        raise ValueError(f"short_conv activation {activation!r}; allowed: 'silu', None")
    if backend == "fla" and not (T <= RECURRENT_MAX_T and cu_seqlens is None and torch.compiler.is_compiling()):
        return _fla(x, weight, bias, activation, conv_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:
        # Gather-based: each output sums W shifted copies, a tap masked out where it would read a
        # position before its own sequence's start (or from the carried state of that sequence).
        starts = cu_seqlens[:-1]
        seq_id = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=x.device), right=True)
        pos = torch.arange(T, device=x.device) - starts[seq_id]
        y = x * weight[:, W - 1]
        for j in range(1, W):
            shifted = F.pad(x, (0, 0, j, 0))[:, :T]
            y = y + shifted * (pos >= j)[None, :, None] * weight[:, W - 1 - j]
            if conv_state is not None:  # taps that fall into this sequence's carried state
                from_state = conv_state[seq_id, :, (W - 1 - j + pos).clamp(min=0, max=W - 2)]
                y = y + (from_state * (pos < j)[:, None])[None] * weight[:, W - 1 - j]
        new_state = None
        if output_final_state:
            bounds = zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
            new_state = torch.stack([_last_inputs(x[0, s:e].T, None if conv_state is None else conv_state[i], W)
                                     for i, (s, e) in enumerate(bounds)])
    else:
        xt = x.transpose(1, 2)                                           # [B, C, T]
        prev = xt.new_zeros(B, C, W - 1) if conv_state is None else conv_state.to(xt.dtype)
        full = torch.cat([prev, xt], dim=-1)                             # [B, C, W-1+T]
        if T <= RECURRENT_MAX_T:  # decode: W shifted multiply-adds (at least fp32), elementwise: Inductor fuses them
            acc = torch.promote_types(xt.dtype, torch.float32)
            w = weight.to(acc)
            y = sum(full[:, :, j:j + T].to(acc) * w[:, j, None] for j in range(W)).to(xt.dtype).transpose(1, 2)
        else:
            y = F.conv1d(full, weight.to(xt.dtype).unsqueeze(1), groups=C).transpose(1, 2)
        new_state = full[:, :, -(W - 1):].clone() if output_final_state else None
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    return y, new_state


@torch.compiler.disable  # fla's Triton launcher is not traceable; under compile it runs between graphs
def _fla(x, weight, bias, activation, conv_state, output_final_state, cu_seqlens):
    from fla.modules.causal_conv1d.ops import causal_conv1d
    # fla's states hold the last W inputs ([N, C, W]), ours the last W-1: the oldest one is never
    # read by a width-W conv, so a zero column in front converts ours and dropping it converts back.
    h0 = None if conv_state is None else F.pad(conv_state.to(x.dtype), (1, 0)).contiguous()
    y, hT = causal_conv1d(x, weight=weight, bias=bias, activation=activation, initial_state=h0,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return y, (hT[..., 1:].contiguous() if output_final_state else None)


def _last_inputs(xt, prev, W):
    """The last W-1 inputs of one sequence ([C, T]), reaching into ``prev`` when T < W-1."""
    prev = xt.new_zeros(xt.shape[0], W - 1) if prev is None else prev.to(xt.dtype)
    return torch.cat([prev, xt], dim=-1)[:, -(W - 1):]
