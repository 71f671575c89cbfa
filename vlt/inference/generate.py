"""Sampling and the generation loop over the inference engine, and the eager reference loop.

``generate(engine, prompts, ...)``: each prompt (ids, images) is prefilled into its own row of the
engine, then one token per row per step through ``engine.decode`` (a CUDA-graph replay on the GPU).
Sampling (greedy, temperature, top-p) runs on the device; finished rows (eos) keep emitting eos
without a host sync: the host reads tokens back only every ``sync_every`` steps, to stream them to
``on_token`` and to stop once every row is done.

``generate_eager(model, ids, images, ...)`` is the reference: the mixers' own out-of-place decode
(``model(ids, state=..., use_cache=True)``), one host sync per token. Greedy output of the two is
identical (tests/test_inference.py), and equals recomputing the whole prefix every step.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax at temperature 0, else nucleus sampling."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:  # before the prefill, not at the first sample
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def generate(engine, prompts: Sequence, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | Iterable[int] | None = None, seed: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, sync_every: int = 8) -> torch.Tensor:
    """New token ids [B, n] (n <= max_new_tokens) for B = len(prompts) <= engine.batch_size prompts,
    each ``(input_ids [T], images or None)``; rows that finished early are padded with their eos.
    The engine's rows are reset first. ``on_token(ids [B])`` gets every step's tokens, in order, at
    most ``sync_every`` steps late."""
    check_sampling(max_new_tokens, temperature, top_p)
    B = len(prompts)
    if not 0 < B <= engine.batch_size:
        raise ValueError(f"{B} prompts for an engine of batch size {engine.batch_size}")
    if engine.capacity is not None:
        longest = max(int(torch.as_tensor(ids).numel()) for ids, _ in prompts)
        if longest + max_new_tokens > engine.capacity:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the engine's "
                             f"capacity of {engine.capacity}; build it with capacity >= "
                             f"{longest + max_new_tokens} or ask for fewer new tokens")
    engine.reset()
    rows = [engine.prefill(torch.as_tensor(ids), images, row=b) for b, (ids, images) in enumerate(prompts)]
    logits = torch.stack(rows)
    if B < engine.batch_size:  # idle rows decode a pad token; their output is dropped
        logits = torch.cat([logits, logits[:1].expand(engine.batch_size - B, -1)])
    return decode_loop(engine, logits, max_new_tokens, temperature, top_p, eos_token_id, seed, on_token,
                       sync_every, rows=B)[:B]


def decode_loop(engine, logits, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                eos_token_id=None, seed: int | None = None, on_token=None, sync_every: int = 8,
                rows: int | None = None) -> torch.Tensor:
    """Sample from ``logits`` [B, V] (the engine's rows after their prompts), then decode until
    ``max_new_tokens`` or each of the first ``rows`` rows (default all) has emitted an eos.
    ``on_token`` gets the first token at once (time to first token is the prefill's, not that of the
    decode steps' compile and capture, which come with the second), then every ``sync_every`` steps.
    Returns the new ids [B, n]."""
    dev = engine.device
    B = rows or engine.batch_size
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    eos = _eos_list(eos_token_id)
    eos_t = torch.tensor(eos or [-1], dtype=torch.long, device=dev)
    done = torch.zeros(engine.batch_size, dtype=torch.bool, device=dev)
    out = torch.empty(engine.batch_size, max_new_tokens, dtype=torch.long, device=dev)
    delivered = 0
    n = max_new_tokens
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)
        if eos:
            nxt = torch.where(done, eos_t[0], nxt)
            done |= torch.isin(nxt, eos_t)
        out[:, i] = nxt
        last = i == max_new_tokens - 1
        if last or i == 0 or (i + 1) % sync_every == 0:
            if on_token is not None:
                for j in range(delivered, i + 1):
                    on_token(out[:B, j])
            delivered = i + 1
            if eos and bool(done[:B].all()):
                n = i + 1
                break
        if not last:
            logits = engine.decode(nxt)
    return out[:, :n].clone()


@torch.no_grad()
def generate_eager(model, input_ids: torch.Tensor, images: list | None = None, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Iterable[int] | None = None,
                   on_token: Callable[[torch.Tensor], None] | None = None, seed: int | None = None,
                   return_state: bool = False):
    """The reference loop on the mixers' own decode path: new token ids [B, n]; ``return_state``
    also returns the decode state after the last step."""
    check_sampling(max_new_tokens, temperature, top_p)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    device = ids.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = _eos_list(eos_token_id)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    out = model(ids, images=images or None, use_cache=True, logits_to_keep=1)
    state, tokens = out.state, []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1], temperature, top_p, gen)
        if eos:
            nxt = torch.where(done, eos_t[0], nxt)
            done |= torch.isin(nxt, eos_t)
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        out = model(nxt[:, None], state=state, use_cache=True)
        state = out.state
    result = torch.stack(tokens, 1)
    return (result, state) if return_state else result
