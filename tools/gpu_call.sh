#!/usr/bin/env bash
# One device call that gathers GPU evidence in parts. On the GPU machine, from the repo root:
#   bash .whl/install.sh && source tools/devpath.sh && bash tools/gpu_call.sh PART [PART ...]
# (.whl from ../shared/device/make-wheels.sh and tools/device-extra-wheels.sh.)
# Parts, run in the order given; everything is logged to $OUT as it is written, so a call stopped
# at its limit still returns what ran:
#   tests+quick  the GPU test files (pytest -n $NPROC) and, beside them, a first quickstart run that
#                fills the Triton/tilelang/Inductor caches (timings of this part are not clean)
#   tests        the GPU test files alone
#   quick        the quickstart recipe on the GPU, alone: its step rate (metrics.csv) -> quickstart_gpu.json
#   data         `vlt bench data` on this host with the quickstart preset, 1 and 4 workers
#   mixers       `vlt bench mixers`, one process per mixer (MIXERS, SEQ_LENS), merged -> mixers_<gpu>.json
#                (the first use of each fla kernel autotunes and compiles: allow minutes per mixer)
#   stream|infer|train   tools/run_perf.sh PART (its variables: FRAMES, INFER_ARGS, TRAIN_ARGS, T_*)
#   fsdp         the quickstart under --trainer.strategy fsdp (FSDP_DEVICES, default 1), 20 steps with
#                sharded checkpoints, then 10 more resumed from `last`
# Timeouts use `timeout -k`: Lightning traps SIGTERM, so a plain timeout can leave a run going.
set -uo pipefail
export PYTHONUNBUFFERED=1
repo=$(pwd)
export OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/machine.txt"
quiet="--trainer.enable_progress_bar=false --trainer.enable_model_summary=false"
# run from outside the checkout: `python -m` puts the cwd first on sys.path, and the repo's vlt/
# (no layers/ inside) would shadow the package that tools/devpath.sh builds
work=/tmp/gpuwork; mkdir -p $work; cd $work

gpu_tests() {  # $1: seconds
  VLT_GPU_ERRLOG=$OUT/gpu_errors.log timeout -k 10 "$1" python3 -m pytest "$repo/tests/test_kernels_gpu.py" \
    "$repo/tests/test_inference_gpu.py" -n "${NPROC:-6}" -rA -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?" | tee -a "$OUT/gpu_tests.log"; grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -2
}

quickstart() {  # $1: name, $2: seconds, $3: steps
  rm -rf "$work/$1" && mkdir -p "$work/$1" && cd "$work/$1"
  timeout -k 10 "$2" python3 -m vlt.cli fit --config quickstart --trainer.accelerator=gpu --trainer.max_steps="$3" \
    --trainer.val_check_interval=100 --trainer.log_every_n_steps=10 $quiet > "$OUT/$1.log" 2>&1
  echo "$1 rc=$?"; tail -2 "$OUT/$1.log"
  cp lightning_logs/version_0/metrics.csv "$OUT/$1_metrics.csv" 2>/dev/null
  python3 - "$1" <<'PY'
import csv, json, os, statistics, sys
name = sys.argv[1]
rows = list(csv.DictReader(open("lightning_logs/version_0/metrics.csv")))
tps = [float(r["perf/tokens_per_s"]) for r in rows if r.get("perf/tokens_per_s")]
acc = [(int(r["step"]), float(r["val/answer_acc"])) for r in rows if r.get("val/answer_acc")]
out = {"run": name, "tokens_per_step": 4 * 256, "logged_tokens_per_s": tps, "val_answer_acc": acc,
       "tokens_per_s_median_after_warmup": statistics.median(tps[3:]) if len(tps) > 3 else None}
if out["tokens_per_s_median_after_warmup"]:
    out["steps_per_s"] = out["tokens_per_s_median_after_warmup"] / out["tokens_per_step"]
print(json.dumps({k: v for k, v in out.items() if k != "logged_tokens_per_s"}))
json.dump(out, open(os.path.join(os.environ["OUT"], f"{name}.json"), "w"), indent=1)
PY
  cd $work
}

for part in "$@"; do
  echo "=== $part $(date +%T)"
  case $part in
    tests+quick)
      gpu_tests "${T_TESTS:-420}" &
      quickstart quick_warm "${T_QUICK:-400}" 300
      wait ;;
    tests) gpu_tests "${T_TESTS:-420}" ;;
    quick) quickstart quickstart_gpu "${T_QUICK:-200}" "${QUICK_STEPS:-400}" ;;
    data)
      for w in 1 4; do
        timeout -k 10 90 python3 -m vlt.cli bench data --preset quickstart --batches 60 --num-workers $w \
          --out "$OUT/bench_data_gpuhost_w$w.json" 2>&1 | tail -3
      done ;;
    mixers)
      for m in ${MIXERS:-full swa linear gdn swa_gdn}; do
        timeout -k 10 "${T_MIXER:-150}" python3 -m vlt.bench.mixers --mixers $m --seq-lens ${SEQ_LENS:-4096 16384 65536} \
          --out "$work/mix_$m" > "$OUT/mixers_$m.log" 2>&1; echo "mixers $m rc=$?"
      done
      done_json=$(ls $work/mix_*/mixers.json 2>/dev/null)  # a mixer cut by its timeout writes none
      if [ -n "$done_json" ]; then python3 "$repo/tools/merge_bench.py" "$OUT" $done_json 2>&1 | tail -3
      else echo "no mixer finished: the rows measured so far are in $OUT/mixers_*.log"; fi ;;
    stream|infer|train) bash "$repo/tools/run_perf.sh" "$part" ;;  # its own time limits: T_STREAM, T_INFER, ...
    fsdp)  # FSDP with per-block units, devices=1, bf16, sharded checkpoint, then resume from `last`
      mkdir -p "$work/fsdp" && cd "$work/fsdp" && rm -rf lightning_logs
      common="--config quickstart --trainer.accelerator=gpu --trainer.devices=${FSDP_DEVICES:-1} --trainer.strategy=fsdp
        --trainer.precision=bf16-mixed --checkpoint.every_n_train_steps=10 --trainer.val_check_interval=10
        --trainer.limit_val_batches=2 --trainer.log_every_n_steps=1 $quiet"
      timeout -k 10 "${T_FSDP:-240}" python3 -m vlt.cli fit $common --trainer.max_steps=20 > "$OUT/fsdp1.log" 2>&1
      echo "fsdp first run rc=$?"; ls lightning_logs/version_0/checkpoints/ 2>&1 | head
      timeout -k 10 "${T_FSDP:-240}" python3 -m vlt.cli fit $common --trainer.max_steps=30 --ckpt_path last \
        > "$OUT/fsdp2.log" 2>&1; echo "fsdp resumed run rc=$?"
      python3 - <<'PY'  # the resumed run's losses continue the first run's (steps 20-29 after 0-19)
import csv, glob
for path in sorted(glob.glob("lightning_logs/version_*/metrics.csv")):
    rows = list(csv.DictReader(open(path)))
    print(path, [(r["step"], round(float(r["train/loss"]), 4)) for r in rows if r.get("train/loss")][-6:])
PY
      cd $work ;;
    *) echo "unknown part $part" ;;
  esac
done
echo "=== done $(date +%T)"
