#!/usr/bin/env bash
# Issue 18 GPU evidence: the fla-backed mixers (layers/fla_mixers.py) on one H200. From the repo root:
#   bash .whl/install.sh && export PYTHONPATH=/tmp/site; source tools/devpath.sh; bash tools/gpu-fla-evidence.sh PART...
# Parts:
#   tests   tests/test_fla_mixers_gpu.py one mixer per process ($MIXERS), each cut at $T_MIXER s with SIGTERM, so
#           fla's autotune picks so far are dumped (vlt.kernels.fla_tables) and the next mixer still runs;
#           Python stacks every $T_HANG s show where a slow case waits (compile, autotune, tilelang);
#           PARALLEL=1 runs the mixers' processes side by side
#   warm    the bench's compiles for each mixer in parallel (run before bench on the same machine)
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
      one_mixer() {
        VLT_FLA_AUTOTUNE=${TEST_AUTOTUNE:-off} timeout -s TERM -k 15 "${T_MIXER:-150}" python3 -m pytest "$repo/tests/test_fla_mixers_gpu.py" -k "$1" -m gpu -rA \
          -p no:cacheprovider -q --durations=0 -o faulthandler_timeout="${T_HANG:-60}" > "$OUT/fla_tests_$1.log" 2>&1
        echo "$1 rc=$? ($(date +%T))" > "$OUT/fla_tests_$1.rc"
      }
      # PARALLEL=1: every mixer's process at once. The time goes to Triton compiling each kernel specialisation on
      # one CPU core (~50 s for one KDA backward kernel), so on a 16-core machine they overlap almost perfectly;
      # the GPU work of these tests is milliseconds. Errors are still per process and per mixer.
      for m in $MIXERS; do
        if [ "${PARALLEL:-0}" = 1 ]; then one_mixer "$m" & else one_mixer "$m"; fi
      done
      wait
      for m in $MIXERS; do
        cat "$OUT/fla_tests_$m.rc"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/fla_tests_$m.log" | cut -c1-200 | tail -12
      done
      cat "$OUT/errors.log" 2>/dev/null;;
    warm)
      # the bench's Triton compiles, one process per mixer side by side (1 ms per measurement, T = 4096 only):
      # a later `bench` on the same machine reads the kernels from Triton's disk cache (T = 4K / 16K / 64K are
      # the same specialisation: every length divisible by 16) instead of compiling mixer after mixer
      for m in $MIXERS; do
        timeout -s TERM -k 15 "${T_WARM:-300}" python3 -m vlt.bench.mixers --mixers "$m" --seq-lens 4096 --rep-ms 1 \
          --out "$work/warm_$m" > "$OUT/warm_$m.log" 2>&1 &
      done
      wait
      for m in $MIXERS; do echo "warm $m: $(tail -1 "$OUT/warm_$m.log" | cut -c1-160)"; done;;
    bench)
      timeout -s TERM -k 15 "${T_BENCH:-300}" python3 -m vlt.bench.mixers --mixers $MIXERS --seq-lens ${SEQ_LENS:-4096} \
        --out "$work" > "$OUT/bench_mixers.log" 2>&1
      echo "bench rc=$?"; tail -30 "$OUT/bench_mixers.log"
      cp "$work/mixers.json" "$work/mixers.png" "$OUT/" 2>/dev/null;;
  esac
done
