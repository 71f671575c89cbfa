"""Fixtures shared by several test modules.

``teacher_dir``: a tiny random Qwen2.5-VL checkpoint written by ``vlt.testing.make_tiny_teacher``
(4 layers, seed 0, byte tokenizer). Module-scoped, as each module's own copy was: every module gets a
fresh directory, so a test that edits its files cannot leak into another module."""
import pytest


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    # imported here, not at the top: a conftest import runs for every test module, and some tests
    # check in-process that transformers is not imported where it need not be
    from vlt.testing import make_tiny_teacher
    return make_tiny_teacher(tmp_path_factory.mktemp("qwen") / "tiny", num_layers=4)
