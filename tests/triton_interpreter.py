"""Run a snippet under Triton's interpreter (the CPU tests of vlt's Triton kernels).

``TRITON_INTERPRET=1`` must be set before a kernel module is imported (Triton decides at
``@triton.jit`` time), so each snippet runs in a fresh Python process; returns its stdout."""
import os
import subprocess
import sys
import textwrap


# What the static-stepper snippets start from: the tiny hybrid on the CPU (SWA window 32 + GDN).
TINY_HYBRID = """
    import argparse
    import copy
    import torch
    from vlt.bench.common import add_common_args, build_model, setup
    from vlt.bench.static import StaticStepper, eager_step, frame_positions, pack_projections, rel_err
    a = add_common_args(argparse.ArgumentParser()).parse_args(["--tiny", "--device", "cpu"])
    dev, dt = setup(a)
    torch.manual_seed(0)
    model = build_model("hybrid", a, dev, dt).eval()
"""


def interpret(code: str, prelude: str = "") -> str:
    """Run ``prelude`` then ``code`` (each dedented on its own) in a fresh interpreter process."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    source = textwrap.dedent(prelude) + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
