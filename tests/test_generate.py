"""Decoding: the state-carrying loop equals recomputing the whole prefix, swa/gdn/linear state stays
constant, and ``vlt generate`` runs a saved student end to end with the teacher's chat format."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from vlt.convert import convert_to_student, load_hf_teacher
from vlt.inference import generate_eager as generate, sample_next
from vlt.layers import state_nbytes

IMG, VS, VE = 261, 259, 260
WINDOW = 8


@pytest.fixture(scope="module")
def student(teacher_dir):
    torch.manual_seed(0)
    model, _ = convert_to_student(load_hf_teacher(teacher_dir), layout="[swa, gdn, linear, full]", window=WINDOW,
                                  init="transfer")
    return model.eval()


def prompt_and_image():
    torch.manual_seed(1)
    image = torch.randn(3, 56, 84)  # 2 x 3 merged tokens
    ids = torch.tensor([[257, 40, 41, VS] + [IMG] * 6 + [VE, 42, 43, 44, 258, 257, 45]])
    return ids, [image]


def test_greedy_decode_equals_full_prefix_recompute(student):
    ids, images = prompt_and_image()
    steps = 8  # the prompt (17 tokens) already fills the swa window of 8; decode runs past it
    seen = []
    new = generate(student, ids, images, max_new_tokens=steps, on_token=lambda t: seen.append(int(t[0])))
    assert new.shape == (1, steps) and seen == new[0].tolist()
    seq = ids
    with torch.no_grad():
        for i in range(steps):
            logits = student(seq, images=images).logits[:, -1]
            nxt = logits.argmax(-1)
            assert int(nxt) == int(new[0, i]), f"step {i}"
            top2 = logits.topk(2).values[0]
            assert top2[0] - top2[1] > 1e-4  # no ties, so the comparison is meaningful
            seq = torch.cat([seq, nxt[:, None]], 1)


def test_decode_logits_match_recompute(student):
    ids, images = prompt_and_image()
    with torch.no_grad():
        out = student(ids, images=images, use_cache=True)
        state, seq = out.state, ids
        for tok in [50, 51, 52, 53, 54, 55]:
            step = student(torch.tensor([[tok]]), state=state, use_cache=True)
            state, seq = step.state, torch.cat([seq, torch.tensor([[tok]])], 1)
            ref = student(seq, images=images).logits[:, -1]
            assert (step.logits[:, -1] - ref).abs().max() < 1e-4 * ref.abs().max()


def test_state_is_constant_outside_full_attention(student):
    ids, images = prompt_and_image()
    _, s1 = generate(student, ids, images, max_new_tokens=4, return_state=True)
    _, s2 = generate(student, ids, images, max_new_tokens=10, return_state=True)
    sizes = lambda s: [state_nbytes(x) for x in s["layers"]]  # noqa: E731
    a, b = sizes(s1), sizes(s2)
    assert a[:3] == b[:3]  # swa ring (past the window), gdn and linear states: constant
    assert b[3] > a[3]  # full attention's KV cache grows
    swa = student.layers[0].mixer
    assert s2["layers"][0]["k"].shape[1] == WINDOW
    assert a[0] == swa.state_size(1, 100, torch.float32)


def test_sampling_options(student):
    ids, images = prompt_and_image()
    greedy = generate(student, ids, images, max_new_tokens=6)
    # a nucleus so small that only the top token survives is greedy
    assert torch.equal(generate(student, ids, images, max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=0), greedy)
    a = generate(student, ids, images, max_new_tokens=6, temperature=5.0, seed=3)
    assert torch.equal(a, generate(student, ids, images, max_new_tokens=6, temperature=5.0, seed=3))
    stop = int(greedy[0, 2])
    out = generate(student, ids, images, max_new_tokens=6, eos_token_id=stop)
    assert out[0, -1] == stop and out.shape[1] == greedy[0].tolist().index(stop) + 1
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 4), 1.0, 0.0)


def test_sample_next_top_p_keeps_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}


def test_prompt_matches_teacher_chat_template(teacher_dir):
    tk = pytest.importorskip("vlt.data.tokenizer")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(teacher_dir), local_files_only=True)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    ref = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    i = ref.index(IMG)
    ref = ref[:i] + [IMG] * 6 + ref[i + 1:]  # the processor's image-pad expansion
    ours = tk.build_prompt_ids(tk.load_tokenizer(str(teacher_dir)),
                               [{"from": "human", "value": "<image>What is it?"}], [6])
    assert ours == ref


def test_generate_cli_end_to_end(student, teacher_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("vlt.data.tokenizer")
    import torch._inductor.config as inductor_config
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(inductor_config, "compile_threads", 7)   # as if Inductor had picked a worker pool
    from vlt.data.image import ImageProcessor
    from vlt.data.tokenizer import build_prompt_ids, load_tokenizer
    from vlt.checkpoint.export import save_pretrained_vlt
    from vlt.generate_cli import add_generate_args, run_generate
    ckpt = save_pretrained_vlt(student, tmp_path / "export", tokenizer_dir=teacher_dir)
    rng = np.random.default_rng(0)
    img = tmp_path / "cat.png"
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(img)
    args = add_generate_args(argparse.ArgumentParser()).parse_args(
        ["--ckpt", str(ckpt), "--image", str(img), "--prompt", "Describe it.", "--max-new-tokens", "8"])
    assert run_generate(args) == 0
    assert inductor_config.compile_threads == 1   # the command compiles in its own process (no pool to wait for)
    out, err = capsys.readouterr()
    # the same greedy run by hand: the CLI streamed exactly these tokens
    tok = load_tokenizer(str(teacher_dir))
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    x = proc(Image.open(img))
    ids = build_prompt_ids(tok, [{"from": "human", "value": "<image>\nDescribe it."}], [proc.num_tokens(x)])
    new = generate(student, torch.tensor([ids]), [x], max_new_tokens=8, eos_token_id=[tok.eos_id, tok.pad_id])
    text = tok.decode([t for t in new[0].tolist() if t not in (tok.eos_id, tok.pad_id)])
    assert out == text + "\n"
    assert "tokens/s" in err and "state" in err and "swa" in err and "time to first token" in err
    assert "start-up" in err and "engine set-up" in err
    # the reference path prints the same tokens
    eager = add_generate_args(argparse.ArgumentParser()).parse_args(
        ["--ckpt", str(ckpt), "--image", str(img), "--prompt", "Describe it.", "--max-new-tokens", "8",
         "--engine", "eager"])
    assert run_generate(eager) == 0
    assert capsys.readouterr().out == out
    # engine options reach the engine (the same tokens); a bad one, or one with --engine eager, is refused
    base = ["--ckpt", str(ckpt), "--image", str(img), "--prompt", "Describe it.", "--max-new-tokens", "8"]
    opts = ["--engine-option", "compile=none", "--engine-option", "chunk_attention=false"]
    assert run_generate(add_generate_args(argparse.ArgumentParser()).parse_args(base + opts)) == 0
    assert capsys.readouterr().out == out
    for extra, says in ((["--engine-option", "compiler=none"], "KEY one of"),
                        (["--engine", "eager", "--engine-option", "compile=none"], "--engine eager")):
        assert run_generate(add_generate_args(argparse.ArgumentParser()).parse_args(base + extra)) == 2
        assert says in capsys.readouterr().err
    bad = add_generate_args(argparse.ArgumentParser()).parse_args(["--ckpt", str(tmp_path / "nope"), "--prompt", "x"])
    assert run_generate(bad) == 2
    assert "nope" in capsys.readouterr().err


def test_generate_uses_the_training_runs_system_prompt(student, teacher_dir, tmp_path, capsys):
    """An export that records training without a system prompt is prompted without one by default
    (the flag still overrides); one without a record falls back to Qwen's default."""
    from vlt.checkpoint.export import save_pretrained_vlt
    from vlt.generate_cli import add_generate_args, run_generate

    def run(ckpt, *extra):
        args = add_generate_args(argparse.ArgumentParser()).parse_args(
            ["--ckpt", str(ckpt), "--prompt", "Which colour?", "--max-new-tokens", "6", *extra])
        assert run_generate(args) == 0
        return capsys.readouterr().out

    plain = save_pretrained_vlt(student, tmp_path / "plain", tokenizer_dir=teacher_dir)
    trained = save_pretrained_vlt(student, tmp_path / "nosys", tokenizer_dir=teacher_dir, prompt={"system": ""})
    assert run(trained) == run(plain, "--system", "")
    assert run(trained, "--system", "You are a helpful assistant.") == run(plain)
    assert run(plain, "--system", "") != run(plain)   # the system prompt changes this model's answer


