#!/usr/bin/env bash
# Issue 17's phenomenon table on one GPU with small models (tiny-hybrid shapes, 4 layers). Rows 1 and 2
# are one `vlt compare` study each (equal parameter budgets by MLP width):
#   1. hybrid 1:3 vs swa on needle recall with the evidence far beyond the window
#      (needle, code_kind=color: the one frame with a shape among noise frames; SWA window 32 for every
#      layout. The evidence at 46 tokens (1.4x the window, inside what 4 stacked SWA layers reach,
#      4 x 32 = 128) is the control both layouts should solve; at 320 and 448 tokens (10x, 14x) it is
#      beyond that reach: the row is the ">4x window" group); expected hybrid >= swa + 20 points
#   2. hybrid 1:3 vs gdn on dense OCR: OCR_STRINGS labelled 2-digit strings (default 2) in a grid, one string
#      per row and one glyph per 28 x 28 cell (dense_ocr cell=28: each image token holds one glyph), the question
#      names one; expected hybrid >= gdn + 10 points. Both layouts start from one vision tower that reads
#      (OCR_TOWER=probe, the default: tools/ocr_probe.py --image-size 28, a single character per 28-pixel image,
#      OCR_PROBE_STEPS steps (400; 94% after 400 on a CPU in 19 s), saved once as $WORK/ocr_vit28.pth and
#      passed through vlt compare --model-options as vision.weights_file; delete it to train it again, the runs
#      reuse their results whatever the file holds). Why (2-core CPU, 2026-12-02, hybrid 1:3, 8 rows per step):
#      free text (4 strings of ~10-pixel glyphs anywhere in 112 px) stayed at chance with the random tower
#      (OCR_TOWER=random) and with pretrained ones; in the grid with the probe's tower one string was read
#      perfectly (100% of 100 after 300 steps), two began to learn after ~175 steps, four stayed at chance
#      for 475 steps.
# Row 3 is the distillation study (python -m vlt.evaluation.distill_study, its docstring says how):
#   3. a full-attention teacher trained on the task mix; the hybrid 1:3 converted from it (stage I layer
#      phase + KL, then SFT) vs the same hybrid trained from scratch: steps to 95% of the teacher's
#      generation accuracy (the student's include stage I), expected student / scratch <= 10%. Both SFT
#      runs stop at the bar, so scratch only runs as long as it needs (up to SCRATCH_STEPS)
# Writes $OUT/phenomena.json + phenomena.md (the table, verdicts, the command behind each row), each
# compare study's compare.json / .md / .png and per-run eval.json, the distillation's distill.json / .png
# and per-run curve.jsonl (accuracy by step), plus logs.
#
#   ROWS="1 2" OUT=/path/out bash tools/gpu-phenomena.sh   # on the GPU machine, from a checkout
#   ROWS=3 OUT=/path/out bash tools/gpu-phenomena.sh       # row 3, cut at DISTILL_TIMEOUT
#   PHENOMENA_TINY=1 OUT=/tmp/ph bash tools/gpu-phenomena.sh   # the same logic on a CPU in ~1 minute
#   PHENOMENA_CPU=1 ROWS=1 OUT=/tmp/ph bash tools/gpu-phenomena.sh   # a row at a smaller scale on a CPU (~35-60 min per row)
#
# ROWS (default "1 2 3") picks the rows to run; the other rows of an existing $OUT/phenomena.json are
# kept, so rows measured by two commands end in one table (copy the first command's phenomena.json into
# the second's $OUT). On an H200 (eb5abb6, torch kernels) one study does not fit a 10-minute device command:
# a needle hybrid trained ~1.2 steps/s (500 steps ~400 s, after ~130 s writing its data), row 3's teacher took
# 368 s; rows run side by side (one invocation per row, the same WORK, separate OUTs) and again in the next warm
# call, which reuses the finished runs and resumes the cut ones from their last checkpoint (every <= 100 steps;
# until 3bb63f4 a cut run restarted, so in three calls of 400-500 s no needle or OCR run ever finished).
# Knobs (environment): NEEDLE_STEPS, OCR_STEPS (optimizer steps per run, default 500), SEEDS (default
# "0"), NEEDLE_TRAIN / OCR_TRAIN (training samples), NEEDLE_BATCH / OCR_BATCH (rows per step),
# EVAL_N (test samples per study and per row-3 evaluation), NEEDLE_TIMEOUT / OCR_TIMEOUT (seconds per
# study, default 300 / 240, so both fit one 10-minute command), WORKERS (loader processes, default 6),
# WORK (runs, data, checkpoints; default /tmp/vlt-phenomena). Row 3: TEACHER_STEPS (500), LAYER_STEPS
# and KL_STEPS (stage I, 25 each), STUDENT_STEPS (500) and SCRATCH_STEPS (1000): the most SFT steps,
# EVAL_EVERY (25; the step counts above must be multiples of it), STUDENT_LR (default: the recipe's),
# DISTILL_TRAIN (20000 samples), DISTILL_BATCH (32 rows), DISTILL_TIMEOUT (540 s); the seed is SEEDS' first.
# Row 2: OCR_TOWER (probe / random, see above), OCR_STRINGS (2), OCR_PROBE_STEPS (400; 3 with PHENOMENA_TINY=1), the
# probe's log in $OUT/ocr_probe.log; its time is outside OCR_TIMEOUT.
# STUDY_BACKEND (default torch: the swa and gdn mixers on their torch kernels, no compilation; auto: fla /
# FlexAttention). PHENOMENA_CPU=1: the rows at a CPU scale (window 16, 8 frames, 8 rows per step; timeouts
# NEEDLE_TIMEOUT_CPU / OCR_TIMEOUT_CPU, default 4000 s). A study cut by its timeout keeps its finished runs; running the script again with the same settings and
# WORK reuses them, resumes a cut run from its last checkpoint and trains only what is missing (row 3 also
# reports from the runs it finished).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/phenomena_out}
WORK=${WORK:-/tmp/vlt-phenomena}
# -P: the checkout's own vlt/ (cwd) must not shadow the installed package (on the GPU machine that is
# tools/devpath.sh's package farm, and `python -m` from the repo root failed with "No module named vlt.data")
PY=${PYTHON:-python -P}
# fla's kernels at these tiny shapes are in no shipped table: timing every candidate of every GDN kernel took
# the first hybrid step past 190 s on a fresh H200 (2026-12-01), longer than a study's whole budget. Each
# candidate computes the same op, so the studies' scores do not depend on it (vlt.kernels.fla_tables)
export VLT_FLA_AUTOTUNE=${VLT_FLA_AUTOTUNE:-off}
TINY=${PHENOMENA_TINY:-0}
CPU=${PHENOMENA_CPU:-0}
SEEDS=${SEEDS:-0}
ROWS=${ROWS:-1 2 3}
NEEDLE_TIMEOUT=${NEEDLE_TIMEOUT:-300}
OCR_TIMEOUT=${OCR_TIMEOUT:-240}
DISTILL_TIMEOUT=${DISTILL_TIMEOUT:-540}

