"""Time vlt's decode kernels at InfiniteVL-4B shapes on the GPU, to pick their defaults.

- the fused GDN step (vlt.kernels.gdn_decode) per (block_v, num_warps), 27 layers' distinct states in
  one CUDA graph (so the states come from HBM, not L2), us per layer;
- the batch-1 GEMV (vlt.kernels.gemv, autotuned) against F.linear (cuBLAS) per projection shape, 36
  distinct weights per graph, us per call and the bandwidth it reaches.

    python tools/tune_decode_kernels.py OUT.json
"""
import json
import sys

import torch
import torch.nn.functional as F

from vlt.kernels.gdn_decode import gdn_decode_step
from vlt.bench.common import machine_ceilings
from vlt.kernels import gemv as gemv_mod

DEV, DT = "cuda", torch.bfloat16


def graph_us(fn, calls, reps=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / calls


def gdn_rows(layers=27, B=1, H=16, K=128, V=256, W=4):
    Ck, Cv = H * K, H * V
    sets = []
    for _ in range(layers):
        ins = torch.randn(B, 2 * Ck + 2 * Cv + 2 * H, device=DEV, dtype=DT).split([Ck, Ck, Cv, Cv, H, H], -1)
        ws = [torch.randn(c, W, device=DEV, dtype=DT) for c in (Ck, Ck, Cv)]
        convs = [torch.randn(B, c, W - 1, device=DEV, dtype=DT) for c in (Ck, Ck, Cv)]
        sets.append((ins, ws, convs, torch.zeros(H, device=DEV), torch.zeros(H, device=DEV),
                     torch.randn(B, H, K, V, device=DEV) * 0.01, torch.ones(V, device=DEV, dtype=DT)))
    rows = []
    for bv in (8, 16, 32):
        for nw in (2, 4, 8):
            def run():
                for ins, ws, convs, A, dtb, ssm, nw_ in sets:
                    gdn_decode_step(*ins, ws, convs, A, dtb, ssm, nw_, 1e-6, block_v=bv, num_warps=nw)
            rows.append(dict(block_v=bv, num_warps=nw, us_per_layer=round(graph_us(run, layers), 2)))
            print("GDN", rows[-1], flush=True)
    return rows


def gemv_rows(copies=36):
    rows = []
    for name, N, K in (("mlp gate_up", 22016, 2048), ("mlp down", 2048, 11008), ("gdn q/k/v/g/a/b", 12320, 2048),
                       ("gdn o_proj", 2048, 4096), ("swa q/k/v", 2560, 2048), ("swa o_proj", 2048, 2048)):
        ws = [torch.randn(N, K, device=DEV, dtype=DT) * K ** -0.5 for _ in range(copies)]
        x = torch.randn(1, K, device=DEV, dtype=DT)
        row = dict(proj=name, N=N, K=K)
        for impl, fn in (("cublas", lambda: [F.linear(x, w) for w in ws]),
                         ("gemv", lambda: [gemv_mod.linear(x, w) for w in ws])):
            us = graph_us(fn, copies)
            row[f"{impl}_us"] = round(us, 2)
            row[f"{impl}_tb_s"] = round(N * K * 2 / us / 1e6, 3)
        row["gemv_over_cublas"] = round(row["gemv_us"] / row["cublas_us"], 3)
        row["gemv_config"] = next((str(c) for k, c in gemv_mod._gemv_tuned.cache.items() if k[:2] == (N, K)), None)
        print("GEMV", row, flush=True)
        rows.append(row)
        del ws
    return rows


if __name__ == "__main__":
    rep = dict(machine=torch.cuda.get_device_name(), torch=torch.__version__, ceilings=machine_ceilings(DEV),
               gdn_decode=gdn_rows(), gemv=gemv_rows())
    json.dump(rep, open(sys.argv[1], "w"), indent=1)
