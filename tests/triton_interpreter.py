"""Run a snippet under Triton's interpreter (the CPU tests of vlt's Triton kernels).

``TRITON_INTERPRET=1`` must be set before a kernel module is imported (Triton decides at
``@triton.jit`` time), so each snippet runs in a fresh Python process; returns its stdout."""
import os
import subprocess
import sys
import textwrap


def interpret(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
