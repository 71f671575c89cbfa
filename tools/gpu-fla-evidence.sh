#!/usr/bin/env bash
# Issue 18 GPU evidence: the fla-backed mixers (layers/fla_mixers.py) on one H200. From the repo root:
#   bash .whl/install.sh && export PYTHONPATH=/tmp/site; source tools/devpath.sh; bash tools/gpu-fla-evidence.sh PART...
# Parts:
#   tests   tests/test_fla_mixers_gpu.py one mixer per process ($MIXERS), each cut at $T_MIXER s with SIGTERM, so
#           fla's autotune picks so far are dumped (vlt.kernels.fla_tables) and the next mixer still runs;
#           Python stacks every $T_HANG s show where a slow case waits (compile, autotune, tilelang)
#   bench   vlt bench mixers --mixers $MIXERS --seq-lens $SEQ_LENS (fwd+bwd and decode; core vs fla's raw layer)
# Writes to $OUT: fla_tests_<mixer>.log, errors.log (every measured error), mixers.json/.png, fla_configs/.
# On 2026-12-01 the whole test file in one process finished only kda's fp32 forward check in 400 s on a fresh
# H200 (its backward then ran past the limit; no stack dump was taken).
set -uo pipefail
export PYTHONUNBUFFERED=1
repo=$(pwd)
OUT=${OUT:-/tmp/fla_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
work=/tmp/flawork; mkdir -p "$work"; cd "$work"   # outside the checkout: see tools/devpath.sh
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/machine.txt"
export TRITON_CACHE_AUTOTUNING=1
export VLT_DUMP_FLA_CONFIGS=${VLT_DUMP_FLA_CONFIGS:-$OUT/fla_configs}
export VLT_GPU_ERRLOG=$OUT/errors.log
MIXERS=${MIXERS:-kda gdn2 deltanet gla rwkv7 mamba2 nsa moba}
for part in "$@"; do
  echo "=== $part $(date +%T)"
  case $part in
    tests)
      # numerics, not speed: each mixer's kernels take their first fitting config at the tests' shapes instead of
      # compiling and timing every candidate (on 2026-12-01 one gdn2 forward was still autotuning after 95 s)
      for m in $MIXERS; do
        VLT_FLA_AUTOTUNE=${TEST_AUTOTUNE:-off} timeout -s TERM -k 15 "${T_MIXER:-150}" python3 -m pytest "$repo/tests/test_fla_mixers_gpu.py" -k "$m" -m gpu -rA \
          -p no:cacheprovider -q --durations=0 -o faulthandler_timeout="${T_HANG:-60}" > "$OUT/fla_tests_$m.log" 2>&1
        echo "$m rc=$?"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/fla_tests_$m.log" | cut -c1-200 | tail -12
      done
      cat "$OUT/errors.log" 2>/dev/null;;
    bench)
      timeout -s TERM -k 15 "${T_BENCH:-300}" python3 -m vlt.bench.mixers --mixers $MIXERS --seq-lens ${SEQ_LENS:-4096} \
        --out "$work" > "$OUT/bench_mixers.log" 2>&1
      echo "bench rc=$?"; tail -30 "$OUT/bench_mixers.log"
      cp "$work/mixers.json" "$work/mixers.png" "$OUT/" 2>/dev/null;;
  esac
done
