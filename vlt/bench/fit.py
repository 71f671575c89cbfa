"""``vlt bench fit``: the InfiniteVL stages measured as users run them, through ``vlt fit``.

Each stage runs its shipped recipe (``recipes/infinitevl/<stage>.yaml``) through the real CLI -
LightningModule, data module, loss, optimizer, precision as the recipe sets them - for ``--steps``
optimizer steps on one device, with only what a bench must replace overridden: the teacher is a
random full-attention model of the Qwen2.5-VL shapes (``--shape 4b``: Qwen2.5-VL-3B, the
InfiniteVL-4B teacher; ``tiny`` for a CPU smoke run), stage 2 and 3 start from a random student of
the converted layout instead of the previous stage's checkpoint, the data are vlt's synthetic
``mix`` shards (rendered by the data module into ``--out``), validation and checkpoints are off.
A stage that runs out of memory with the recipe's activation checkpointing is retried once with
every block recomputed (both attempts are in the JSON).

Reported per stage (from what the module logs, vlt.training.base): median tokens/s over the steps
after the first, model TFLOP/s and MFU (vlt.training.flops: FLOPs per part, the device's dense bf16
peak), peak GiB, time to the first optimizer step (from fit start, and from the model's
construction), and the step's FLOPs per part (so the vision tower's share can be taken out).
Writes fit.json (merged with rows of earlier runs into the same --out) and fit.png.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L

STAGES = ("stage1_layer", "stage1_kl", "stage2_sft", "stage3_long_lora")
STUDENT_LAYOUT = "[swa, gdn, gdn, gdn] * 9"
SHAPES = {  # Qwen2.5-VL-3B (REFERENCE.md) and a tiny model of the same structure
    "4b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
               layout=STUDENT_LAYOUT, window=8192, image_size=448),
    "tiny": dict(text=dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
                 vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                             window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                             temporal_patch_size=2),
                 layout="[swa, gdn, gdn, gdn]", window=64, image_size=56),
}


def add_bench_fit_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--shape", default="4b", choices=list(SHAPES))
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: --shape tiny, short rows, 2 steps, fp32")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per stage (the first is warm-up)")
    p.add_argument("--max-length", type=int, default=8192, help="packed row length of stage 1 and 2")
    p.add_argument("--long-length", type=int, default=32768, help="packed row length of stage 3")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: the recipe's)")
    p.add_argument("--no-retry", action="store_true", help="no second attempt with every block checkpointed")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--profile", action="store_true", help="kernel profile of the last optimizer step per stage "
                   "(left out of the medians): profile_fit_<stage>.txt in --out, its summary in the JSON")
    p.add_argument("--trace-first-step", type=float, default=0, metavar="S",
                   help="until the first optimizer step ends: print each phase's time (data, forward, backward, "
                   "step) and every S seconds the Python stacks (what a cold start compiles or autotunes)")
    p.add_argument("--set", action="append", default=[], metavar="ARG",
                   help="extra `vlt fit` argument for every stage, e.g. --set=--model.init_args.loss_impl=torch")
    return p


class FitRecorder(L.Callback):
    """Collects what the module logs each step (perf/*) and the last step's FLOPs per part; with
    ``profile_file``, a kernel profile of the last step (forward, backward, optimizer), which the
    throughput medians then leave out (the profiler's own overhead)."""

    def __init__(self, out_file: str, profile_file: str | None = None, trace_first_step: float = 0):
        self.out_file, self.steps, self._last = out_file, [], None
        self.profile_file, self._prof, self.profile = profile_file, None, None
        self.trace, self._t0, self._first_done = trace_first_step, time.perf_counter(), False

    # -- where a cold first step goes: printed as it happens, so a run stopped by a time limit still says
    def _phase(self, name):
        if self.trace and not self._first_done:
            print(f"FIT-PHASE {name} at {time.perf_counter() - self._t0:.1f}s", flush=True)

    def on_fit_start(self, trainer, pl_module):
        self._phase("fit start (model built)")

    def on_train_start(self, trainer, pl_module):
        if self.trace:
            import faulthandler
            faulthandler.dump_traceback_later(self.trace, repeat=True, file=sys.__stderr__)
        self._phase("train start (model on device)")

    def on_before_backward(self, trainer, pl_module, loss):
        self._phase("forward done")

    def on_after_backward(self, trainer, pl_module):
        self._phase("backward done")

    def _first_step_done(self):
        self._phase("first optimizer step done")
        if self.trace and not self._first_done:
            import faulthandler
            faulthandler.cancel_dump_traceback_later()
        self._first_done = True

    def _take(self, trainer):
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("perf/", "train/loss"))}
        if m:
            self.steps.append(m)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            self._take(trainer)
        else:
            self._phase("first batch loaded")
        if self.profile_file and batch_idx == trainer.max_steps - 1 and pl_module.device.type == "cuda":
            import torch
            from vlt.bench.common import cuda_profiler
            torch.cuda.synchronize()
            self._prof = cuda_profiler().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last = batch
        if not self._first_done:
            self._first_step_done()
        if self._prof is not None:
            import torch
            from vlt.bench.common import write_kernel_table
            torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            self.profile, self._prof = write_kernel_table(self._prof, self.profile_file, rows=40), None

    def on_train_end(self, trainer, pl_module):
        self._take(trainer)
        parts = pl_module.count_step_flops(self._last).as_dict() if self._last is not None else {}
        Path(self.out_file).write_text(json.dumps({"steps": self.steps, "flops_parts": parts,
                                                   "profile": self.profile}))
        self._last = None


def hf_teacher_config(shape: str):
    from transformers import Qwen2_5_VLConfig
    s = SHAPES[shape]
    ids = {"image_token_id": 261, "video_token_id": 262, "vision_start_token_id": 259}  # vlt's byte tokenizer
    return Qwen2_5_VLConfig(text_config=dict(s["text"]), vision_config=dict(s["vision"]), tie_word_embeddings=True,
                            vision_end_token_id=260, **ids)


def stage_args(stage: str, args, tmp: Path) -> list[str]:
    from vlt.convert import vlm_from_teacher_config
    s = SHAPES[args.shape]
    hf = hf_teacher_config(args.shape)
    length = args.long_length if stage == "stage3_long_lora" else args.max_length
    synth = {"task": "mix", "image_size": s["image_size"], "num_train": max(64, args.steps * length // 150),
             "num_val": 0, "seed": 0, "cache_dir": str(Path(args.out) / "shards")}
    argv = ["fit", "--config", f"infinitevl/{stage}"]
    if stage == "stage1_kl":  # as its recipe says: over stage1_layer
        argv = ["fit", "--config", "infinitevl/stage1_layer", "--config", "infinitevl/stage1_kl"]
    if stage.startswith("stage1"):
        teacher = vlm_from_teacher_config(hf).to_dict()
        argv += [f"--model.init_args.teacher={json.dumps(teacher)}", f"--model.init_args.student_layout={s['layout']}",
                 "--model.init_args.student_mixers={swa: {window: %d}, gdn: {expand_v: 2.0}}" % s["window"]]
    else:
        student = vlm_from_teacher_config(hf, layout=s["layout"], window=s["window"],
                                          mixers={"gdn": {"expand_v": 2.0}}).to_dict()
        argv.append(f"--model.init_args.model={json.dumps(student)}")
    argv += ["--model.init_args.init_from=null",
             "--data.init_args.train_shards=null", "--data.init_args.val_shards=null",
             "--data.init_args.tokenizer=byte", f"--data.init_args.synthetic={json.dumps(synth)}",
             f"--data.init_args.max_length={length}",
             f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0", "--trainer.devices=1",
             "--trainer.strategy=auto", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp}",
             f"--trainer.logger.init_args.save_dir={tmp}",
             "--checkpoint.save_last=false", "--checkpoint.save_top_k=0", "--checkpoint.every_n_train_steps=0",
             "--trainer.callbacks+=vlt.bench.fit.FitRecorder", f"--trainer.callbacks.out_file={tmp}/rec.json"]
    if args.profile:
        argv.append(f"--trainer.callbacks.profile_file={Path(args.out).resolve()}/profile_fit_{stage}.txt")
    if args.trace_first_step:
        argv.append(f"--trainer.callbacks.trace_first_step={args.trace_first_step}")
    if args.num_workers is not None:
        argv.append(f"--data.init_args.num_workers={args.num_workers}")
    if args.tiny:
        argv += ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    return argv + list(args.set)


def run_stage(stage: str, args, attempt_args=()) -> dict:
    import torch
    from vlt.cli import main as vlt_main
    tmp = Path(args.out) / "runs" / f"{stage}-{int(time.time() * 1000)}"
    tmp.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    import vlt.training.base as base
    guard = base.check_new_params_train
    if not stage.startswith("stage1"):
        # The random student stands in for the previous stage's checkpoint, from which every
        # parameter would be loaded; the frozen-at-random-init guard would (rightly) refuse it.
        base.check_new_params_train = lambda model, new: None
    t0 = time.perf_counter()
    try:
        vlt_main(stage_args(stage, args, tmp) + list(attempt_args))
    finally:
        base.check_new_params_train = guard
    wall = time.perf_counter() - t0
    rec = json.loads((tmp / "rec.json").read_text())
    return summarise(stage, rec, wall)


def summarise(stage, rec, wall) -> dict:
    steps = rec["steps"]

    def series(key):
        return [s[key] for s in steps if key in s]
    cut = -1 if rec.get("profile") else None  # the profiled last step runs under the profiler's overhead

    def timed_steps(vals):  # the first step compiles kernels for new shapes; leave it out when others exist
        vals = vals[:cut] if len(vals) >= 3 else vals
        return vals[1:] if len(vals) >= 3 else vals
    tps = series("perf/tokens_per_s")
    timed = timed_steps(tps)

    def med(key):
        vals = timed_steps(series(key))
        return round(statistics.median(vals), 4) if vals else None
    parts = rec.get("flops_parts", {})
    total = sum(v["fwd"] + v["bwd"] for v in parts.values())
    vision = sum(v["fwd"] + v["bwd"] for k, v in parts.items() if k.split("/")[-1].startswith(("vision", "projector")))
    first = series("perf/first_step_s")
    built = series("perf/first_step_since_build_s")
    build = series("perf/build_s")
    mem = series("perf/peak_mem_gib")
    return dict(stage=stage, tokens_per_s=round(statistics.median(timed), 1) if timed else None,
                tokens_per_s_all=[round(t, 1) for t in tps], tflops=med("perf/tflops"), mfu=med("perf/mfu"),
                peak_gib=round(max(mem), 2) if mem else None,
                first_step_s=round(first[0], 2) if first else None,
                first_step_since_build_s=round(built[0], 2) if built else None,
                build_s=round(build[0], 2) if build else None,
                step_tflop=round(total / 1e12, 4), vision_share_of_flops=round(vision / total, 4) if total else None,
                flops_parts=parts, wall_s=round(wall, 1), loss=series("train/loss")[-1:] or None,
                **({"profile": rec["profile"]} if rec.get("profile") else {}))


def run_bench_fit(args) -> int:
    import torch
    from vlt.bench.common import err, is_oom
    if args.tiny:
        args.shape, args.steps = "tiny", min(args.steps, 3)
        args.max_length, args.long_length = min(args.max_length, 256), min(args.long_length, 512)
        args.num_workers = 0 if args.num_workers is None else args.num_workers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.json"
    rep = json.loads(path.read_text()) if path.is_file() else {"bench": "fit", "results": []}
    rep["machine"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rep["method"] = ("vlt fit with the shipped recipe per stage (random teacher/student of --shape, synthetic mix "
                     "shards, 1 device); medians over the steps after the first; MFU against the dense bf16 peak")
    rep["torch"] = torch.__version__
    for stage in args.stages:
        row, attempts = None, []
        tries = [()] if args.no_retry else [(), ("--model.init_args.activation_checkpointing=true",)]
        for extra in tries:
            try:
                row = run_stage(stage, args, extra)
                row["overrides"] = list(extra)
                row["set"] = list(args.set)   # the --set arguments every stage ran with (a row must say them)
                break
            except BaseException as e:  # noqa: BLE001 - an OOM or a kernel failure is a result too
                if isinstance(e, KeyboardInterrupt):
                    raise
                attempts.append(dict(overrides=list(extra), error=err(e)))
                print(f"FIT {stage} failed: {err(e)}", flush=True)
                if not is_oom(e):
                    break
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        row = row or dict(stage=stage, error=attempts[-1]["error"])
        row.update(shape=args.shape, steps=args.steps, attempts=attempts,
                   length=args.long_length if stage == "stage3_long_lora" else args.max_length)
        rep["results"] = [r for r in rep["results"] if r.get("stage") != stage] + [row]
        path.write_text(json.dumps(rep, indent=1))
        print("FIT", json.dumps({k: v for k, v in row.items() if k not in ("flops_parts", "tokens_per_s_all")}),
              flush=True)
    plot(rep, out / "fit.png")
    print_table(rep)
    return 0 if all("error" not in r for r in rep["results"] if r["stage"] in args.stages) else 1


def print_table(rep):
    print("=== SUMMARY fit ===")
    print(f"{rep['machine']}  vlt fit per stage")
    print(f"{'stage':17} {'T':>6} {'tok/s':>9} {'MFU':>6} {'TFLOP/s':>8} {'peak GiB':>9} {'1st step s':>10} error")
    for r in rep["results"]:
        f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
        print(f"{r['stage']:17} {r.get('length', 0):>6} {f('tokens_per_s', '9.0f'):>9} {f('mfu', '6.3f'):>6} "
              f"{f('tflops', '8.1f'):>8} {f('peak_gib', '9.1f'):>9} {f('first_step_s', '10.1f'):>10} "
              f"{r.get('error', '')[:70]}")


def plot(rep, path):
    from vlt.bench.common import plt
    pyplot = plt()
    rows = [r for r in rep["results"] if r.get("tokens_per_s")]
    fig, axes = pyplot.subplots(1, 4, figsize=(18, 4.2))
    names = [r["stage"] for r in rows]
    for ax, key, lab in zip(axes, ("tokens_per_s", "mfu", "peak_gib", "first_step_s"),
                            ("tokens/s", "MFU (dense bf16 peak)", "peak memory (GiB)", "time to first step (s)")):
        ax.bar(names, [r.get(key) or 0 for r in rows])
        ax.set(title=f"{lab}, {rep['machine']}", ylabel=lab)
        ax.tick_params(axis="x", rotation=20)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from vlt.bench import module_main
    return module_main("vlt bench fit", add_bench_fit_args, run_bench_fit, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
