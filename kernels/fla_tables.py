"""Shipped tile tables for fla's autotuned Triton kernels, so a fresh machine does not re-time them.

fla autotunes each of its Triton kernels on first use in a process: every candidate config of every
kernel is compiled and timed. On a fresh H200 the first optimizer step of a 4B ``vlt fit`` stage had
not come after 230-290 s (2026-12-01, the compiler still running fla's kernels), and the engine's GPU
tests spent about 70 s a case the same way. Triton's own disk cache (``TRITON_CACHE_AUTOTUNING``,
set by vlt's CLI) keeps the timings for later processes on the same machine; a new node, a CI
runner or a fresh cloud instance starts from nothing.

fla (0.6) can read each kernel's best config from ``$FLA_CONFIG_DIR/<kernel>.json`` instead
(``FLA_CACHE_MODE``; vlt uses ``strict``: an exact autotune key only, anything else is autotuned as
before, so a table can only skip timings, never pick a config for a shape it was not measured on).
This module
- points fla at ``kernels/fla_configs/<GPU name>/`` when vlt ships a table for the device's model
  (``use_shipped_tables``, called by the kernel entry points before their first fla launch); a
  user's own ``FLA_CONFIG_DIR`` / ``FLA_CACHE_MODE`` are left alone;
- writes the configs this process's autotuners picked, in fla's file format, merged into a folder
  (``dump_tables``; ``VLT_DUMP_FLA_CONFIGS=DIR`` does it at exit). A GPU session makes a table by
  running the workloads (``vlt fit`` stages, ``vlt stream``) with that variable set and committing
  the folder;
- with ``VLT_FLA_AUTOTUNE=off``, lets every fla autotuner take, for a key its table lacks, the first
  candidate config that fla's own pruning keeps for the shape, without compiling and timing the others
  (``skip_autotuning``). Every candidate computes the same op, so results are unchanged; only the speed
  of a kernel at a new shape may be below its best. Timing all candidates of a new shape costs minutes
  on a fresh machine (2026-12-01, H200: a 1.3M-parameter hybrid's first ``vlt fit`` step had not come
  after 190 s, the autotuner still compiling GDN forward candidates; fla's GPU tests waited 95 s in one
  forward), which a small model's launch-bound step never earns back. Untimed picks are not dumped.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
from pathlib import Path

log = logging.getLogger("vlt.kernels")

TABLE_ROOT = Path(__file__).parent / "fla_configs"
DUMP_ENV = "VLT_DUMP_FLA_CONFIGS"
AUTOTUNE_ENV = "VLT_FLA_AUTOTUNE"
AUTOTUNE_CHOICES = ("on", "off")
_prepared = False


def gpu_folder(device_name: str) -> str:
    """The folder name for a device model, as fla names its own config folders."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu"


def use_shipped_tables(device) -> Path | None:
    """Once per process, before fla's first kernel launch on ``device`` (CUDA): use vlt's table for
    this GPU model if it ships one; arrange the dump at exit if ``VLT_DUMP_FLA_CONFIGS`` is set.
    Returns the folder in use (None: fla autotunes as it always does)."""
    global _prepared
    import torch
    if torch.device(device).type != "cuda":
        return None  # fla's Triton kernels autotune on CUDA only
    if _prepared:
        return Path(os.environ["FLA_CONFIG_DIR"]) if "FLA_CONFIG_DIR" in os.environ else None
    _prepared = True
    if autotune_setting() == "off":
        n = skip_autotuning()
        log.info("vlt.kernels: %s=off: %d fla autotuners take their first fitting config for untabled shapes",
                 AUTOTUNE_ENV, n)
    if os.environ.get(DUMP_ENV):
        dump_at_exit(os.environ[DUMP_ENV])
    folder = TABLE_ROOT / gpu_folder(torch.cuda.get_device_name(device))
    if "FLA_CONFIG_DIR" in os.environ or "FLA_CACHE_MODE" in os.environ or not folder.is_dir():
        return None  # the user's own fla settings, or no table for this GPU: fla autotunes
    os.environ["FLA_CONFIG_DIR"], os.environ["FLA_CACHE_MODE"] = str(folder), "strict"
    cache = sys.modules.get("fla.ops.utils.cache")
    if cache is not None and hasattr(cache, "FlaCacheMode"):  # fla read the mode when it was imported
        cache.FLA_CACHE_MODE = cache.FlaCacheMode.from_env()
    log.info("vlt.kernels: fla kernel configs from %s (strict keys; others autotune)", folder)
    return folder