fail() { echo "gpu-phenomena: error: $*" >&2; exit 2; }
for r in $ROWS; do
  case $r in 1|2|3) ;; *) fail "ROWS='$ROWS': '$r' is not a row (allowed: 1 2 3, e.g. ROWS=\"1 2\")";; esac
done
[ -n "${ROWS// /}" ] || fail "ROWS is empty (allowed: 1 2 3, e.g. ROWS=\"1 2\")"
OCR_TOWER=${OCR_TOWER:-probe}
OCR_STRINGS=${OCR_STRINGS:-2}
case $OCR_TOWER in probe|random) ;; *) fail "OCR_TOWER='$OCR_TOWER' (allowed: probe, random)";; esac
want() { [[ " $ROWS " == *" $1 "* ]]; }

if [ "$CPU" = 1 ]; then   # rows 1 and 2 at a scale a 2-core CPU trains in ~30-45 minutes per study (one thread
  # each; run ROWS=1 and ROWS=2 side by side with the same WORK): 8 frames of 18 tokens, window 16, so the
  # evidence at 46 tokens (2.9x) is inside what 4 stacked SWA layers reach (64) and 88 / 116 tokens are beyond it
  NEEDLE_STEPS=${NEEDLE_STEPS:-500}; OCR_STEPS=${OCR_STEPS:-500}; NEEDLE_TRAIN=${NEEDLE_TRAIN:-4000}
  OCR_TRAIN=${OCR_TRAIN:-16000}; EVAL_N=${EVAL_N:-300}; FRAMES=8; DISTANCES="[24, 80, 112]"; WINDOW=16
  CONTROL="needle / 2-4x window"
  FIT=(--set=--trainer.accelerator=cpu --set=--trainer.precision=32-true --set=--data.init_args.num_workers=0)
  DEVICE=("${FIT[@]}" --device cpu)
  NEEDLE_BATCH=${NEEDLE_BATCH:-8}; OCR_BATCH=${OCR_BATCH:-8}; NEEDLE_LEN=512
  NEEDLE_TIMEOUT=${NEEDLE_TIMEOUT_CPU:-4000}; OCR_TIMEOUT=${OCR_TIMEOUT_CPU:-4000}
  TEACHER_STEPS=${TEACHER_STEPS:-500}; LAYER_STEPS=${LAYER_STEPS:-25}; KL_STEPS=${KL_STEPS:-25}
  STUDENT_STEPS=${STUDENT_STEPS:-500}; SCRATCH_STEPS=${SCRATCH_STEPS:-1000}; EVAL_EVERY=${EVAL_EVERY:-25}
  DISTILL_TRAIN=${DISTILL_TRAIN:-20000}; DISTILL_BATCH=${DISTILL_BATCH:-8}
