"""Which parameters train: patterns, a printed table, and the guard against frozen new weights.

``trainable`` is a list of part names and/or fnmatch patterns over parameter names:
parts: mixers, mlps, norms, embeddings, projector, vision, lora, all. The guard exists because the
reference implementation trained for months with GDN's o_proj and gates frozen at random init:
any parameter that did not come from a checkpoint must train, or training refuses to start.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict

from torch import nn

PARTS = {
    "all": ["*"],
    "mixers": ["layers.*.mixer.*"],
    "mlps": ["layers.*.mlp.*"],
    "norms": ["layers.*layernorm*", "norm.weight"],
    "embeddings": ["embed_tokens.*", "lm_head.*"],
    "projector": ["vision.projector.*", "vision.merger.*", "vision.*.merger.*"],
    "vision": ["vision.*"],
    "lora": ["*lora_*"],
}


def expand(patterns: list[str]) -> list[str]:
    out = []
    for p in patterns:
        if p in PARTS:
            out += PARTS[p]
        elif any(ch in p for ch in "*?[.") :
            out.append(p)
        else:
            raise ValueError(f"trainable entry {p!r} is neither a part name nor a parameter pattern; "
                             f"parts: {sorted(PARTS)}, patterns look like 'layers.*.mixer.*'")
    return out


def apply_trainable(model: nn.Module, patterns: list[str]) -> None:
    globs = expand(patterns)
    matched = set()
    for name, p in model.named_parameters():
        hits = [g for g in globs if fnmatch.fnmatchcase(name, g)]
        p.requires_grad_(bool(hits))
        matched.update(hits)
    unused = [g for g in globs if g not in matched]
    if unused and len(unused) == len(globs):
        raise ValueError(f"trainable patterns {patterns} match no parameter of this model")


def _kind(name: str, model: nn.Module) -> str:
    if "lora_" in name:
        return "lora"
    if name.startswith("vision."):
        return "projector" if any(k in name for k in ("projector", "merger")) else "vision"
    if name.startswith(("embed_tokens", "lm_head")):
        return "embeddings"
    if ".mixer." in name:
        idx = int(name.split(".")[1])
        return f"mixer:{model.layers[idx].mixer_name}"
    if ".mlp." in name:
        return "mlp"
    return "norm"


def trainable_table(model: nn.Module) -> str:
    rows = defaultdict(lambda: [0, 0])
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue  # tied weights count once
        seen.add(id(p))
        rows[_kind(name, model)][0 if p.requires_grad else 1] += p.numel()
    lines = [f"{'module type':<18}{'trainable':>14}{'frozen':>14}"]
    tot = [0, 0]
    for k in sorted(rows):
        t, f = rows[k]
        tot[0] += t
        tot[1] += f
        lines.append(f"{k:<18}{t:>14,}{f:>14,}")
    lines.append(f"{'total':<18}{tot[0]:>14,}{tot[1]:>14,}")
    return "\n".join(lines)


def check_new_params_train(model: nn.Module, new_params: list[str]) -> None:
    params = dict(model.named_parameters())
    frozen = [n for n in new_params if n in params and not params[n].requires_grad]
    if frozen:
        shown = ", ".join(frozen[:8]) + (" ..." if len(frozen) > 8 else "")
        raise ValueError(f"{len(frozen)} newly initialised parameter(s) would stay frozen at their random init: "
                         f"{shown}. Add them to `trainable` (e.g. 'mixers' or 'layers.*.mixer.*') - training them "
                         "frozen is the bug that kept the reference's GDN o_proj at random init for months")
