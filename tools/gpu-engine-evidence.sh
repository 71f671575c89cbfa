#!/usr/bin/env bash
# Issue 20 GPU evidence: the inference engine as users run it, on one H200. From the repo root:
#   bash .whl/install.sh && export PYTHONPATH=/tmp/site; source tools/devpath.sh; bash tools/gpu-engine-evidence.sh PART...
# Parts (run in order; each writes to $OUT as it goes, so a call stopped at its limit keeps what ran):
#   tests     the engine's and kernels' GPU tests
#   infer     vlt bench infer (hybrid, full): prefill, decode vs context, batched decode, end-to-end generate
#   stream    vlt bench stream (hybrid): VideoStream.add_frame per frame, $FRAMES frames
#   streamfp32  engine vs eager logits after 3 frames in fp32 (separates bf16 rounding from a bug)
#   generate  a random InfiniteVL-4B-shaped export with the Qwen2.5-VL tower, then the whole `vlt generate`
#             command (4K-token prompt + one 448x448 image, 256 new tokens) twice: a fresh process with cold
#             caches, then again with the caches the first left
set -uo pipefail
export PYTHONUNBUFFERED=1
repo=$(pwd)
OUT=${OUT:-/tmp/engine_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
work=/tmp/enginework; mkdir -p "$work"; cd "$work"   # outside the checkout: see tools/devpath.sh
python3 -c "import sys, torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__,
'bytecode cache', sys.pycache_prefix, 'written' if not sys.dont_write_bytecode else 'not written')" | tee -a "$OUT/machine.txt"
export TRITON_CACHE_AUTOTUNING=1
# each process that exits normally merges its fla autotune picks into $OUT/fla_configs (fla's format): commit them
# as kernels/fla_configs/<GPU>/ and a fresh machine skips those timings (vlt.kernels.fla_tables)
export VLT_DUMP_FLA_CONFIGS=${VLT_DUMP_FLA_CONFIGS:-$OUT/fla_configs}
for part in "$@"; do
  echo "=== $part $(date +%T)"
  case $part in
    tests)
      timeout -k 10 ${T_TESTS:-240} python3 -m pytest "$repo/tests/test_inference_gpu.py" "$repo/tests/test_kernels_gpu.py" \
        -m gpu -rA -p no:cacheprovider -q --durations=0 -o faulthandler_timeout=${T_HANG:-90} ${TEST_ARGS:-} \
        > "$OUT/gpu_tests_engine.log" 2>&1
      echo "tests rc=$?"; grep -E "passed|failed|Timeout|File .*vlt" "$OUT/gpu_tests_engine.log" | head -30;;
    infer)
      timeout -k 10 ${T_INFER:-420} python3 -m vlt.bench.infer --layouts hybrid full --out "$work" ${INFER_ARGS:-} \
        > "$OUT/infer.log" 2>&1
      echo "infer rc=$?"; grep -A40 "SUMMARY" "$OUT/infer.log" | head -60
      cp "$work/infer.json" "$OUT/infer_h200.json" 2>/dev/null; cp "$work/infer.png" "$OUT/infer_h200.png" 2>/dev/null;;
    stream)
      timeout -k 10 ${T_STREAM:-240} python3 -m vlt.bench.stream --layouts hybrid --frames ${FRAMES:-1000} --out "$work" ${STREAM_ARGS:-} \
        > "$OUT/stream.log" 2>&1
      echo "stream rc=$?"; grep -A12 "SUMMARY" "$OUT/stream.log"
      cp "$work/stream.json" "$OUT/stream_h200.json" 2>/dev/null; cp "$work/stream.png" "$OUT/stream_h200.png" 2>/dev/null
      cp "$work"/profile_stream_*.txt "$OUT/" 2>/dev/null;;
    streamfp32)
      timeout -k 10 ${T_STREAM:-240} python3 -m vlt.bench.stream --layouts hybrid --dtype float32 --frames 3 \
        --eager-frames 3 --check-frames 3 --out "$work/fp32" > "$OUT/stream_fp32.log" 2>&1
      echo "streamfp32 rc=$?"; grep -A6 "SUMMARY" "$OUT/stream_fp32.log";;
    generate)
      python3 - <<'PY' > "$OUT/generate.log" 2>&1
