"""The ``vlt`` command: a LightningCLI (fit / validate / test / predict) plus tool subcommands.

    vlt fit                                   # the embedded quickstart recipe
    vlt fit --config recipes/layouts/hybrid_1to3.yaml --trainer.max_steps 100
    vlt fit --config a.yaml --config b.yaml   # merged in order; omegaconf ${...} interpolation
    vlt fit --config quickstart --print_config
    vlt fit ... --ckpt_path last              # resume the newest run's last.ckpt
    vlt fit --import mypkg.mixers ...         # import user modules first (or `imports:` in a recipe)
    vlt data synth|pack|inspect ...   vlt generate --ckpt DIR ...   vlt eval --ckpt DIR --data SHARDS
    vlt bench mixers|data|train|fit|infer|stream|decode-kernels ...
    vlt mixers   vlt recipes   vlt --version   vlt --help (every subcommand)

``--config NAME`` also finds recipes shipped with vlt by name (``quickstart``,
``infinitevl/stage2_sft``). The resolved config is saved as ``config.yaml`` in the run directory,
and ``vlt fit --config that/config.yaml`` re-runs it. A config mistake is one line naming the key
path and the fix (vlt.cli_errors); ``VLT_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Optional

TOOLS = ("data", "bench", "generate", "chat", "stream", "eval", "compare", "export", "mixers", "recipes")
LIGHTNING_SUBCOMMANDS = {"fit": "train a model (the quickstart without --config)",
                         "validate": "evaluate on the validation split", "test": "evaluate on the test split",
                         "predict": "generate answers, written as JSONL (id, prompt, prediction, target)"}
RECIPES = Path(__file__).resolve().parent / "recipes"
if not RECIPES.is_dir():  # editable install / source checkout: recipes/ sits beside vlt/
    RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name: str) -> str:
    """A path as given, or a shipped recipe by name (with or without .yaml)."""
    if Path(name).is_file():
        return name
    for cand in (RECIPES / name, RECIPES / f"{name}.yaml"):
        if cand.is_file():
            return str(cand)
    return name  # let the parser report the missing file


def _rewrite_argv(argv: list[str]) -> list[str]:
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--import" and i + 1 < len(argv):  # one module per flag, appended to `imports:`
            out.append(f"--imports+={argv[i + 1]}")
            i += 2
            continue
        if a in ("--config", "-c") and i + 1 < len(argv):
            out += [a, find_recipe(argv[i + 1])]
            i += 2
            continue
        if a.startswith("--import="):
            out.append("--imports+=" + a.split("=", 1)[1])
        elif a.startswith("--config="):
            out.append("--config=" + find_recipe(a.split("=", 1)[1]))
        elif a == "--ckpt_path" and i + 1 < len(argv) and argv[i + 1] in RESUME_KEYWORDS:
            out += find_last_checkpoint(argv, argv[i + 1])
            i += 2
            continue
        elif a.startswith("--ckpt_path=") and a.split("=", 1)[1] in RESUME_KEYWORDS:
            out += find_last_checkpoint(argv, a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    sub = out[0] if out else None
    has_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in out)
    if sub == "fit" and not has_config and not any(a.startswith("--model") for a in out):
        print(f"vlt: no --config given; using the embedded quickstart recipe ({RECIPES / 'quickstart.yaml'})",
              file=sys.stderr)
        out[1:1] = ["--config", str(RECIPES / "quickstart.yaml")]
    return out


RESUME_KEYWORDS = ("last", "last_or_none")


def find_last_checkpoint(argv: list[str], keyword: str = "last") -> list[str]:
    """``--ckpt_path last|last_or_none`` -> the arguments that resume the newest checkpoint.

    Lightning resolves ``last`` only inside the new run's own (empty) version directory, so vlt takes
    the checkpoint with the highest step under the root directory's runs (any version folder; torn
    temporaries never count). ``fit`` then writes its checkpoints into that checkpoint's folder, so a
    resumed run keeps rotating the same files instead of adding two more per launch. With
    ``last_or_none`` and no checkpoint yet the run starts fresh (one restart command for
    preemptible jobs); with ``last`` that is an error."""
    from vlt.checkpoint.lightning import newest_checkpoint

    root = "."
    for i, a in enumerate(argv):
        if a.startswith("--trainer.default_root_dir"):
            root = a.split("=", 1)[1] if "=" in a else argv[i + 1]
    found = newest_checkpoint(root)
    if found is None:
        if keyword == "last_or_none":
            print(f"vlt: --ckpt_path last_or_none: no checkpoint under {os.path.abspath(root)}/**/checkpoints/ yet; "
                  "starting fresh", file=sys.stderr)
            return []
        raise SystemExit(f"vlt: --ckpt_path last: no checkpoint under {os.path.abspath(root)}/**/checkpoints/; "
                         "give the checkpoint path explicitly, or use --ckpt_path last_or_none to start fresh "
                         "when there is none")
    path, step = found
    print(f"vlt: resuming from {path} (step {step})", file=sys.stderr)
    out = ["--ckpt_path", str(path)]
    if argv and argv[0] == "fit" and not any(a.startswith("--checkpoint.dirpath") for a in argv):
        out += ["--checkpoint.dirpath", str(path.parent.resolve())]
        # the files found there are this run's own: overwrite last.ckpt (atomically) instead of adding last-v1.ckpt
        if not any(a.startswith("--checkpoint.enable_version_counter") for a in argv):
            out += ["--checkpoint.enable_version_counter", "false"]
    return out


def token_info(datamodule) -> dict:
    tok = datamodule.tokenizer
    return dict(vocab_size=tok.vocab_size, image_token_id=tok.image_pad_id, video_token_id=tok.video_pad_id,
                vision_start_token_id=tok.vision_start_id, pad_token_id=tok.pad_id)


def lightning_main():
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.cli import LightningCLI

    from vlt.checkpoint.lightning import AtomicCheckpointIO
    from vlt.cli_errors import UserConfigError, argument_error_message, debug, instantiation_error_message
    from vlt.layers.registry import import_user_modules
    from vlt.layout import check_backends
    from vlt.predict import PredictionWriter
    from vlt.run_config import RunConfigCallback
    from vlt.training import VLTModule
    from vlt.training.strategies import register_strategies
    from vlt.data.datamodule import VLTDataModule

    register_strategies()

    class VLTCLI(LightningCLI):
        def init_parser(self, **kwargs):
            # No prefix matching (`--trainer.max_step` is not `max_steps`), and parse errors raised to
            # main, which prints one line instead of the 60-line usage.
            kwargs.setdefault("allow_abbrev", False)
            kwargs.setdefault("exit_on_error", False)
            return super().init_parser(**kwargs)

        def parse_arguments(self, parser, args):
            try:
                super().parse_arguments(parser, args)
            except argparse.ArgumentError as e:
                if debug():
                    raise
                sub = next((a for a in sys.argv[1:2] if a in self.subcommands()), None)
                target = self._subcommand_parsers.get(sub, parser) if sub else parser
                raise UserConfigError(argument_error_message(e, target, f"vlt {sub or ''}".strip())) from None

        def instantiate_classes(self):
            cfg = self.config.get(str(self.subcommand), self.config)
            try:
                import_user_modules(cfg.get("imports"), "imports")  # before the layout names their mixers
                super().instantiate_classes()
                vlm = getattr(self.model, "model", None)
                if vlm is not None and hasattr(vlm, "config"):  # a backend that cannot run on this device
                    check_backends(vlm.config.layers(), self.trainer.strategy.root_device)
            except (ValueError, TypeError, FileNotFoundError) as e:
                msg = None if debug() else instantiation_error_message(e)
                if msg is None:
                    raise
                raise UserConfigError(msg) from None

        def add_arguments_to_parser(self, parser):
            parser.add_argument("--imports", type=Optional[list[str]], default=None,
                                help="modules to import before the model is built (your own mixers); "
                                     "--import MODULE appends one")
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
            parser.add_lightning_class_args(PredictionWriter, "predictions")
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 100,
                                 "lr_monitor.logging_interval": "step"})
            # Derived values come from the data module's tokenizer, never typed by hand twice.
            parser.link_arguments("data", "model.init_args.tokens", compute_fn=token_info, apply_on="instantiate")

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            from vlt.training.progress import steps_bar
            for i, cb in enumerate(trainer.callbacks):   # Lightning's default bar -> counted in optimizer steps
                bar = steps_bar(cb)
                if bar is not None:
                    trainer.callbacks[i] = bar
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # sharded FSDP keeps its own
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

    trainer_defaults = {
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": ".", "name": "lightning_logs"}},
        "log_every_n_steps": 10,
    }
    return VLTCLI(VLTModule, VLTDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  parser_kwargs={"parser_mode": "omegaconf"}, save_config_kwargs={"overwrite": True},
                  save_config_callback=RunConfigCallback,
                  trainer_defaults=trainer_defaults, auto_configure_optimizers=False)


def version() -> str:
    import vlt
    return vlt.__version__


def tool_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlt", description="vlt: vision-language models with pluggable token mixers, on PyTorch Lightning. "
        "`vlt fit` runs the quickstart; `vlt SUBCOMMAND --help` shows each one's options.")
    parser.add_argument("--version", "-V", action="version", version=f"vlt {version()}")
    sub = parser.add_subparsers(dest="tool", required=True, metavar="SUBCOMMAND")
    for name, help_ in LIGHTNING_SUBCOMMANDS.items():  # dispatched to LightningCLI by main(), listed here
        sub.add_parser(name, help=f"{help_} (LightningCLI: vlt {name} --help)", add_help=False)
    p = sub.add_parser("mixers", help="list the registered token mixers and their options")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module first (your own @register_mixer classes)")
    p.set_defaults(func=_run_mixers)
    sub.add_parser("recipes", help="list the recipes shipped with vlt (vlt fit --config NAME)").set_defaults(
        func=lambda a: __import__("vlt.catalog", fromlist=["print_recipes"]).print_recipes(a))
    chosen = argv[0] if argv else None
    data = sub.add_parser("data", help="write, convert and inspect WebDataset shards")
    if chosen == "data":
        from vlt.data.cli import add_data_subcommands
        add_data_subcommands(data.add_subparsers(dest="data_cmd", required=True))
    bench = sub.add_parser("bench", help="benchmarks writing JSON + PNG")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    chosen_bench = argv[1] if chosen == "bench" and len(argv) > 1 else None
    for name, module, add, run, help_ in BENCH_TOOLS:
        _tool_parser(bsub, name, help_, (module, add, run) if name == chosen_bench else None, "bench " + name)
    for name, module, add, run, help_ in MODEL_TOOLS:
        _tool_parser(sub, name, help_, (module, add, run) if name == chosen else None, name)
    args = parser.parse_args(argv)
    rc = args.func(args)
    return rc if isinstance(rc, int) else 0


# (name, module, its add-args and run functions, help). A tool's module is imported only when that
# tool runs: importing them all (Lightning, timm, the benchmarks) cost seconds before every command.
BENCH_TOOLS = (
    ("data", "vlt.data.bench", "add_bench_data_args", "bench_data", "data loader samples/s and tokens/s"),
    ("mixers", "vlt.bench.mixers", "add_bench_mixers_args", "run_bench_mixers",
     "fwd+bwd and decode time of each mixer vs its raw kernel (GPU)"),
    ("train", "vlt.bench.train", "add_bench_train_args", "run_bench_train",
     "training tokens/s, peak memory, MFU per layout and length"),
    ("fit", "vlt.bench.fit", "add_bench_fit_args", "run_bench_fit",
     "the InfiniteVL stages through vlt fit: tokens/s, MFU, memory"),
    ("infer", "vlt.bench.infer", "add_bench_infer_args", "run_bench_infer",
     "prefill time, decode latency and memory vs context"),
    ("stream", "vlt.bench.stream", "add_bench_stream_args", "run_bench_stream",
     "video stream FPS and memory per frame index"),
    ("decode-kernels", "vlt.bench.decode_kernels", "add_bench_decode_kernels_args", "run_bench_decode_kernels",
     "the fused GDN decode step and the batch-1 GEMV per shape, against cuBLAS (GPU)"))
MODEL_TOOLS = (
    ("generate", "vlt.generate_cli", "add_generate_args", "run_generate", "one answer from a saved model"),
    ("chat", "vlt.chat_cli", "add_chat_args", "run_chat",
     "interactive multi-turn chat with a saved model (images too)"),
    ("stream", "vlt.stream_cli", "add_stream_args", "run_stream",
     "stream a video through a saved model and ask about it"),
    ("eval", "vlt.eval_cli", "add_eval_args", "run_eval",
     "generate answers on shards or a LLaVA JSONL and score them (JSON + MD + PNG)"),
    ("compare", "vlt.compare_cli", "add_compare_args", "run_compare",
     "train layouts at an equal parameter budget, evaluate each, table + plot with intervals"),
    ("export", "vlt.checkpoint.cli", "add_export_args", "run_export",
     "a .ckpt -> a model directory for vlt generate / init_from"))


def _tool_parser(sub, name: str, help_: str, impl, label: str):
    """The subparser of one tool; ``impl`` (module, add-args, run) only for the tool being run."""
    p = sub.add_parser(name, help=help_)
    if impl is None:
        return
    module, add, run = impl
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"vlt {label} needs the package {e.name!r}, which is not installed here ({e}); "
                         "install vlt's dependencies (pip install -e .) or the one named") from None
    getattr(mod, add)(p)
    p.set_defaults(func=getattr(mod, run))


def _run_mixers(args) -> int:
    from vlt.catalog import print_mixers
    from vlt.layers.registry import import_user_modules
    import_user_modules(args.imports, "--import")
    return print_mixers(args)


def main(argv: list[str] | None = None):
    from vlt.cli_errors import UserConfigError, report
    argv = list(sys.argv[1:] if argv is None else argv)
    # Triton keeps autotuning results on disk beside its compiled kernels, so a second `vlt generate`
    # (or fit) does not re-time every tile of every kernel (its own opt-in knob; off by default)
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        if not argv or argv[0] in TOOLS or argv[0].startswith("-"):  # --help / --version list everything
            return tool_main(argv or ["--help"])
        # LightningCLI reads sys.argv, and Lightning's DDP launcher re-runs this command from sys.argv for
        # ranks > 0, so the rewritten arguments (recipe paths, resolved `last`) go there for both.
        sys.argv = [sys.argv[0], *_rewrite_argv(argv)]
        lightning_main()
    except UserConfigError as e:
        report(str(e))
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
