"""The inference engine (vlt.inference) against the mixers' own eager decode path: every registered
mixer and the shipped layout kinds, batches of prompts of different lengths, images with M-RoPE,
a mixer registered outside vlt, state conversion both ways, and the errors users can hit."""
import pytest
import torch

from vlt.config import VLMConfig
from vlt.inference import InferenceEngine, generate, generate_eager
from vlt.layers import TensorSpec, TokenMixer, list_mixers, register_mixer, state_nbytes
from vlt.model import VLM
from vlt.testing import TINY_IMAGE_TOKEN_ID, tiny_model

IMG = TINY_IMAGE_TOKEN_ID  # tiny-hybrid's <|image_pad|> id
tiny = tiny_model  # tiny(layout, mrope=False, seed=0): vlt.testing's seeded tiny-hybrid VLM, small windows


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# one layer of each built-in mixer (a full layer after it checks the mixer's output feeds on), and
# the shipped layout kinds: 1:3 hybrid, pure linear recurrences, intra-layer hybrid
LAYOUTS = [f"[{name}, full]" for name in sorted(set(list_mixers()) - {"full"})] + [
    "[full, full]", "[swa, gdn, gdn, gdn]", "[gdn, linear]", "[swa_gdn, swa]"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_engine_steps_match_eager_decode(layout):
    model = tiny(layout)
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        state = out.state
        eng = InferenceEngine(model, capacity=32)
        eng.load_state(state)
        tok = out.logits[:, -1].argmax(-1)
        for i in range(10):   # past the window of 6: the ring wraps
            ref = model(tok[:, None], state=state, use_cache=True)
            state = ref.state
            got = eng.decode(tok)
            assert rel(got, ref.logits[:, -1]) < 1e-5, (layout, i, rel(got, ref.logits[:, -1]))
            tok = ref.logits[:, -1].argmax(-1)
        # and the engine's state converts back to the eager one
        back = eng.export_state()
        for a, b in zip(back["layers"], state["layers"]):
            assert state_nbytes(a) == state_nbytes(b)
            flat_a, flat_b = _leaves(a), _leaves(b)
            assert all(rel(x, y) < 1e-5 for x, y in zip(flat_a, flat_b) if y.numel())
        assert int(back["next_pos"]) == int(state["next_pos"])


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [x for k in sorted(tree) if k != "seen" for x in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return []


@pytest.mark.parametrize("layout", ["[swa, gdn, linear, full]", "[swa_gdn, hybrid, full, gdn]"])
def test_batched_generate_equals_eager_per_prompt(layout):
    """Prompts of different lengths (one with an image, M-RoPE) in one batch: each row decodes
    exactly what the eager loop decodes for that prompt alone."""
    model = tiny(layout, mrope=True)
    torch.manual_seed(1)
    a = torch.tensor([5, 6, 7] + [IMG] * 4 + [8, 9, 10, 11])
    b = torch.tensor([12, 13, 14, 15, 16])
    image = [torch.randn(3, 56, 56)]
    eng = InferenceEngine(model, batch_size=3, capacity=40)
    new = generate(eng, [(a, image), (b, None)], max_new_tokens=14, sync_every=3)
    assert new.shape == (2, 14)
    assert torch.equal(new[0], generate_eager(model, a[None], image, max_new_tokens=14)[0])
    assert torch.equal(new[1], generate_eager(model, b[None], None, max_new_tokens=14)[0])


def test_eos_stops_and_streams_every_token():
    model = tiny("[swa, gdn]")
    ids = torch.tensor([3, 4, 5, 6])
    ref = generate_eager(model, ids[None], max_new_tokens=12)[0].tolist()
    eos = ref[5]
    first = ref.index(eos)
    seen = []
    out = generate(InferenceEngine(model), [(ids, None)], max_new_tokens=12, eos_token_id=eos, sync_every=4,
                   on_token=lambda t: seen.append(int(t[0])))
    assert out[0].tolist()[:first + 1] == ref[:first + 1] and out.shape[1] <= 8  # stopped at the next sync
    assert seen == out[0].tolist()


def test_the_first_token_is_delivered_before_any_decode_step():
    """Time to first token is the prefill's: on_token gets token 0 before the engine's first decode
    step (whose compile and capture would otherwise count), then the rest every sync_every steps."""
    model = tiny("[swa, gdn]")
    eng = InferenceEngine(model)
    steps, at_delivery = [], []
    decode = eng.decode
    eng.decode = lambda ids: (steps.append(1), decode(ids))[1]
    out = generate(eng, [(torch.tensor([3, 4, 5, 6]), None)], max_new_tokens=10, sync_every=4,
                   on_token=lambda t: at_delivery.append(len(steps)))
    assert out.shape[1] == 10 and len(steps) == 9
    assert at_delivery == [0, 3, 3, 3, 7, 7, 7, 7, 9, 9], at_delivery


@register_mixer("test_token_shift")
class TokenShift(TokenMixer):
    """A mixer vlt does not know: y = W (x_t + x_{t-1}); its state is the previous input."""

    def __init__(self, hidden_size: int, num_heads: int, layer_idx=None):
        super().__init__()
        self.q_proj = torch.nn.Linear(hidden_size, hidden_size)
        self.o_proj = torch.nn.Linear(hidden_size, hidden_size)

    def state_spec(self, batch_size, capacity, dtype=torch.bfloat16):
        return {"prev": TensorSpec((batch_size, 1, self.q_proj.in_features), dtype)}

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        prev = torch.zeros_like(x[:, :1]) if state is None else state["prev"]
        shifted = torch.cat([prev, x[:, :-1]], 1)
        y = self.o_proj(torch.tanh(self.q_proj(x + shifted)))
        return y, ({"prev": x[:, -1:], "seen": 0 if state is None else state["seen"] + x.shape[1]}
                   if use_cache else None)


def test_a_mixer_registered_outside_vlt_decodes_through_the_engine():
    model = tiny("[test_token_shift, swa]")
    ids = torch.tensor([3, 4, 5, 6, 7])
    ref = generate_eager(model, ids[None], max_new_tokens=10)
    assert torch.equal(generate(InferenceEngine(model), [(ids, None)], max_new_tokens=10), ref)


def test_declared_state_bytes_equal_the_real_state():
    model = tiny("[swa, gdn, linear, swa_gdn]")
    eng = InferenceEngine(model)
    with torch.no_grad():
        _, state = None, model(torch.randint(0, 200, (1, 20)), use_cache=True).state
    eng.load_state(state)
    assert eng.state_nbytes() == state_nbytes(state["layers"])
    assert eng.state_nbytes() == sum(b.mixer.state_size(1, 20, torch.float32) for b in model.layers)


def test_user_errors_are_clear():
    model = tiny("[full, gdn]")
    with pytest.raises(ValueError, match="capacity"):
        InferenceEngine(model)
    eng = InferenceEngine(model, capacity=10)
    with pytest.raises(ValueError, match=r"exceeds the engine.s capacity of 10"):
        generate(eng, [(torch.arange(8), None)], max_new_tokens=5)
    with pytest.raises(ValueError, match="2 prompts for an engine of batch size 1"):
        generate(eng, [(torch.arange(3), None)] * 2, max_new_tokens=2)

    class NoSpec(TokenMixer):
        def __init__(self, hidden_size: int, num_heads: int, layer_idx=None):
            super().__init__()

    with pytest.raises(NotImplementedError, match="declares no decode state"):
        NoSpec(8, 2).state_spec(1, 4)


def _frames(n, size=56):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


@pytest.mark.parametrize("layout", ["[swa, gdn, gdn, gdn]", "[swa_gdn, linear, full, gdn]"])
def test_video_stream_answers_as_the_offline_prompt(layout):
    """Frames streamed one by one, then a question: the answer equals the eager generation from the
    whole video prompt built by vlt.data's template (the layout training uses); asking does not
    change the stream's state; the carried state stays the same size frame after frame."""
    from vlt.data.image import ImageProcessor
    from vlt.data.tokenizer import build_prompt_ids, load_tokenizer
    from vlt.inference import VideoStream
    model = tiny(layout, mrope=True)
    tok = load_tokenizer("byte")
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    frames = _frames(9)                     # 9 frames x (4 visual + ~10 text tokens): past the window of 6
    stream = VideoStream(model, tok, image_processor=proc, fps=2.0, system="", capacity=400)
    sizes = []
    for f in frames[:5]:
        stream.add_frame(f)
        sizes.append(stream.state_nbytes())
    before = stream.engine.export_state()
    early = stream.ask("Which colour?", max_new_tokens=5)
    after = stream.engine.export_state()
    assert all(torch.equal(a, b) for a, b in zip(_leaves(before["layers"]), _leaves(after["layers"])))
    for f in frames[5:]:
        stream.add_frame(f)
        sizes.append(stream.state_nbytes())
    answer = stream.ask("Which colour?", max_new_tokens=5)
    assert len(set(sizes)) == 1
    pixels = [proc(f) for f in frames]
    counts = [("video", [(i / 2.0, proc.num_tokens(p)) for i, p in enumerate(pixels)])]
    ids = build_prompt_ids(tok, [{"from": "human", "value": "<video>\nWhich colour?"}], counts, system="")
    ref = generate_eager(model, torch.tensor([ids]), pixels, max_new_tokens=5,
                         eos_token_id=[tok.eos_id, tok.pad_id, tok.im_end_id])
    ref_ids = [i for i in ref[0].tolist()]
    stop = {tok.eos_id, tok.pad_id, tok.im_end_id}
    ref_ids = ref_ids[:next((k for k, i in enumerate(ref_ids) if i in stop), len(ref_ids))]
    assert answer == tok.decode(ref_ids)
    with torch.no_grad():   # and the distribution it answered from, not only its argmax
        ref_logits = model(torch.tensor([ids]), images=pixels).logits[0, -1]
    assert rel(stream.question_logits, ref_logits) < 1e-4
    ids5 = build_prompt_ids(tok, [{"from": "human", "value": "<video>\nWhich colour?"}],
                            [("video", counts[0][1][:5])], system="")
    ref5 = generate_eager(model, torch.tensor([ids5]), pixels[:5], max_new_tokens=5)[0].tolist()
    ref5 = ref5[:next((k for k, i in enumerate(ref5) if i in stop), len(ref5))]
    assert early == tok.decode(ref5)


def test_video_stream_needs_a_vision_tower():
    from vlt.data.tokenizer import load_tokenizer
    from vlt.inference import VideoStream
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", vision={"kind": "none"}, image_token_id=None)).eval()
    with pytest.raises(ValueError, match="no vision tower"):
        VideoStream(model, load_tokenizer("byte"))


def test_chat_turns_continue_the_state_as_one_conversation():
    """Two turns through ChatSession (the second prefilled from the state the first left) answer as
    the eager model does on the whole two-turn conversation, built token by token."""
    from vlt.data.image import ImageProcessor
    from vlt.data.tokenizer import load_tokenizer
    from vlt.inference import ChatSession
    model = tiny("[swa, gdn, full, linear]", mrope=True)
    tok = load_tokenizer("byte")
    proc = ImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    image = _frames(1)[0]
    chat = ChatSession(model, tok, image_processor=proc, system="", capacity=200)
    chat.say("What is this?", [image], max_new_tokens=6)
    first = chat.last_answer_ids
    chat.say("And now?", max_new_tokens=6)
    second = chat.last_answer_ids
    t = tok
    nl = t.encode("\n")
    ids = ([t.im_start_id] + t.encode("user\n") + [t.vision_start_id] + [t.image_pad_id] * 4 + [t.vision_end_id]
           + t.encode("What is this?") + [t.im_end_id] + nl + [t.im_start_id] + t.encode("assistant\n") + first
           + [t.im_end_id] + nl + [t.im_start_id] + t.encode("user\n") + t.encode("And now?") + [t.im_end_id] + nl
           + [t.im_start_id] + t.encode("assistant\n"))
    stop = [t.im_end_id, t.eos_id, t.pad_id]
    ref = generate_eager(model, torch.tensor([ids]), [proc(image)], max_new_tokens=6, eos_token_id=stop)[0].tolist()
    if ref[-1] in stop:
        ref = ref[:-1]
    assert len(first) == 6 and second == ref


def test_chat_cli_streams_answers(tmp_path):
    import argparse
    import io
    from vlt.chat_cli import add_chat_args, run_chat
    from vlt.checkpoint.export import save_pretrained_vlt
    out = save_pretrained_vlt(tiny("[swa, gdn]"), tmp_path / "m", tokenizer_dir="byte", prompt={"system": ""})
    args = add_chat_args(argparse.ArgumentParser()).parse_args(["--ckpt", str(out), "--max-new-tokens", "3",
                                                                "--device", "cpu"])
    buf = io.StringIO()
    assert run_chat(args, stdin=io.StringIO("hello\n/image /nope.png\nagain\n/quit\nignored\n"), stdout=buf) == 0
    # exactly the two turns' answers (the missing image is skipped, nothing after /quit), as the API gives them
    from vlt.checkpoint.export import load_pretrained_vlt
    from vlt.inference import ChatSession
    model, tok = load_pretrained_vlt(out)
    chat = ChatSession(model, tok, system="")
    expected = [chat.say(text, max_new_tokens=3) for text in ("hello", "again")]
    assert all(expected) and buf.getvalue() == "".join(a + "\n" for a in expected)


@pytest.mark.parametrize("layout,dynamic", [("[swa, gdn, linear, full]", False), ("[swa_gdn, gdn]", False),
                                            ("[swa, gdn, linear, full]", True)])
def test_compiled_steps_match_eager(layout, dynamic):
    """The pieces the engine compiles on CUDA (generic mixer steps, attention over T new tokens, the
    MLP half, RoPE tables) traced by dynamo (backend "eager": the same graphs, no code generation):
    frames of several tokens and single-token decode steps give the uncompiled engine's logits and
    states. The first use of a step size runs uncompiled, its later uses compiled (``dynamic``: with
    automatic dynamic shapes, the size 6 reusing the symbolic compile of the sizes before)."""
    from vlt.positions import text_positions
    model = tiny(layout)
    ref = InferenceEngine(model, capacity=64)
    got = InferenceEngine(model, capacity=64, compile="eager", dynamic_sizes=dynamic)
    for eng in (ref, got):
        eng.prefill(torch.arange(5, 14))
    for i in range(5):          # sizes of T > 1 (each compiles on its second use) and decode
        T = (3, 4, 3, 4, 6)[i]
        x = model.embed_tokens(torch.randint(0, 200, (1, T)))
        pos = text_positions(torch.zeros(1, T, dtype=torch.long), None, ref.next_pos[:1])
        a, b = ref.step_embeddings(x, pos), got.step_embeddings(x, pos)
        assert rel(b, a) < 1e-5, (i, rel(b, a))
        tok = a.argmax(-1)
        assert rel(got.decode(tok), ref.decode(tok)) < 1e-5
    assert got._compiled and not ref._compiled
    for x, y in zip(_leaves(got.export_state()["layers"]), _leaves(ref.export_state()["layers"])):
        assert rel(x, y) < 1e-5


# registered here, after the parametrisations over every registered mixer above were listed
import growing_mixer  # noqa: E402,F401  (registers test_growing_mean: tests/growing_mixer.py)


@pytest.mark.parametrize("mixer", ["test_growing_mean", "test_growing_window"])
def test_a_growing_state_decodes_through_the_engine_like_the_eager_loop(mixer):
    """A mixer whose state grows per token and has no step of its own (fla's nsa / moba; here test
    mixers with a CPU path, one keeping a window so it holds fewer tokens than it has seen) decodes
    through the engine's GrowingStateStep: batch 2 with prompts of different lengths gives each prompt's
    eager greedy tokens, the exported state equals the eager state, and no CUDA graph is asked for."""
    model = tiny(f"[swa, {mixer}]")
    prompts = [torch.arange(5, 14), torch.arange(30, 34)]
    eng = InferenceEngine(model, batch_size=2, capacity=64)
    assert not eng.graphs
    got = generate(eng, [(p, None) for p in prompts], max_new_tokens=6)
    for row, p in enumerate(prompts):
        ref, state = generate_eager(model, p[None], max_new_tokens=6, return_state=True)
        assert torch.equal(got[row], ref[0]), (row, got[row], ref[0])
        # the engine's state after its last step holds the 6th token too (the eager loop stops before it)
        ours = eng.export_state(row)["layers"][1]
        assert torch.allclose(ours["x"][:, :state["layers"][1]["x"].shape[1]], state["layers"][1]["x"], atol=1e-6)
    assert eng.layer_state_nbytes()[1] == 2 * 64 * model.config.decoder.hidden_size * 4  # fp32, capacity 64
    # a snapshot carries the held lengths too (vlt stream's ask() restores one after each answer)
    before = eng.export_state(0)["layers"][1]["x"]
    snap = eng.snapshot()
    eng.decode(torch.tensor([7, 8]))
    eng.restore(snap)
    assert torch.equal(eng.export_state(0)["layers"][1]["x"], before)
    eng.reset()
    assert eng.export_state(0)["layers"][1]["x"].shape[1] == 0


def test_a_growing_state_the_engine_cannot_hold_is_refused_and_vlt_generate_falls_back(tmp_path, capsys):
    """A growing state whose state_spec does not follow the capacity: the engine names the layers
    before allocating anything; `vlt generate` (engine auto) then decodes eagerly and says why, with
    the same tokens as --engine eager."""
    import argparse
    from vlt.checkpoint.export import save_pretrained_vlt
    from vlt.generate_cli import add_generate_args, run_generate
    from vlt.inference import EngineUnsupported
    model = tiny("[swa, test_growing_unsized]")
    refused = r"layers \[1\] \(\['test_growing_unsized'\]\).*capacity.*--engine eager"
    with pytest.raises(EngineUnsupported, match=refused):
        InferenceEngine(model, capacity=64)
    ckpt = save_pretrained_vlt(model, tmp_path / "export", tokenizer_dir="byte")
    outs = []
    for engine in ("auto", "eager"):
        args = add_generate_args(argparse.ArgumentParser()).parse_args(
            ["--ckpt", str(ckpt), "--prompt", "hello", "--max-new-tokens", "6", "--engine", engine])
        assert run_generate(args) == 0
        outs.append(capsys.readouterr())
    assert "the eager path: layers [1]" in outs[0].err and "eager on cpu" in outs[0].err
    assert outs[0].out == outs[1].out