elif [ "$TINY" = 1 ]; then   # CPU check of this script's logic: a few steps, tiny data, window 16
  NEEDLE_STEPS=${NEEDLE_STEPS:-3}; OCR_STEPS=${OCR_STEPS:-3}; NEEDLE_TRAIN=${NEEDLE_TRAIN:-16}
  OCR_TRAIN=${OCR_TRAIN:-16}; EVAL_N=${EVAL_N:-6}; FRAMES=8; DISTANCES="[40, 100]"; WINDOW=16
  CONTROL="needle / 2-4x window"   # 46 tokens at window 16
  FIT=(--set=--trainer.accelerator=cpu --set=--trainer.precision=32-true --set=--data.init_args.num_workers=0)
  DEVICE=("${FIT[@]}" --device cpu)
  NEEDLE_BATCH=${NEEDLE_BATCH:-2}; OCR_BATCH=${OCR_BATCH:-2}; NEEDLE_LEN=1024
  TEACHER_STEPS=${TEACHER_STEPS:-4}; LAYER_STEPS=${LAYER_STEPS:-2}; KL_STEPS=${KL_STEPS:-2}
  STUDENT_STEPS=${STUDENT_STEPS:-4}; SCRATCH_STEPS=${SCRATCH_STEPS:-4}; EVAL_EVERY=${EVAL_EVERY:-2}
  DISTILL_TRAIN=${DISTILL_TRAIN:-32}; DISTILL_BATCH=${DISTILL_BATCH:-2}; OCR_PROBE_STEPS=${OCR_PROBE_STEPS:-3}
else
  NEEDLE_STEPS=${NEEDLE_STEPS:-500}; OCR_STEPS=${OCR_STEPS:-500}; NEEDLE_TRAIN=${NEEDLE_TRAIN:-4000}
  OCR_TRAIN=${OCR_TRAIN:-16000}; EVAL_N=${EVAL_N:-300}; FRAMES=32; DISTANCES="[40, 320, 448]"; WINDOW=32
  CONTROL="needle / 1-2x window"
  FIT=(--set=--trainer.accelerator=gpu --set=--trainer.devices=1 --set=--data.init_args.num_workers=${WORKERS:-6})
  DEVICE=("${FIT[@]}" --device cuda)
  # rows of 1024 (needle, ~2 samples each) / 512 tokens (dense OCR, ~5 each; the mix ~10) per step: a
  # 1.3M-parameter model is launch-bound on an H200, so wide batches buy samples at little cost per step
  NEEDLE_BATCH=${NEEDLE_BATCH:-32}; OCR_BATCH=${OCR_BATCH:-32}; NEEDLE_LEN=1024
  TEACHER_STEPS=${TEACHER_STEPS:-500}; LAYER_STEPS=${LAYER_STEPS:-25}; KL_STEPS=${KL_STEPS:-25}
  STUDENT_STEPS=${STUDENT_STEPS:-500}; SCRATCH_STEPS=${SCRATCH_STEPS:-1000}; EVAL_EVERY=${EVAL_EVERY:-25}
  DISTILL_TRAIN=${DISTILL_TRAIN:-20000}; DISTILL_BATCH=${DISTILL_BATCH:-32}
