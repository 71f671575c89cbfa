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
