"""Fixtures shared by several test modules.

``teacher_dir``: a tiny random Qwen2.5-VL checkpoint written by ``vlt.testing.make_tiny_teacher``
(4 layers, seed 0, byte tokenizer). Module-scoped, as each module's own copy was: every module gets a
fresh directory, so a test that edits its files cannot leak into another module.

``color_batches``: the first 6 collated batches (2 rows each) of 48 synthetic ``color`` samples at
28 px, and the token ids the CLI links into a module (``token_info``), for tests that drive a
tiny module through a Trainer."""
import pytest


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    # imported here, not at the top: a conftest import runs for every test module, and some tests
    # check in-process that transformers is not imported where it need not be
    from vlt.testing import make_tiny_teacher
    return make_tiny_teacher(tmp_path_factory.mktemp("qwen") / "tiny", num_layers=4)


@pytest.fixture(scope="module")
def color_batches(tmp_path_factory):
    from vlt.cli import token_info
    from vlt.data.datamodule import VLTDataModule
    from vlt.data.shards import write_synthetic
    d = tmp_path_factory.mktemp("color") / "color"
    write_synthetic(str(d), "color", 48, seed=0, image_size=28)
    dm = VLTDataModule(train_shards=str(d), max_length=96, batch_size=2, num_workers=0)
    dm.setup("fit")
    return [b for _, b in zip(range(6), dm.train_dataloader())], token_info(dm)
