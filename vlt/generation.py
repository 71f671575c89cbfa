"""Sampling loop over vlt's decode state: one prefill, then one token per step.

The prefill runs the whole prompt (text + images) with ``use_cache=True`` and keeps logits of the last
position only; every step feeds one token and the state the previous call returned. Memory per step
is the state: constant for swa (a ring of ``window`` keys), gdn and linear layers, growing only in
``full`` layers. Greedy (``temperature=0``) output equals recomputing the full prefix every step
(tests/test_generate.py checks it).
"""
from __future__ import annotations

from typing import Callable, Iterable

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


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, images: list | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Iterable[int] | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, seed: int | None = None,
             return_state: bool = False):
    """New token ids [B, n] (n <= max_new_tokens; rows that finished early are padded with their eos).

    ``on_token(ids [B])`` is called as each token is chosen (streaming). ``return_state`` also returns
    the decode state after the last step (for ``vlt.layers.state_nbytes``).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    device = ids.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
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
