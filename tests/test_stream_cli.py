"""``vlt stream`` end to end on a tiny export: a video file written in the test (PyAV), frame
directories, questions at the end / every N frames, and the errors for bad video input."""
import argparse
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vlt.config import VLMConfig
from vlt.model import VLM


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from vlt.checkpoint.export import save_pretrained_vlt
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder={"mrope_section": [4, 6, 6], "head_dim": 32})).eval()
    return save_pretrained_vlt(model, tmp_path_factory.mktemp("stream") / "export", tokenizer_dir="byte",
                               prompt={"system": "", "min_pixels": 56 * 56, "max_pixels": 56 * 56})


def _video(path, n=6, size=64, fps=4):
    import av  # a dev dependency (`pip install -e ".[dev]"`): a missing PyAV fails here, it does not skip
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        st = out.add_stream("mpeg4", rate=fps)
        st.width = st.height = size
        st.pix_fmt = "yuv420p"
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), format="rgb24")
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def _run(*argv):
    from vlt.stream_cli import add_stream_args, run_stream
    return run_stream(add_stream_args(argparse.ArgumentParser()).parse_args([str(a) for a in argv]))


def test_stream_a_video_file_answers_as_the_api(export, tmp_path, capsys):
    from vlt.data.video import iter_frames
    from vlt.checkpoint.export import load_pretrained_vlt
    from vlt.generate_cli import image_processor
    from vlt.inference import VideoStream
    video = _video(tmp_path / "clip.mp4")
    assert _run("--ckpt", export, "--video", video, "--fps", 2, "--ask", "What is shown?", "--max-new-tokens", 4,
                "--device", "cpu") == 0
    out, err = capsys.readouterr()
    assert out.startswith("[t=") and "frames" in err and "decode state" in err
    frames = [im for _, im in iter_frames(video, 2)]
    assert len(frames) == 3   # 6 frames at 4 fps = 1.5 s, sampled at 2 fps: t = 0, 0.5, 1.0
    model, tok = load_pretrained_vlt(export)
    s = VideoStream(model, tok, image_processor=image_processor(export, model, None), fps=2, system="")
    for f in frames:
        s.add_frame(f)
    assert out == f"[t=1.5s] {s.ask('What is shown?', max_new_tokens=4)}\n"


def test_stream_a_frame_directory_asking_every_n_frames(export, tmp_path, capsys):
    d = tmp_path / "frames"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    assert _run("--ckpt", export, "--video", d, "--ask", "Which colour?", "--ask-every", 2, "--max-new-tokens", 3,
                "--device", "cpu") == 0
    import re
    assert re.findall(r"^\[t=([\d.]+)s\]", capsys.readouterr().out, re.M) == ["2.0", "4.0", "5.0"]


def test_bad_video_input_is_a_clear_error(export, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    assert _run("--ckpt", export, "--video", bad, "--ask", "x", "--device", "cpu") == 2
    assert "cannot read video" in capsys.readouterr().err
    assert _run("--ckpt", export, "--video", tmp_path / "missing.mp4", "--ask", "x", "--device", "cpu") == 2
    assert "does not exist" in capsys.readouterr().err
    good = _video(tmp_path / "ok.mp4", n=2)
    monkeypatch.setitem(sys.modules, "av", None)   # PyAV not installed
    assert _run("--ckpt", export, "--video", good, "--ask", "x", "--device", "cpu") == 2
    assert "needs PyAV: pip install 'vlt[video]'" in capsys.readouterr().err