def test_seconds_since_process_start_counts_the_process_whole_life():
    """What `vlt generate` reports as start-up: a process that slept 1 s before asking reads at least that."""
    import subprocess
    import sys
    code = ("import time; time.sleep(1.0); from vlt.generate_cli import seconds_since_process_start as f; "
            "print(f())")
    out = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.0 <= out < 60.0


def test_steady_latency_is_timed_after_the_warm_tokens():
    """`vlt generate`'s ms/token leaves out the first 8 tokens (the decode step's compile and capture)."""
    from vlt.generate_cli import WARM_TOKENS, steady_ms_per_token
    assert WARM_TOKENS == 8
    # token 0 at 0 s, tokens 1-7 after a 5 s warm-up, then one token every 2 ms
    times = [0.0] + [5.0] * 7 + [5.0 + 0.002 * i for i in range(1, 21)]
    assert steady_ms_per_token(times) == pytest.approx(2.0, rel=1e-9)
    assert steady_ms_per_token(times[:15]) is None   # fewer than 8 tokens after the warm ones
    assert steady_ms_per_token(times[:16]) == pytest.approx(2.0, rel=1e-9)


def test_the_commands_compile_without_a_worker_pool(monkeypatch):
    """vlt generate / stream / eval / chat: Inductor compiles in the process (a warm command's exit waited
    ~4.8 s for the pool's workers on the H200); TORCHINDUCTOR_COMPILE_THREADS, when set, wins."""
    import torch._inductor.config as inductor_config
    from vlt.inference import compile_in_this_process
    monkeypatch.setattr(inductor_config, "compile_threads", 7)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "7")
    compile_in_this_process()
    assert inductor_config.compile_threads == 7
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")
    compile_in_this_process()
    assert inductor_config.compile_threads == 1
    # each command calls it before it loads a model
    import inspect
    from vlt import chat_cli, eval_cli, generate_cli, stream_cli
    for mod in (generate_cli, stream_cli, eval_cli, chat_cli):
        src = inspect.getsource(mod._run)
        assert src.index("compile_in_this_process()") < src.index("load_for_inference("), mod.__name__
