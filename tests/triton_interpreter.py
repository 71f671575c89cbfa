"""Run a snippet under Triton's interpreter (the CPU tests of vlt's Triton kernels).

``TRITON_INTERPRET=1`` must be set before a kernel module is imported (Triton decides at
``@triton.jit`` time), so each snippet runs in a fresh Python process; returns its stdout."""
import os
import subprocess
import sys
import textwrap


# What the engine snippets start from: a tiny VLM on the CPU (SWA window 16, GDN, full attention),
# prompts of two lengths (one wraps the window), and the eager reference decode for a prompt.
TINY_ENGINE = """
    import torch
    from vlt.config import VLMConfig
    from vlt.inference import InferenceEngine
    from vlt.model import VLM
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder={
        "layout": "[swa, gdn, gdn, full]", "mixers": {"swa": {"window": 16, "qkv_bias": True}}})).eval()
    prompts = [torch.randint(0, 200, (25,)), torch.randint(0, 200, (10,))]
    rel_err = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())

    @torch.no_grad()
    def eager_logits(ids, tokens):
        out = model(ids[None], use_cache=True)
        got = []
        for t in tokens:
            out = model(torch.tensor([[t]]), state=out.state, use_cache=True)
            got.append(out.logits[0, -1])
        return got
"""


def interpret(code: str, prelude: str = "") -> str:
    """Run ``prelude`` then ``code`` (each dedented on its own) in a fresh interpreter process."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    source = textwrap.dedent(prelude) + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
