#!/usr/bin/env bash
# One device call: the quickstart recipe on the GPU (its step rate, to compare with the loader's
# rate from `vlt bench data` on the same machine) and the FSDP strategy with devices=1 (per-block
# wrapping, bf16, sharded checkpoint, resume from `last`). Run from the repo root on the GPU machine:
#   bash .whl/install.sh && source tools/devpath.sh && bash tools/gpu_train_check.sh
# Needs tools/device-extra-wheels.sh run once here first (LightningCLI's jsonargparse extras).
# Logs go to $OUT as they are written, so a call stopped at its time limit still returns them.
# `timeout -k`: Lightning traps SIGTERM, so a plain timeout left a run going (seen on the H100); the
# first step on a fresh machine compiles FlexAttention/fla kernels for minutes (130 s was too short).
# The whole script needs more than one 600 s call there: run it in two (T_QUICK / T_FSDP, or the parts).
set -uo pipefail
export PYTHONUNBUFFERED=1
repo=$(pwd)
work=/tmp/gpucheck && rm -rf $work && mkdir -p $work && cd $work
quiet="--trainer.enable_progress_bar=false --trainer.enable_model_summary=false"
echo "== quickstart on the GPU (200 steps)"
timeout -k 10 ${T_QUICK:-300} python -m vlt.cli fit --config quickstart --trainer.accelerator=gpu --trainer.max_steps=200 \
  --trainer.val_check_interval=100 $quiet > $OUT/quick.log 2>&1; echo "rc=$?"; tail -3 $OUT/quick.log
python - <<'PY'
import csv, json, os, statistics
rows = list(csv.DictReader(open("lightning_logs/version_0/metrics.csv")))
tps = [float(r["perf/tokens_per_s"]) for r in rows if r.get("perf/tokens_per_s")]
acc = [(r["step"], r["val/answer_acc"]) for r in rows if r.get("val/answer_acc")]
out = {"quickstart_gpu_tokens_per_s_median": statistics.median(tps[5:]), "val_answer_acc": acc,
       "tokens_per_step": 4 * 256}
out["steps_per_s"] = out["quickstart_gpu_tokens_per_s_median"] / out["tokens_per_step"]
print(json.dumps(out))
json.dump(out, open(os.path.join(os.environ["OUT"], "quickstart_gpu.json"), "w"), indent=1)
PY
echo "== loader throughput on this machine (quickstart preset, 1 and 4 workers)"
for w in ${DATA_WORKERS-4}; do
  timeout -k 10 60 python -m vlt.cli bench data --preset quickstart --batches 40 --num-workers $w --out $OUT/bench_data_gpuhost_w$w.json 2>&1 | tail -4
done
echo "== FSDP (per-block units), devices=1, bf16, sharded checkpoint, then resume from last"
common="--config quickstart --trainer.accelerator=gpu --trainer.devices=1 --trainer.strategy=fsdp --trainer.precision=bf16-mixed --checkpoint.every_n_train_steps=10 --trainer.val_check_interval=10 --trainer.limit_val_batches=2 --trainer.log_every_n_steps=1 $quiet"
rm -rf lightning_logs
timeout -k 10 ${T_FSDP:-240} python -m vlt.cli fit $common --trainer.max_steps=20 > $OUT/fsdp1.log 2>&1; echo "rc=$?"; tail -3 $OUT/fsdp1.log
ls -la lightning_logs/version_0/checkpoints/ lightning_logs/version_0/checkpoints/last.ckpt 2>&1 | head -12
timeout -k 10 ${T_FSDP:-240} python -m vlt.cli fit $common --trainer.max_steps=30 --ckpt_path last > $OUT/fsdp2.log 2>&1; echo "rc=$?"; tail -3 $OUT/fsdp2.log
python - <<'PY'
import csv
for v in ("version_0", "version_1"):
    rows = list(csv.DictReader(open(f"lightning_logs/{v}/metrics.csv")))
    print(v, [(r["step"], round(float(r["train/loss"]), 4)) for r in rows if r.get("train/loss")][-6:])
PY
