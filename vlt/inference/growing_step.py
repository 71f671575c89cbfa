"""The engine's step for a mixer whose decode state grows per token and that has no step of its own
(fla's ``nsa`` and ``moba`` keep a key/value cache extended by concatenation; a user's mixer may too).

The mixer's ``state_spec(batch, capacity)`` gives its tensors at the engine's capacity; the dimension
that grows is the one whose size follows the capacity (found by asking for the spec at two
capacities), and a tensor without one is a constant-shape part of the state, copied whole. Each step
runs the mixer's own forward, row by row, on the prefix each row holds (``held``: what the mixer
returned last, which is shorter than the tokens seen when the mixer keeps a window; a host tensor in
the cache, so snapshots and resets carry it), and writes the state it returns back into the
preallocated tensors.

The held lengths live on the host and the shapes change every token, so this step is neither compiled
nor captured: an engine holding such a layer runs without CUDA graphs (``capturable = False``), one
host synchronisation a step. Greedy output equals the eager loop's (tests/test_inference.py).
"""
from __future__ import annotations

import torch

from vlt.inference.steps import MixerStep, _strip_seen, _with_seen, leaves, tensors
from vlt.layers import TensorSpec


def growing_dims(mixer, batch: int = 1, capacity: int = 8):
    """The mixer's state tree with, per tensor, the dimension that grows with the capacity (None: a
    tensor of constant shape). Raises ValueError when no tensor grows: the state cannot be held."""
    def pair(a, b):
        if isinstance(a, TensorSpec):
            dims = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
            return dims[0] if dims else None
        if isinstance(a, dict):
            return {k: pair(v, b[k]) for k, v in a.items()}
        return type(a)(pair(x, y) for x, y in zip(a, b))
    grow = pair(mixer.state_spec(batch, capacity), mixer.state_spec(batch, capacity + 1))
    if all(d is None for d in leaves(grow)):
        raise ValueError(f"{type(mixer).__name__} says its state grows per token (state_grows) but no tensor of "
                         "its state_spec(batch, capacity) depends on the capacity, so the engine cannot hold it; "
                         "give the growing dimension the capacity's size, or register a step for the mixer")
    return grow


def _zip(cache, grow, fn, *other):
    """fn(tensor, dim, *other leaves) over the state tree; returns the same tree of results."""
    if isinstance(cache, torch.Tensor):
        return fn(cache, grow, *other)
    if isinstance(cache, dict):
        return {k: _zip(v, grow[k], fn, *(o[k] for o in other)) for k, v in cache.items()}
    return type(cache)(_zip(c, g, fn, *o) for c, g, *o in zip(cache, grow, *other))


def _held_length(state, grow) -> int:
    """Length along the growing dimension of the first tensor that has one."""
    lengths = []
    _zip(state, grow, lambda t, d: lengths.append(t.shape[d]) if d is not None else None)
    return lengths[0]


class GrowingStateStep(MixerStep):
    capturable = False

    def allocate(self, mixer, batch, capacity, dtype, device):
        # held: a host tensor (read without a device sync), so the engine's snapshot / restore and reset,
        # which walk every tensor of the cache, carry it with the state
        return {"state": super().allocate(mixer, batch, capacity, dtype, device), "grow": growing_dims(mixer),
                "held": torch.zeros(batch, dtype=torch.long), "name": type(mixer).__name__}

    def state_nbytes(self, mixer, cache) -> int:
        return sum(t.numel() * t.element_size() for t in tensors(cache["state"]))

    def _write(self, cache, row, state):
        name = cache["name"]

        def put(dst, dim, src):
            target = dst[row:row + 1]
            if dim is not None:
                if src.shape[dim] > target.shape[dim]:
                    raise ValueError(f"{name}: its state holds {src.shape[dim]} tokens, more than the engine's "
                                     f"capacity of {target.shape[dim]}; build the engine with a larger capacity")
                target = target.narrow(dim, 0, src.shape[dim])
            if src.shape != target.shape:
                raise ValueError(f"{name}: state tensor of shape {tuple(src.shape)} does not match the declared "
                                 f"{tuple(target.shape)}; make state_spec describe what forward returns")
            target.copy_(src)
        _zip(cache["state"], cache["grow"], put, state)
        cache["held"][row] = _held_length(state, cache["grow"])

    def _view(self, cache, row):
        n = int(cache["held"][row])
        return _zip(cache["state"], cache["grow"],
                    lambda t, d: t[row:row + 1] if d is None else t[row:row + 1].narrow(d, 0, n))

    def load(self, mixer, cache, state, row, seen):
        self._write(cache, row, _strip_seen(state))

    def export(self, mixer, cache, row, seen):
        return _with_seen(_zip(self._view(cache, row), cache["grow"], lambda t, d: t.clone()), seen)

    def __call__(self, mixer, cache, ctx, x, norm):
        h = norm(x) if norm is not None else x
        seen = ctx.tok.tolist()  # the host needs each row's lengths: the one synchronisation of this step
        ys = []
        for row in range(x.shape[0]):
            pos = ctx.pos[:, row:row + 1] if ctx.pos.dim() == 3 else ctx.pos[row:row + 1]
            state = _with_seen(self._view(cache, row), seen[row])
            y, new = mixer(h[row:row + 1], state=state, position_ids=pos, use_cache=True)
            self._write(cache, row, _strip_seen(new))
            ys.append(y)
        return torch.cat(ys, 0), None


GROWING = GrowingStateStep()
