#!/usr/bin/env bash
# The issue-7 GPU benchmarks in one device call. On the GPU machine, from the repo root:
#   bash .whl/install.sh && export PYTHONPATH=/tmp/site || exit; source tools/devpath.sh; bash tools/run_perf.sh [parts]
# parts: any of stream infer train (default: all three, in that order). Results (JSON, PNG, log) go to $OUT.
set -u
OUT=${OUT:-perf_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# run from outside the checkout: `python -m` puts the cwd first on sys.path, and the repo's vlt/ (no
# layers/ inside) would shadow the package that tools/devpath.sh builds
cd /tmp
export PYTHONUNBUFFERED=1
PARTS=${*:-stream infer train}
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
for part in $PARTS; do
  case $part in
    stream) timeout ${T_STREAM:-200} python3 -m vlt.bench.stream --out "$OUT" --frames ${FRAMES:-1000} \
              --time-limit 150 2>&1 | tee "$OUT/stream.log" ;;
    infer)  timeout ${T_INFER:-300} python3 -m vlt.bench.infer --out "$OUT" ${INFER_ARGS:-} --time-limit ${TL_INFER:-240} \
              2>&1 | tee "$OUT/infer.log" ;;
    train)  timeout ${T_TRAIN:-480} python3 -m vlt.bench.train --out "$OUT" ${TRAIN_ARGS:-} --time-limit ${TL_TRAIN:-330} \
              2>&1 | tee "$OUT/train.log" ;;
  esac
done
echo "=== summary ==="
for part in $PARTS; do sed -n "/=== SUMMARY/,\$p" "$OUT/$part.log" 2>/dev/null; done
