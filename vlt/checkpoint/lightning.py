"""Lightning checkpoints (``.ckpt``) of ``vlt fit``: writing them safely, and reading model weights +
config back from them (they carry the model config and layout) or from an export directory
(``vlt.checkpoint.export``: ``vlt_config.json`` + ``model.safetensors``).

Checkpoint writes go through ``AtomicCheckpointIO``: written beside the target as
``.<name>.tmp-<pid>``, fsynced, then renamed, so a crash mid-write never replaces a good checkpoint
with a torn one. Before writing it compares the checkpoint's size (its tensors' bytes, which is
what dominates a torch zip file) with the free space of the directory, and a write that fails for
lack of space (torch reports it as ``basic_ios::clear`` or ``unexpected pos``) becomes a
``CheckpointSpaceError`` naming the directory, the bytes needed and free, and the fixes. Torn
temporary files of dead processes (a kill -9 mid-write) are removed at the next write.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("vlt")

# torch.save's zip writer adds a few hundred bytes per tensor plus the pickled metadata; the margin
# covers that and what other writers take from the disk meanwhile.
SPACE_MARGIN_BYTES = 16 * 2**20
SPACE_MARGIN_FRACTION = 0.02
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


class CheckpointSpaceError(OSError):
    """Not enough free space for a checkpoint; the message says how much and what to do."""


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable through dicts/lists/tuples (a checkpoint's size estimate)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def space_message(path: Path, needed: int, free: int, weights_bytes: int | None) -> str:
    weights = f" (about {_fmt(weights_bytes)} here)" if weights_bytes else ""
    return (f"no space left for checkpoint {str(path)!r}: it needs about {needed:,} bytes ({_fmt(needed)}), "
            f"{str(path.parent)!r} has {free:,} bytes ({_fmt(free)}) free. The previous checkpoint is intact. "
            f"Fixes: free space there, or write checkpoints elsewhere (--trainer.default_root_dir DIR or "
            f"--checkpoint.dirpath DIR on a larger disk), or make them smaller: --checkpoint.save_weights_only=true "
            f"drops the optimizer state{weights}; for LoRA runs lora.adapter_only_checkpoint: true saves the "
            f"adapters only")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_torn_temporaries(directory: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` files left by checkpoint writers that are no longer running."""
    removed = []
    if not directory.is_dir():
        return removed
    for f in directory.iterdir():
        m = _TMP_RE.match(f.name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            try:
                f.unlink()
                removed.append(f)
            except OSError:
                pass
    if removed:
        log.warning("removed %d torn checkpoint file(s) of killed writers: %s", len(removed), [p.name for p in removed])
    return removed


def _looks_like_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left", "basic_ios::clear", "unexpected pos", "file write failed"))


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path: _PATH, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_torn_temporaries(path.parent)
        needed = int(tensor_bytes(checkpoint) * (1 + SPACE_MARGIN_FRACTION)) + SPACE_MARGIN_BYTES
        free = shutil.disk_usage(path.parent).free
        weights = tensor_bytes(checkpoint.get("state_dict", {})) if isinstance(checkpoint, dict) else None
        if needed > free:
            raise CheckpointSpaceError(errno.ENOSPC, space_message(path, needed, free, weights))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (RuntimeError, OSError) as e:
            if _looks_like_disk_full(e):
                if tmp.exists():
                    tmp.unlink()  # free the space before measuring what is left
                free = shutil.disk_usage(path.parent).free
                raise CheckpointSpaceError(errno.ENOSPC, space_message(path, needed, free, weights)) from e
            raise
        finally:
            if tmp.exists():
                tmp.unlink()


def load_model_state(path: str | os.PathLike, role: str = "init_from") -> tuple[dict, dict[str, torch.Tensor]]:
    """(VLMConfig dict, model state dict) from a vlt .ckpt or an exported directory.

    ``role`` ("init_from" or "teacher") names the option in errors."""
    p = Path(path).expanduser()
    accepted = ("a .ckpt written by `vlt fit` (lightning_logs/version_N/checkpoints/) or a directory saved by "
                "`vlt export`")
    if role == "teacher":
        accepted += ", or a Qwen2.5-VL directory saved by transformers (config.json + *.safetensors)"
    if not p.exists():
        raise FileNotFoundError(f"{role} {str(p)!r} does not exist; give {accepted}")
    if p.is_dir():  # an export directory (vlt.checkpoint.export): tied weights restored, format checked there
        if not (p / "vlt_config.json").is_file():
            raise FileNotFoundError(f"{role} {str(p)!r} is a directory without vlt_config.json; give {accepted}")
        from vlt.checkpoint.export import read_state
        meta, state = read_state(p)
        return meta["model"], state
    try:
        # memory-mapped: only the model's tensors are read, not the optimizer state beside them (for a
        # 4B stage checkpoint about as large again), and they are paged in as load_state_dict copies them
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torn zip, wrong format, pickle error: say which file
        raise ValueError(f"{role} {str(p)!r} could not be read as a checkpoint ({type(e).__name__}: {e}); it may be "
                         f"truncated (an interrupted copy or write) or not a checkpoint at all; give {accepted}") from e
    if not isinstance(ckpt, dict) or "vlt_config" not in ckpt:
        raise ValueError(f"{role} {str(p)!r} was not written by vlt (no 'vlt_config' entry): its layout is unknown")
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return ckpt["vlt_config"], state


def describe_mismatch(expected: dict, found: dict) -> str | None:
    """A readable reason why two model configs cannot share weights, or None."""
    from vlt.config import VLMConfig
    a, b = VLMConfig.from_dict(expected), VLMConfig.from_dict(found)
    la, lb = [n for n, _ in a.layers()], [n for n, _ in b.layers()]
    if la != lb:
        return f"layout differs: this recipe has {la}, the checkpoint has {lb}"
    for key in ("hidden_size", "intermediate_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(a.decoder, key) != getattr(b.decoder, key):
            return f"decoder.{key} differs: recipe {getattr(a.decoder, key)}, checkpoint {getattr(b.decoder, key)}"
    for i, ((_, oa), (_, ob)) in enumerate(zip(a.layers(), b.layers())):
        if oa != ob:
            diff = {k: (oa.get(k), ob.get(k)) for k in set(oa) | set(ob) if oa.get(k) != ob.get(k)}
            return f"layer {i} options differ (recipe, checkpoint): {diff}"
    return None


# ---- `--ckpt_path last`: the newest complete checkpoint by step, across version folders ----------
_STEP_RE = re.compile(r"(?:^|[-_])step=(\d+)")


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint was written at: from ``step=N`` in its name (ModelCheckpoint's
    default), else from the file (memory-mapped, so the tensors are not read). None: unreadable."""
    m = _STEP_RE.search(path.stem)
    if m:
        return int(m.group(1))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(ckpt.get("global_step", 0))
    except Exception as e:  # a torn or foreign file is not a resume candidate
        log.warning("ignoring unreadable checkpoint %s (%s: %s)", path, type(e).__name__, e)
        return None


def newest_checkpoint(root: str | os.PathLike) -> tuple[Path, int] | None:
    """(path, step) of the checkpoint to resume under ``root/**/checkpoints/``: the run folder whose
    newest complete checkpoint was written last, and in it the checkpoint with the highest step
    (ties: the newer file). So a ``last.ckpt`` torn by a kill loses to the complete
    ``epoch=..-step=N.ckpt`` beside it, an older run's folder never wins over the run that wrote
    last, and torn temporaries (``.*.tmp-PID``) are never candidates."""
    folders: dict[Path, list[tuple[int, float, Path]]] = {}
    for p in Path(root).glob("**/checkpoints/*.ckpt"):
        if p.name.startswith(".") or not p.is_file():
            continue
        step = checkpoint_step(p)
        if step is not None:
            folders.setdefault(p.parent, []).append((step, p.stat().st_mtime, p))
    if not folders:
        return None
    newest = max(folders.values(), key=lambda c: max(m for _, m, _ in c))
    step, _, path = max(newest, key=lambda c: (c[0], c[1]))
    return path, step
