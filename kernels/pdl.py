"""Programmatic dependent launch (PDL) for vlt's decode kernels, on Hopper and later.

A batch-1 decode step is a chain of ~300 short kernels, and each one spends a microsecond or two
starting up (launch, first loads in flight) and draining (its last wave). With PDL a kernel may be
started while the one before it is still running: it loads what no earlier kernel writes (weights,
its own recurrent state) and then waits at ``griddepcontrol.wait`` until its predecessor has finished
and its writes are visible. Those microseconds overlap instead of adding up.

The kernels here keep one invariant, which is what makes their early loads safe: every program
waits (``gdc_wait``) before it lets the next kernel start (``gdc_launch_dependents``). So when a PDL
kernel starts, every kernel before its immediate predecessor has completed, and only that predecessor
may still be running. Early loads may therefore read anything except what the predecessor writes,
and nothing is stored before the wait (the predecessor may still read a buffer that the allocator
hands to this kernel's output).

``enabled(t)`` says whether to launch with PDL for a tensor's device: CUDA with compute capability
9.0+, a Triton that has the GDC intrinsics, not under Triton's interpreter, and not switched off
(``VLT_PDL=0`` in the environment, or inside ``disabled()``, which the benchmarks use to time the
same graph without it).
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one older than the GDC intrinsics
    gdc_wait = gdc_launch_dependents = None

_off = os.environ.get("VLT_PDL", "1") == "0"


def enabled(t: torch.Tensor) -> bool:
    return (not _off and gdc_wait is not None and t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(t.device)[0] >= 9)


@contextlib.contextmanager
def disabled(off: bool = True):
    """Kernels launched (or captured into a CUDA graph) inside run without PDL when ``off``."""
    global _off
    before, _off = _off, _off or off
    try:
        yield
    finally:
        _off = before
