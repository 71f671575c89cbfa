"""Skipping optimizer steps whose loss or gradients are not finite.

One nan/inf step must not poison a run: without this guard AdamW writes nan into every weight and
moment, every later loss is nan, and checkpoint rotation replaces the last finite checkpoint with
nan ones while the run exits 0.

``NonFiniteGuard.check`` runs in ``on_before_optimizer_step`` (after backward and, under
16-mixed, after the GradScaler has unscaled the gradients; before clipping and the step). When the
loss or the total gradient norm is not finite on *any* rank (the flag is all-reduced, so DDP and
FSDP ranks, whose gradients are shards, agree), every gradient is set to None: torch optimizers
leave parameters without a gradient untouched, weights, moments and their step counts included, so
the step is skipped exactly as if that batch had not been drawn (the batch still counts as
consumed, and the LR scheduler and ``global_step`` advance, as with GradScaler's skipped steps).
The skip is counted (``train/skipped_nonfinite``) and logged with the step; after
``max_consecutive`` skips in a row the run stops with ``NonFiniteLossError``, leaving the
checkpoints already written in place. ``assert_finite_weights`` refuses to write a checkpoint from
non-finite weights. Deciding to skip needs the flag on the host: one scalar synchronisation per step.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("vlt")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops instead of training on nothing."""


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on at least one rank (MAX all-reduce; no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    # gloo reduces CPU tensors, nccl CUDA ones (also when FSDP offloads the gradients to the CPU)
    if dist.get_backend() == "gloo":
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = device
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _local_value(t):
    """A DTensor (FSDP2) -> its local shard; anything else unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


class NonFiniteGuard:
    def __init__(self, max_consecutive: int = 10):
        if int(max_consecutive) < 1:
            raise ValueError(f"max_nonfinite_skips={max_consecutive} must be >= 1 (consecutive non-finite steps "
                             "skipped before the run stops)")
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0  # total, kept in checkpoints
        self.consecutive = 0
        self.loss: torch.Tensor | None = None  # set by training_step

    def record_loss(self, loss) -> None:
        self.loss = loss.detach() if isinstance(loss, torch.Tensor) else None

    def check(self, params, step: int, grad_scaler: bool = False) -> tuple[bool, torch.Tensor | None]:
        """Skip (clear the gradients) when the loss or the gradient norm is non-finite on any rank.

        ``grad_scaler``: a GradScaler (16-mixed) is active; an overflowing gradient with a finite loss
        is then its business (it skips that step and lowers its scale), not a non-finite step.
        Returns (skipped, total gradient norm of this rank's gradients or None)."""
        params = list(params)
        grads = [_local_value(p.grad) for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        device = grads[0].device if grads else (self.loss.device if self.loss is not None else torch.device("cpu"))
        bad_loss = self.loss is not None and not bool(torch.isfinite(self.loss).all())
        bad_grad = norm is not None and not grad_scaler and not bool(torch.isfinite(norm))
        self.loss = None
        if not _any_rank(bad_loss or bad_grad, device):
            self.consecutive = 0
            return False, norm
        for p in params:
            p.grad = None
        self.skipped += 1
        self.consecutive += 1
        what = "loss" if bad_loss else ("gradient norm" if bad_grad else "loss or gradient norm on another rank")
        log.warning("step %d: non-finite %s; optimizer step skipped, weights and optimizer state unchanged "
                    "(%d skipped in total, %d in a row, the run stops at max_nonfinite_skips=%d in a row)",
                    step, what, self.skipped, self.consecutive, self.max_consecutive)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"step {step}: {self.consecutive} consecutive steps had a non-finite loss or gradient norm "
                f"(max_nonfinite_skips={self.max_consecutive}); stopping. Weights were not updated by those steps and "
                "the checkpoints already written are kept. Look for the cause in the data (the logged sample ids) or "
                "the learning rate; resume with --ckpt_path last")
        return True, norm

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def assert_finite_weights(module: torch.nn.Module) -> None:
    """Raise before a checkpoint is written from non-finite weights (checked on every rank's shard,
    agreed by all-reduce, since every rank builds the checkpoint)."""
    bad = [n for n, p in module.named_parameters()
           if p.is_floating_point() and not bool(torch.isfinite(_local_value(p)).all())]
    device = next(module.parameters()).device
    if _any_rank(bool(bad), device):
        raise NonFiniteLossError(f"refusing to write a checkpoint: non-finite weights in {bad[:5] or 'another rank'}; "
                                 "the previous checkpoints are kept")
