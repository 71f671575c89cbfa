"""Decode a tiny model through the inference engine on CUDA for each (dtype, batch, graphs, fused,
pdl) combination, each in its own process with a time limit, so a hang or a crash names its case.
    python3 tools/gpu_engine_matrix.py            (on a GPU machine, vlt importable)"""
import subprocess
import sys

CASE = """
import torch
from vlt.config import VLMConfig
from vlt.inference import InferenceEngine
from vlt.model import VLM
dt, B, graphs, fused, pdl = {dt}, {B}, {graphs}, {fused}, {pdl}
torch.manual_seed(0)
with torch.device("cuda"):
    m = VLM(VLMConfig.from_name("tiny-hybrid", decoder={{"layout": "[swa, gdn, gdn, full]", "mrope_section": [4, 6, 6],
        "head_dim": 32, "mixers": {{"swa": {{"window": 16, "qkv_bias": True}}}}}})).to(dt).eval()
eng = InferenceEngine(m, batch_size=B, capacity=64, graphs=graphs, fused=fused, pdl=pdl, compile=None)
for b in range(B):
    eng.prefill(torch.randint(0, 250, (7 + 9 * b,), device="cuda"), row=b)
for _ in range(12):
    out = eng.decode(torch.randint(0, 250, (B,), device="cuda"))
torch.cuda.synchronize()
print("ok", float(out.float().abs().mean()))
"""

for dt, B, graphs, fused, pdl in [("torch.float32", 1, True, True, True), ("torch.float32", 3, True, True, True),
                                  ("torch.bfloat16", 3, True, True, True), ("torch.float32", 3, False, True, True),
                                  ("torch.float32", 3, True, True, False), ("torch.float32", 3, True, False, True),
                                  ("torch.float32", 2, False, True, False)]:
    try:
        r = subprocess.run([sys.executable, "-c", CASE.format(dt=dt, B=B, graphs=graphs, fused=fused, pdl=pdl)],
                           capture_output=True, text=True, timeout=40)
        res = r.stdout.strip()[-80:] or ("rc=%d " % r.returncode + r.stderr.strip()[-300:])
    except subprocess.TimeoutExpired:
        res = "HANG (40 s)"
    print(f"dtype={dt} B={B} graphs={graphs} fused={fused} pdl={pdl}: {res}", flush=True)
