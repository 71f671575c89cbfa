"""Mid-epoch resume through a real Lightning checkpoint: the resumed run sees the same batches."""

import lightning as L
import torch

from vlt.data.datamodule import VLTDataModule
from vlt.data.shards import write_synthetic


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(batch["sample_ids"])))
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=list(callbacks), default_root_dir=str(tmp_path),
                     enable_checkpointing=bool(callbacks), limit_val_batches=0, num_sanity_val_steps=0)


def test_resume_from_mid_epoch_checkpoint(tmp_path):
    shards = tmp_path / "s"
    write_synthetic(str(shards), "color", 40, seed=0, maxcount=10)
    dm_args = dict(train_shards=str(shards), max_length=256, batch_size=2, num_workers=2, pack=True)
    ref = Recorder()
    _trainer(tmp_path / "a", 14).fit(ref, datamodule=VLTDataModule(**dm_args))
    n_epoch = len([s for e, s in ref.seen if e == 0])
    assert 3 < n_epoch < 14  # the run crosses an epoch boundary
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=3, save_top_k=-1)
    first = Recorder()
    _trainer(tmp_path / "b", 3, [ck]).fit(first, datamodule=VLTDataModule(**dm_args))
    ckpt = tmp_path / "ck" / "epoch=0-step=3.ckpt"
    saved = torch.load(ckpt, weights_only=False)["VLTDataModule"]
    assert saved["epoch"] == 0 and saved["batches_consumed"] == 3
    resumed = Recorder()
    _trainer(tmp_path / "c", 14).fit(resumed, datamodule=VLTDataModule(**dm_args), ckpt_path=str(ckpt))
    assert first.seen + resumed.seen == ref.seen
