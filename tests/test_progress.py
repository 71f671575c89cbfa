"""The training bar counts optimizer steps against max_steps (Lightning's counted the epoch's
batches: "Epoch 0/-2" and "100/50" after a resume mid-epoch)."""
from types import SimpleNamespace

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from vlt.training.progress import StepRichProgressBar, StepTQDMProgressBar, steps_bar


def _attach(bar, **trainer):
    bar._trainer = SimpleNamespace(**trainer)
    return bar


def test_step_bars_count_optimizer_steps_against_max_steps():
    resumed = dict(max_steps=50, max_epochs=-1, num_training_batches=7, global_step=30, current_epoch=4)
    for cls in (StepRichProgressBar, StepTQDMProgressBar):
        bar = _attach(cls(), **resumed)
        assert bar.total_train_batches == 50          # not the epoch's 7 batches, not 50 - 30 remaining
    rich = _attach(StepRichProgressBar(), **resumed)
    assert rich._get_train_description(4).strip() == "step"   # not "Epoch 4/-2"
    # an epoch-bounded run keeps Lightning's epoch count
    epochs = _attach(StepRichProgressBar(), max_steps=-1, max_epochs=3, num_training_batches=7, global_step=0,
                     current_epoch=1)
    assert epochs.total_train_batches == 7 and epochs._get_train_description(1).startswith("Epoch 1/2")


def test_lightnings_default_bars_are_swapped_and_custom_ones_kept():
    assert type(steps_bar(RichProgressBar(refresh_rate=3))) is StepRichProgressBar
    assert steps_bar(RichProgressBar(refresh_rate=3)).refresh_rate == 3
    assert type(steps_bar(TQDMProgressBar())) is StepTQDMProgressBar

    class Mine(TQDMProgressBar):
        pass
    assert steps_bar(Mine()) is None and steps_bar(object()) is None