fi
OCR_PROBE_STEPS=${OCR_PROBE_STEPS:-400}
for k in NEEDLE_STEPS OCR_STEPS NEEDLE_TRAIN OCR_TRAIN NEEDLE_BATCH OCR_BATCH EVAL_N NEEDLE_TIMEOUT OCR_TIMEOUT \
         DISTILL_TIMEOUT TEACHER_STEPS LAYER_STEPS KL_STEPS STUDENT_STEPS SCRATCH_STEPS EVAL_EVERY DISTILL_TRAIN \
         DISTILL_BATCH OCR_PROBE_STEPS OCR_STRINGS; do
  [[ ${!k} =~ ^[1-9][0-9]*$ ]] || fail "$k='${!k}' must be a positive whole number"
done
SEED=${SEEDS%% *}
# the mixers' torch kernels (the same math as fla's / FlexAttention's, tested equal): on a fresh H200 the first
# step of a 1.3M-parameter hybrid spent >170 s compiling FlexAttention and fla's GDN kernels (2026-12-02,
# VLT_FLA_AUTOTUNE=off: one config each), more than a study's budget; at these sizes the torch paths cost
# launches only. STUDY_BACKEND=auto restores the default kernels.
B=${STUDY_BACKEND:-torch}
DISTILL=(--mixers "{\"full\": {\"backend\": \"$B\"}, \"swa\": {\"backend\": \"$B\"}, \"gdn\": {\"backend\": \"$B\"}}"
         --num-train "$DISTILL_TRAIN" --num-eval "$EVAL_N" --seed "$SEED" --teacher-steps "$TEACHER_STEPS"
         --layer-steps "$LAYER_STEPS" --kl-steps "$KL_STEPS" --student-steps "$STUDENT_STEPS"
         --scratch-steps "$SCRATCH_STEPS" --eval-every "$EVAL_EVERY" --eval-batch-size 64 --max-new-tokens 8
         ${STUDENT_LR:+--student-lr "$STUDENT_LR"} --set=--trainer.limit_val_batches=0
         --set=--trainer.enable_progress_bar=false --set=--trainer.log_every_n_steps=25
         --set=--data.init_args.batch_size=$DISTILL_BATCH "${FIT[@]}")
if want 3; then   # a bad combination (a step count off the evaluation grid) fails now, not minutes in
  $PY -m vlt.evaluation.distill_study --out "$WORK/distillation" "${DISTILL[@]}" --check \
    || fail "row 3 settings (TEACHER_STEPS -> --teacher-steps, EVAL_EVERY -> --eval-every, ...)"
fi
mkdir -p "$OUT" "$WORK"
# the same for every run: no validation pass (the studies' scores come from vlt eval on the test
# split), quiet logs; the eval engine eager (no graph capture or compile time for 1M-parameter models)
COMMON=(--config layouts/base --seeds $SEEDS --num-val 0 --num-eval "$EVAL_N" --eval-batch-size 64
        --mixers "{\"swa\": {\"window\": $WINDOW, \"backend\": \"$B\"}, \"gdn\": {\"backend\": \"$B\"}, \"swa_gdn\": {\"window\": $WINDOW}}"
        --set=--trainer.limit_val_batches=0 --set=--trainer.enable_progress_bar=false
        --set=--trainer.log_every_n_steps=25
        --eval-arg=--engine-option=graphs=false --eval-arg=--engine-option=compile=none
        --eval-arg=--engine-option=fused=false "${DEVICE[@]}")

table() {  # rebuild the selected rows of $OUT/phenomena.json + .md from what WORK holds now
  $PY -m vlt.evaluation.phenomena --out "$OUT" --work "$WORK" --rows $ROWS --control "$CONTROL" "$@"
}

copy_runs() {  # study, then files to copy from each of its runs (no checkpoints)
  local name=$1; shift
  for r in "$WORK/$name"/runs/*/; do
    [ -d "$r" ] || continue
    local d="$OUT/$name/runs/$(basename "$r")"; mkdir -p "$d"
    for f in "$@"; do cp "$r"/$f "$d/" 2>/dev/null; done
    cp "$r"/lightning_logs/version_*/metrics.csv "$d/" 2>/dev/null
  done
}

study() {  # name, timeout in seconds, then vlt compare arguments
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "[gpu-phenomena] $name: vlt compare $*" | tee -a "$OUT/phenomena.log"
  # KILL, not INT: Lightning would stop an interrupted fit gracefully and the study would score a
  # half-trained model (vlt compare also refuses a checkpoint short of --steps)
  timeout --signal=KILL "$limit" $PY -m vlt.cli compare "$@" --out "$WORK/$name" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[gpu-phenomena] $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/phenomena.log"
  mkdir -p "$OUT/$name"
  cp "$WORK/$name"/compare.{json,md,png} "$OUT/$name/" 2>/dev/null
  copy_runs "$name" run.json eval/eval.json eval/eval.md eval/predictions.jsonl
  table --quiet   # after each study: a later one cut by the device's own limit leaves this row written
  return $rc
}

