"""The inference engine (vlt.inference) against the mixers' own eager decode path: every registered
mixer and the shipped layout kinds, batches of prompts of different lengths, images with M-RoPE,
a mixer registered outside vlt, state conversion both ways, and the errors users can hit."""
import pytest
import torch

from vlt.config import VLMConfig
from vlt.inference import InferenceEngine, generate, generate_eager
from vlt.layers import TensorSpec, TokenMixer, list_mixers, register_mixer, state_nbytes
from vlt.model import VLM

IMG = 261  # tiny-hybrid's <|image_pad|> id
MIXER_OPTS = {"swa": {"window": 6}, "swa_gdn": {"window": 6}, "hybrid": {"branches": [{"mixer": "swa", "window": 5}, "gdn"]}}


def tiny(layout, mrope=False, seed=0):
    torch.manual_seed(seed)
    dec = {"layout": layout, "mixers": MIXER_OPTS}
    if mrope:
        dec.update(mrope_section=[4, 6, 6], head_dim=32)
    return VLM(VLMConfig.from_name("tiny-hybrid", decoder=dec)).eval()


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
