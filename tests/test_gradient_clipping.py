"""The recipes' gradient clipping (gradient_clip_val 1.0) where Lightning's own clipping refuses:
- fused AdamW (the default on CUDA): Lightning's mixed-precision plugin refuses to clip for an
  optimizer that unscales gradients itself, also under bf16-mixed where nothing is scaled, so the
  InfiniteVL recipes (bf16-mixed) failed at their first step on a GPU (found on the H200). vlt clips itself when there
  is no GradScaler; these run the fused kernel on the CPU.
- FSDP (the README's multi-GPU command): clipping by norm goes through the root FSDP module."""
import copy

import lightning as L
import pytest
import torch

from vlt.training import InstructionTuning

TINY = {"decoder": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2}}


@pytest.fixture(scope="module")
def batches(color_batches):
    data, tokens = color_batches
    return data[:3], tokens


def trained(batches, precision="bf16-mixed", plugins=None, **kw):
    data, tokens = batches
    torch.manual_seed(0)
    clip = kw.pop("gradient_clip_val", 0.05)
    module = InstructionTuning(model_name="tiny-hybrid", model=TINY, tokens=tokens, lr=3e-3, schedule="constant", **kw)
    loader = torch.utils.data.DataLoader(copy.deepcopy(data), batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(max_steps=len(data), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        precision=None if plugins else precision, plugins=plugins, gradient_clip_val=clip,
                        enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=loader)
    return trainer, {n: p.detach().clone() for n, p in module.model.named_parameters()}


def max_rel_diff(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-12)).item() for n in a)


def test_fused_adamw_clips_under_bf16_mixed_like_the_unfused_optimizer(batches):
    trainer, fused = trained(batches, fused_adamw=True)
    assert trainer.optimizers[0].defaults["fused"] is True and trainer.global_step == 3
    _, plain = trained(batches, fused_adamw=False)       # Lightning's own clipping path
    _, unclipped = trained(batches, fused_adamw=True, gradient_clip_val=0)
    # fused and foreach AdamW round differently (bf16 autocast forward on top): a loose tolerance,
    # far below the difference that clipping at 0.05 makes
    assert max_rel_diff(fused, plain) < 2e-3
    assert max_rel_diff(unclipped, plain) > 10 * max(max_rel_diff(fused, plain), 1e-4)


def test_fused_adamw_with_a_grad_scaler_and_clipping_is_a_clear_error(batches):
    from lightning.pytorch.plugins.precision import MixedPrecision
    # 16-mixed as on a GPU (Lightning turns precision="16-mixed" into bf16 on the CPU): a GradScaler
    scaled = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    with pytest.raises(ValueError, match="fused_adamw.*16-mixed.*gradient_clip_val"):
        trained(batches, plugins=scaled, fused_adamw=True)
    trainer, _ = trained(batches, plugins=scaled, gradient_clip_val=0)  # no clipping: the default stays unfused
    assert not trainer.optimizers[0].defaults["fused"]


def test_under_fsdp_the_norm_is_clipped_by_the_root_fsdp_module(batches, monkeypatch):
    """Lightning's FSDP precision plugin refuses norm clipping (Lightning issue #19235) and
    torch.nn.utils.clip_grad_norm_ would see one rank's shards only: the root FSDP module's
    clip_grad_norm_ takes the norm over all of them. Lightning runs FSDP on GPUs only, so the
    dispatch is checked with a stand-in trainer; value clipping stays with Lightning."""
    import types

    from lightning.pytorch.plugins.precision import FSDPPrecision
    _, tokens = batches
    module = InstructionTuning(model_name="tiny-hybrid", model=TINY, tokens=tokens)
    calls = []
    root = types.SimpleNamespace(clip_grad_norm_=lambda v: calls.append(v))
    plugin = FSDPPrecision("bf16-mixed")
    trainer = types.SimpleNamespace(precision_plugin=plugin, strategy=types.SimpleNamespace(model=root),
                                    gradient_clip_val=None, gradient_clip_algorithm=None)
    monkeypatch.setattr(module, "_trainer", trainer)
    opt = torch.optim.AdamW(module.parameters())
    module.configure_gradient_clipping(opt, 1.0, "norm")
    module.configure_gradient_clipping(opt, 1.0, None)     # the Trainer's default algorithm is norm
    module.configure_gradient_clipping(opt, 0.0, "norm")   # no clipping asked
    assert calls == [1.0, 1.0]
    p = next(module.parameters())
    p.grad = torch.full_like(p, 5.0)
    module.configure_gradient_clipping(opt, 0.5, "value")  # local: Lightning's plugin clamps each grad
    assert calls == [1.0, 1.0] and p.grad.abs().max().item() <= 0.5
