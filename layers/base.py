"""The one contract every token mixer keeps.

Legend for shapes: B batch, T tokens in this call, D model width, N packed sequences.

``forward(x_BTD, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False)``
returns ``(y_BTD, new_state)``:
- parallel / chunked over T for training and prefill; the same call with T == 1 and a state is the
  recurrent decode step (``step`` is a readable alias);
- ``state`` is what the previous call returned (None: start of sequence); ``new_state`` is None
  unless ``use_cache``;
- ``cu_seqlens`` (int tensor [N+1], B == 1) marks packed sequences: nothing crosses a boundary;
- ``position_ids`` [B, T] (or [3, B, T] for M-RoPE) only matter to mixers with positions.

``state_spec(batch_size, capacity, dtype)`` declares the decode state's tensors: the same nested
dict / tuple / list as the state ``forward`` returns, with a ``TensorSpec`` (shape, dtype) for each
tensor, as held after ``capacity`` tokens (the integer ``seen`` is left out). One declaration serves
``state_size`` (bytes after ``seq_len`` tokens, checked against ``state_nbytes`` of a real state),
the inference engine's preallocated in-place cache (``vlt.inference``) and the benchmarks' byte
counts. A mixer without a declaration still trains and decodes eagerly; the engine asks for one.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class TensorSpec(NamedTuple):
    """One tensor of a declared decode state."""
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def spec_nbytes(spec) -> int:
    """Bytes of a (nested) state declaration."""
    if isinstance(spec, TensorSpec):
        return spec.nbytes
    if isinstance(spec, dict):
        return sum(spec_nbytes(v) for v in spec.values())
    if isinstance(spec, (list, tuple)):
        return sum(spec_nbytes(v) for v in spec)
    return 0


class TokenMixer(nn.Module):
    mixer_name: str = "?"
    #: True when the state grows with the sequence (full attention's KV cache).
    state_grows: bool = False

    @classmethod
    def validate_options(cls, where: str = "", **options) -> None:
        """Raise ValueError for bad option values; called before any allocation."""

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        raise NotImplementedError

    def step(self, x, state, position_ids=None):
        """Recurrent decode of x [B, 1, D] given the previous state."""
        return self.forward(x, state=state, position_ids=position_ids, use_cache=True)

    def state_spec(self, batch_size: int, capacity: int, dtype=torch.bfloat16):
        """The decode state's tensors after ``capacity`` tokens (see the module docstring)."""
        raise NotImplementedError(f"mixer {type(self).__qualname__} declares no decode state (state_spec); "
                                  "the inference engine needs it to preallocate its cache")

    def state_size(self, batch_size: int, seq_len: int, dtype=torch.bfloat16) -> int:
        return spec_nbytes(self.state_spec(batch_size, seq_len, dtype))


def state_nbytes(state) -> int:
    """Bytes held by tensors in a (nested) state."""
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def check_positive_int(value, key: str, where: str = "", allow_none: bool = False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}{key} must be a positive integer, got {value!r}")


def check_heads(hidden_size, num_heads, head_dim, num_kv_heads=None, where: str = ""):
    check_positive_int(hidden_size, "hidden_size", where)
    check_positive_int(num_heads, "num_heads", where)
    if head_dim is None and hidden_size % num_heads:
        raise ValueError(f"{where}num_heads={num_heads} does not divide hidden_size={hidden_size}; "
                         "choose num_heads dividing it or set head_dim")
    if num_kv_heads is not None:
        check_positive_int(num_kv_heads, "num_kv_heads", where)
        if num_heads % num_kv_heads:
            raise ValueError(f"{where}num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")


def seq_positions(T: int, cu_seqlens, start: int, device) -> torch.Tensor:
    """Positions [1, T]: start..start+T-1, or restarting at 0 at each packed boundary."""
    pos = torch.arange(start, start + T, device=device)
    if cu_seqlens is not None:
        seq = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=device), right=True)
        pos = pos - start - cu_seqlens[:-1][seq]
    return pos[None]


def pack_linears(*linears: nn.Linear) -> torch.Tensor:
    """Make the weights (and biases) of Linears that read the same input row blocks of one tensor
    (their own storage is dropped, no copy stays), so ``project`` runs them as one GEMM.

    For decode: a batch-1 step is a matrix-vector product per projection, and one GEMV over the
    stacked rows reads the same bytes at a better fraction of the memory bandwidth than several small
    ones (and launches one kernel). Parameters keep their names and shapes (state dicts, LoRA targets
    and freezing patterns are unchanged); the stacks are non-persistent buffers of the first Linear."""
    has_bias = {lin.bias is not None for lin in linears}
    if len(has_bias) != 1 or len({lin.in_features for lin in linears}) != 1:
        raise ValueError("pack_linears takes Linears with one input size, all with a bias or none")
    rows = [lin.out_features for lin in linears]
    for name in ("weight", "bias") if has_bias.pop() else ("weight",):
        stacked = torch.cat([getattr(lin, name).detach() for lin in linears])
        for lin, part in zip(linears, stacked.split(rows)):
            setattr(lin, name, nn.Parameter(part, requires_grad=getattr(lin, name).requires_grad))
        linears[0].register_buffer(f"packed_{name}", stacked, persistent=False)
    linears[0].packed_rows = rows
    return linears[0].packed_weight


def project(x: torch.Tensor, *linears: nn.Module, linear=None) -> tuple[torch.Tensor, ...]:
    """``tuple(lin(x) for lin in linears)``, as one GEMM when ``pack_linears`` stacked exactly these.
    ``linear(x, weight, bias)`` replaces ``F.linear`` (plain nn.Linear only; e.g. a fused decode kernel)."""
    stacked = getattr(linears[0], "packed_weight", None)
    if stacked is not None and len(linears[0].packed_rows) == len(linears):
        bias = getattr(linears[0], "packed_bias", None)
        return (linear or torch.nn.functional.linear)(x, stacked, bias).split(linears[0].packed_rows, dim=-1)
    if linear is not None:
        return tuple(linear(x, lin.weight, lin.bias) for lin in linears)
    return tuple(lin(x) for lin in linears)
