"""Shared numerical checks of the tests: relative errors, the GPU tests' recorded error check, and
mixers with non-trivial parameters."""
import os

import torch


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(name, outs, refs, tol):
    """outs/refs: dicts of tensors; records (``VLT_GPU_ERRLOG``) and asserts every relative error."""
    errs = {k: rel_err(outs[k], refs[k]) for k in refs}
    if os.environ.get("VLT_GPU_ERRLOG"):
        with open(os.environ["VLT_GPU_ERRLOG"], "a") as f:
            f.write(f"{name}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()) + f" (tol {tol:.0e})\n")
    bad = {k: v for k, v in errs.items() if not v < tol}  # NaN fails too
    assert not bad, f"{name}: errors over {tol}: {bad}"


@torch.no_grad()
def perturb_fla_init(m):
    """Non-trivial gates so decay and beta both matter; fla leaves some parameters at zero (RWKV-7's
    o_proj, LoRA down-projections), which would make outputs and gradients trivially zero."""
    for gate in ("b_proj", "w_proj", "gk_proj.1"):
        if hasattr(m, gate.split(".")[0]):
            m.get_submodule(gate).weight.normal_(std=0.5)
    for p in m.parameters():
        if not p.any():
            p.normal_(std=0.1)
    return m
