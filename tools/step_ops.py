"""Count the aten ops of one training step of ``vlt fit``, by module (forward) and by op: a device-free
proxy for how launch-bound a small model's step is on a GPU (each op is at least one kernel launch there).

  PYTHONPATH=tools vlt fit ... --trainer.max_steps=2 '--trainer.callbacks+=step_ops.StepOps'

prints the counts of the second step (the first one builds caches). On 2026-12-02 (CPU, the phenomena
study's needle hybrid with torch kernels, 32 rows of 1,024 tokens, 32 frames a sample) it gave 20,446 ops a
step before packed sequences were padded with one gather and the vision tower's per-image slices were
removed, and 7,775 after, with equal losses."""
import collections

from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self, where):
        super().__init__()
        self.where, self.by_module, self.by_op = where, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_module[self.where[-1] if self.where else "(backward, optimizer, loss)"] += 1
        self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class StepOps(Callback):
    def __init__(self, step: int = 1, depth: int = 4):
        self.step, self.depth, self.where = step, depth, []

    def setup(self, trainer, pl_module, stage):
        def leave(mod, args, out):   # returns None: a forward hook's return value would replace the output
            self.where.pop()
        for name, mod in pl_module.named_modules():
            if name and len(name.split(".")) <= self.depth:
                mod.register_forward_pre_hook(lambda m, a, name=name: self.where.append(name))
                mod.register_forward_hook(leave)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.step:
            self.mode = _Count(self.where)
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.step:
            self.mode.__exit__(None, None, None)
            print(f"step_ops: {sum(self.mode.by_module.values())} aten ops in step {batch_idx} (forward, backward, "
                  "optimizer)")
            for k, v in self.mode.by_module.most_common(20):
                print(f"{v:8d} {k}")
            for k, v in self.mode.by_op.most_common(20):
                print(f"{v:8d} aten::{k}")