rc1=-; rc2=-; rc3=-   # "-": not run (not in ROWS)
if want 1; then
  # 8 new tokens: the answers are colour names, up to 7 bytes (magenta) + the end token (at 4, the CPU study of 2026-12-02
  # scored every answer cut to 4 bytes: "whit" for "white", `vlt eval` now warns about cut answers)
  study needle_beyond_window "$NEEDLE_TIMEOUT" --layouts hybrid_1to3 swa --task needle --steps "$NEEDLE_STEPS" \
    --num-train "$NEEDLE_TRAIN" --param num_frames=$FRAMES --param code_kind=color \
    --param "distances=$DISTANCES" --max-new-tokens 8 --set=--data.init_args.max_length=$NEEDLE_LEN \
    --set=--data.init_args.batch_size=$NEEDLE_BATCH "${COMMON[@]}"
  rc1=$?
fi
if want 2; then
  OCR_MODEL=()   # OCR_TOWER=random: the recipe's random tower
  if [ "$OCR_TOWER" = probe ]; then
    VIT="$WORK/ocr_vit28.pth"
    if [ ! -f "$VIT" ]; then   # written under another name first: a cut probe leaves no file to reuse
      t0=$SECONDS
      dev=${DEVICE[-1]}   # cpu / cuda, as the evaluations
      echo "[gpu-phenomena] dense_ocr tower: python tools/ocr_probe.py --image-size 28 --steps $OCR_PROBE_STEPS" \
        "--device $dev --save $VIT" | tee -a "$OUT/phenomena.log"
      $PY tools/ocr_probe.py --image-size 28 --steps "$OCR_PROBE_STEPS" --device "$dev" --save "$VIT.part" \
        > "$OUT/ocr_probe.log" 2>&1 && mv "$VIT.part" "$VIT" \
        || fail "the dense_ocr tower's pretraining (tools/ocr_probe.py) failed; see $OUT/ocr_probe.log" \
                "(OCR_TOWER=random: the study without it)"
      echo "[gpu-phenomena] dense_ocr tower: done after $((SECONDS - t0)) s;" \
        "$(grep '^step' "$OUT/ocr_probe.log" | tail -1)" | tee -a "$OUT/phenomena.log"
    fi
    OCR_MODEL=(--model-options "{\"vision\": {\"weights_file\": \"$VIT\"}}")
  fi
  study dense_ocr "$OCR_TIMEOUT" --layouts hybrid_1to3 gdn --task dense_ocr --steps "$OCR_STEPS" \
    --num-train "$OCR_TRAIN" --param cell=28 --param num_strings=$OCR_STRINGS --param length=2 --max-new-tokens 4 \
    --set=--data.init_args.max_length=512 --set=--data.init_args.batch_size=$OCR_BATCH "${OCR_MODEL[@]}" "${COMMON[@]}"
  rc2=$?
fi
if want 3; then
  t0=$SECONDS
  echo "[gpu-phenomena] distillation: python -m vlt.evaluation.distill_study ${DISTILL[*]}" \
    | tee -a "$OUT/phenomena.log"
  # KILL for the same reason; the row is then built from the runs and curve points written so far
  timeout --signal=KILL "$DISTILL_TIMEOUT" $PY -m vlt.evaluation.distill_study --out "$WORK/distillation" \
    "${DISTILL[@]}" > "$OUT/distillation.log" 2>&1
  rc3=$?
  echo "[gpu-phenomena] distillation: exit $rc3 after $((SECONDS - t0)) s" | tee -a "$OUT/phenomena.log"
  table --quiet   # also (re)writes WORK/distillation/distill.json + .png from the runs on disk
  mkdir -p "$OUT/distillation"
  cp "$WORK/distillation"/{distill.json,distill.png,study.json} "$OUT/distillation/" 2>/dev/null
  copy_runs distillation run.json curve.jsonl
fi

table
rct=$?
echo "[gpu-phenomena] done (rows $ROWS): needle exit $rc1, dense_ocr exit $rc2, distillation exit $rc3," \
  "table exit $rct; results in $OUT" | tee -a "$OUT/phenomena.log"
for rc in $rc1 $rc2 $rc3 $rct; do [ "$rc" = 0 ] || [ "$rc" = - ] || exit 1; done
