"""A mixer for tests whose decode state grows per token by concatenation, as fla's nsa / moba caches
do, with a CPU path (fla's have none): registered as ``test_growing_mean`` on import. No engine step
is registered for it, so the engine refuses it (EngineUnsupported) and its users fall back to eager."""
import torch

from vlt.layers import TensorSpec, TokenMixer, register_mixer


@register_mixer("test_growing_mean")
class GrowingMean(TokenMixer):
    """A mixer whose state grows per token by concatenation (as fla's nsa / moba caches do):
    y_t = W mean(x_1..x_t). No engine step is registered for it."""
    state_grows = True

    def __init__(self, hidden_size: int, num_heads: int, layer_idx=None):
        super().__init__()
        self.o_proj = torch.nn.Linear(hidden_size, hidden_size)

    def state_spec(self, batch_size, capacity, dtype=torch.bfloat16):
        return {"x": TensorSpec((batch_size, capacity, self.o_proj.in_features), dtype)}

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        seen = torch.cat([state["x"], x], 1) if state is not None else x
        t = torch.arange(1, seen.shape[1] + 1, dtype=x.dtype)[None, :, None]
        y = self.o_proj((seen.cumsum(1) / t)[:, -x.shape[1]:])
        return y, ({"x": seen, "seen": seen.shape[1]} if use_cache else None)


@register_mixer("test_growing_unsized")
class GrowingUnsized(GrowingMean):
    """The same mixer with a state_spec that does not follow the capacity: the engine cannot hold it."""

    def state_spec(self, batch_size, capacity, dtype=torch.bfloat16):
        return {"x": TensorSpec((batch_size, 1, self.o_proj.in_features), dtype)}


@register_mixer("test_growing_window")
class GrowingWindow(GrowingMean):
    """Keeps only its last 3 inputs (a window, as fla's moba cache can): the state it holds is shorter
    than the tokens it has seen. y_t = W mean(x_{t-2..t})."""
    keep = 3

    def forward(self, x, *, state=None, cu_seqlens=None, position_ids=None, use_cache=False):
        prev = state["x"] if state is not None else x[:, :0]
        seen = torch.cat([prev, x], 1)
        c = torch.nn.functional.pad(seen.cumsum(1), (0, 0, self.keep, 0))
        n = torch.arange(1, seen.shape[1] + 1, dtype=x.dtype).clamp(max=self.keep)[None, :, None]
        y = self.o_proj(((c[:, self.keep:] - c[:, :-self.keep]) / n)[:, -x.shape[1]:])
        count = (state["seen"] if state is not None else 0) + x.shape[1]   # tokens seen, not held
        return y, ({"x": seen[:, -self.keep:], "seen": count} if use_cache else None)