def dump_at_exit(folder) -> None:
    """``dump_tables(folder)`` when the process exits, also when it is ended by SIGTERM: ``timeout``,
    the GPU scripts' per-stage limit, sends it, and Python skips atexit handlers on a fatal signal, so
    a stage cut at its limit lost the picks it had paid minutes of autotuning for."""
    import signal
    import threading
    atexit.register(dump_tables, folder)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        try:
            dump_tables(folder)
        except Exception:  # the process is ending anyway; the picks are only a speed-up
            log.exception("vlt.kernels: could not write fla kernel configs to %s", folder)
        if callable(previous):
            previous(signum, frame)  # e.g. a handler that stops a run gracefully
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def autotune_setting() -> str:
    """``VLT_FLA_AUTOTUNE``: ``on`` (default; fla times every candidate of a shape it has no table
    entry for) or ``off`` (``skip_autotuning``)."""
    value = os.environ.get(AUTOTUNE_ENV, "on").strip().lower()
    if value not in AUTOTUNE_CHOICES:
        raise ValueError(f"{AUTOTUNE_ENV}={os.environ[AUTOTUNE_ENV]!r}: allowed values {list(AUTOTUNE_CHOICES)} "
                         "(off: fla's kernels take their first fitting config at shapes the shipped table lacks, "
                         "instead of compiling and timing every candidate)")
    return value


def skip_autotuning(modules=None) -> int:
    """Make fla's autotuners in ``modules`` (default: the fla modules imported) keep only the first
    config that survives their own pruning for a shape (one config: Triton neither compiles nor times
    the rest). A key already cached (a shipped table's entry, read by fla before Triton's lookup) is
    used as before. Returns the number of autotuners changed."""
    if modules is None:
        modules = [m for n, m in list(sys.modules.items()) if n == "fla" or n.startswith("fla.")]
    n = 0
    for tuner in _autotuners(modules):
        if getattr(tuner, "_vlt_untimed", False):
            continue

        def first_fitting(kwargs, _prune=tuner.prune_configs):
            return _prune(kwargs)[:1]
        tuner.prune_configs = first_fitting
        tuner._vlt_untimed = True
        n += 1
    return n


def _autotuners(modules):
    from triton.runtime.autotuner import Autotuner
    seen = set()
    for mod in modules:
        for value in list(vars(mod).values()):
            fn = value
            for _ in range(4):  # heuristics / autotune / jit wrap one another through .fn
                if isinstance(fn, Autotuner) and id(fn) not in seen:
                    seen.add(id(fn))
                    yield fn
                fn = getattr(fn, "fn", None)
                if fn is None:
                    break


def _config_dict(cfg) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "num_ctas": getattr(cfg, "num_ctas", 1), "maxnreg": getattr(cfg, "maxnreg", None),
            "ir_override": getattr(cfg, "ir_override", None)}


def collect_tables(modules=None) -> dict[str, dict]:
    """Kernel name -> fla's file contents (``autotune_entries`` keyed by fla's key hash) for every
    autotuned kernel in ``modules`` (default: the fla modules imported) that has picked a config."""
    from fla.ops.utils.cache import AutotuneKey
    if modules is None:
        modules = [m for n, m in list(sys.modules.items()) if n == "fla" or n.startswith("fla.")]
    tables: dict[str, dict] = {}
    for tuner in _autotuners(modules):
        if not tuner.cache or len(tuner.configs) <= 1 or getattr(tuner, "_vlt_untimed", False):
            continue  # never run here, nothing to choose between, or picks that were not timed
        name = getattr(tuner, "kernel_name", None) or tuner.base_fn.__name__
        entries = tables.setdefault(name, {"kernel_name": name, "autotune_entries": {}})["autotune_entries"]
        for key, cfg in tuner.cache.items():
            entries[AutotuneKey.key_hash(key)] = {"autotune_key": AutotuneKey.normalize_autotune_key(list(key)),
                                                  "config": _config_dict(cfg)}
    return tables


def dump_tables(folder, modules=None) -> list[Path]:
    """Merge this process's picks into ``folder`` (one ``<kernel>.json`` each, fla's format; an entry
    already there for the same key is replaced). Returns the files written."""
    import triton
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in sorted(collect_tables(modules).items()):
        path = folder / f"{name}.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        entries = {**old.get("autotune_entries", {}), **table["autotune_entries"]}
        path.write_text(json.dumps({"kernel_name": name, "triton_version": triton.__version__,
                                    "autotune_entries": entries}, indent=1, sort_keys=True))
        written.append(path)
    if written:
        log.info("vlt.kernels: wrote fla kernel configs of %d kernels to %s", len(written), folder)
    return written