import argparse, dataclasses, torch
from PIL import Image
import numpy as np
from vlt.bench.common import add_common_args, model_config, setup
from vlt.checkpoint.export import save_pretrained_vlt
from vlt.model import build_vlm
a = add_common_args(argparse.ArgumentParser()).parse_args(["--device", "cuda"])
dev, dt = setup(a)
# the byte tokenizer's vision ids (the export's tokenizer), InfiniteVL-4B shapes otherwise
cfg = dataclasses.replace(model_config("hybrid", a, vision=True), image_token_id=261, video_token_id=262,
                          vision_start_token_id=259)
m = build_vlm(cfg, dev, dt)
save_pretrained_vlt(m, "/tmp/export4b", tokenizer_dir="byte", prompt={"system": "", "max_pixels": 448 * 448, "min_pixels": 448 * 448})
Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8)).save("/tmp/frame.png")
print("export written")
PY
      prompt=$(python3 -c "print('describe the picture in detail ' * 130)")   # ~4K byte tokens
      for run in cold warm; do
        /usr/bin/time -f "$run wall %e s, max RSS %M KB" python3 -m vlt.cli generate --ckpt /tmp/export4b --image /tmp/frame.png \
          --prompt "$prompt" --max-new-tokens 256 > "$OUT/generate_$run.out" 2>> "$OUT/generate.log"
        echo "$run rc=$?"
      done
      # GENERATE_EXTRAS=0: only the export and the cold and warm commands
      if [ "${GENERATE_EXTRAS:-1}" = 0 ]; then grep -E "wall|vlt generate" "$OUT/generate.log"; continue; fi
      # where a warm command's time goes: imports alone, then the whole command under cProfile (top by cumulative time)
      /usr/bin/time -f "imports wall %e s" python3 -c "import torch, vlt.cli, vlt.generate_cli, vlt.inference, vlt.checkpoint.export, vlt.model" 2>> "$OUT/generate.log"
      python3 -m cProfile -o "$work/generate.prof" -m vlt.cli generate --ckpt /tmp/export4b --image /tmp/frame.png \
        --prompt "$prompt" --max-new-tokens 256 > /dev/null 2>> "$OUT/generate.log"
      python3 -c "import pstats, sys; s = pstats.Stats('$work/generate.prof', stream=sys.stdout).sort_stats('cumulative'); s.print_stats(70); s.print_stats('vltpkg/vlt', 60)" \
        > "$OUT/generate_profile.txt" 2>&1
      # the exit after the work (wall minus "done"): Inductor's compile-worker pool is one suspect; a warm
      # command with one compile thread (no pool) separates it
      TORCHINDUCTOR_COMPILE_THREADS=1 /usr/bin/time -f "warm, one compile thread: wall %e s" python3 -m vlt.cli generate \
        --ckpt /tmp/export4b --image /tmp/frame.png --prompt "$prompt" --max-new-tokens 256 > /dev/null 2>> "$OUT/generate.log"
      # without torch.compile of the small ops between the kernels: less set-up, a slower step (by how much?)
      /usr/bin/time -f "warm, compile=none: wall %e s" python3 -m vlt.cli generate --ckpt /tmp/export4b \
        --image /tmp/frame.png --prompt "$prompt" --max-new-tokens 256 --engine-option compile=none > /dev/null 2>> "$OUT/generate.log"
      # and a warm command whose exit dumps every thread's Python stack each 2 s: what the exit waits on
      /usr/bin/time -f "warm, exit traced: wall %e s" python3 -c "
import faulthandler, sys
from vlt.cli import main
rc = main(sys.argv[1:])
faulthandler.dump_traceback_later(2, repeat=True, file=open('$OUT/generate_exit_stacks.txt', 'w'))
sys.exit(rc)" generate --ckpt /tmp/export4b --image /tmp/frame.png --prompt "$prompt" --max-new-tokens 256 > /dev/null 2>> "$OUT/generate.log"
      grep -E "wall|vlt generate" "$OUT/generate.log";;
  esac
done
