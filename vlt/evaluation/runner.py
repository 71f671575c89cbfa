"""Generate answers through the inference engine (batched) and score them.

    results, skips = evaluate(model, tok, read_samples(...), image_processor=proc, batch_size=8)
    summary = summarise(results, skips, window=swa_window(model))

Each sample's prompt is built with the training template (``build_prompt_ids``, the export's
system prompt and image limits), ``batch_size`` prompts at a time go through one
``InferenceEngine`` (built once, with room for the longest prompt plus ``max_new_tokens``), and
decoding is greedy, so a prediction is exactly what ``vlt generate`` prints for that prompt. A model
the engine refuses (``EngineUnsupported``: a growing state whose ``state_spec`` does not follow the
capacity) is decoded by the eager loop instead, one sample at a time, with a warning saying so.

Per sample the result records the prompt length (its length bucket) and, where the sample says
where its evidence is (a ``needle`` video's ``needle_frame``, a still's ``evidence_image``, or
``evidence_distance`` in tokens in its meta), the distance in tokens from the evidence to the end of
the prompt and that distance over the model's smallest SWA window: past 1x, a window layer no longer sees the evidence.
"""
from __future__ import annotations

import logging
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch

from vlt.data.tokenizer import build_prompt_ids
from vlt.evaluation.samples import RawSample, Skips
from vlt.evaluation.scoring import distance_bucket, exact_match, length_bucket, mean, metric_for, score

log = logging.getLogger("vlt")


@dataclass
class Prepared:
    raw: RawSample
    ids: list
    evidence_distance: int | None


def check_vocabulary(model, tok, where: str = "the checkpoint") -> None:
    """ValueError when the tokenizer's ids do not fit the model (a checkpoint of another vocabulary):
    its embedding would be indexed out of range, or image tokens would not be recognised."""
    cfg = model.config
    n = cfg.decoder.vocab_size
    if tok.vocab_size > n:
        raise ValueError(f"{where}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary "
                         f"(decoder.vocab_size) is {n}; the checkpoint was trained with another tokenizer - "
                         "export it with the tokenizer it was trained with (vlt export / save_pretrained_vlt "
                         "tokenizer_dir=...)")
    if model.vision is not None:
        for key, tid in (("image_token_id", tok.image_pad_id), ("video_token_id", tok.video_pad_id),
                         ("vision_start_token_id", tok.vision_start_id)):
            want = getattr(cfg, key, None)
            if want is not None and want != tid:
                raise ValueError(f"{where}: model {key}={want} but its tokenizer's id is {tid}; the checkpoint "
                                 "and tokenizer come from different vocabularies - export it with the "
                                 "tokenizer it was trained with")


def _windows(opts):
    if isinstance(opts, dict):
        for k, v in opts.items():
            if k == "window" and isinstance(v, int) and v > 0:
                yield v
            else:
                yield from _windows(v)
    elif isinstance(opts, (list, tuple)):
        for v in opts:
            yield from _windows(v)


def swa_window(model) -> int | None:
    """The smallest attention window among the model's layers (hybrid branches included), or None."""
    found = [w for _, opts in model.config.layers() for w in _windows(opts)]
    return min(found) if found else None


def _evidence_distance(raw: RawSample, ids: list, tok) -> int | None:
    """Tokens from the start of the evidence's vision block to the end of the prompt: the sample's
    own ``evidence_distance``, else the block of video frame ``needle_frame`` or of still image
    ``evidence_image`` (0-based, in ``<image>`` order), else None."""
    meta = raw.meta or {}
    if meta.get("evidence_distance") is not None:
        return int(meta["evidence_distance"])
    text = "".join(str(t.get("value", "")) for t in raw.conversations)
    places = re.findall(r"<image>|<video>", text)
    if meta.get("needle_frame") is not None and raw.frames and "<video>" in places:
        # frame k is the k-th vision block after the stills placed before the <video> placeholder
        k = places.index("<video>") + int(meta["needle_frame"])
    elif meta.get("evidence_image") is not None and int(meta["evidence_image"]) < places.count("<image>"):
        i = int(meta["evidence_image"])
        nth = [j for j, ph in enumerate(places) if ph == "<image>"][i]
        k = nth + (len(raw.frames) - 1 if "<video>" in places[:nth] else 0)  # a video before it: its frames
    else:
        return None
    starts = [i for i, t in enumerate(ids) if t == tok.vision_start_id]
    return len(ids) - starts[k] if k < len(starts) else None


def prepare(raw: RawSample, tok, proc, system, has_vision: bool, skips: Skips) -> Prepared | None:
    """Prompt ids (image sizes read from headers, not decoded) or None (counted in ``skips``)."""
    if (raw.images or raw.frames) and not has_vision:
        skips.add("no_vision_tower", f"{raw.source}: the model has no vision tower")
        return None
    try:
        sizes = []
        for load in raw.images + raw.frames:
            with load() as im:
                sizes.append(proc.tokens_for_size(im.height, im.width))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
        skips.add("unreadable_image", f"{raw.source}: {type(e).__name__}: {e}")
        return None
    media, it, n_img = [], iter(sizes[:len(raw.images)]), len(raw.images)
    text = "".join(str(t.get("value", "")) for t in raw.conversations)
    for ph in re.findall(r"<image>|<video>", text):
        if ph == "<image>":
            media.append(next(it))
        else:
            media.append(("video", [(float(t), n) for t, n in zip(raw.timestamps, sizes[n_img:])]))
    try:
        ids = build_prompt_ids(tok, raw.conversations, media, system=system)
    except ValueError as e:
        skips.add("bad_json", f"{raw.source}: {e}")
        return None
    return Prepared(raw, ids, _evidence_distance(raw, ids, tok))


def media_inputs(p: Prepared, proc, device, dtype):
    tensors = []
    for load in p.raw.images + p.raw.frames:  # tensors follow the text order: stills, then the video
        with load() as im:
            tensors.append(proc(im).to(device, dtype))
    return tensors or None


@torch.no_grad()
def evaluate(model, tok, samples, *, image_processor, system=None, batch_size: int = 8, max_new_tokens: int = 32,
             metric: str = "auto", tasks=None, limit: int | None = None, progress: bool = True,
             engine_kwargs: dict | None = None, skips: Skips | None = None) -> tuple[list[dict], Skips]:
    """(per-sample results, skips). ``samples``: RawSamples (vlt.evaluation.samples); ``tasks``: keep
    only these; ``limit``: at most this many evaluated samples; ``skips``: the counter the reader of
    ``samples`` fills (rows it dropped), added to by this function."""
    from tqdm import tqdm

    from vlt.inference import EngineUnsupported, InferenceEngine
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch-size and --max-new-tokens must be >= 1 (got {batch_size}, {max_new_tokens})")
    skips = skips if skips is not None else Skips()
    prepared = []
    for raw in samples:
        if tasks and raw.task not in tasks:
            continue
        p = prepare(raw, tok, image_processor, system, model.vision is not None, skips)
        if p is not None:
            prepared.append(p)
            if limit is not None and len(prepared) >= limit:
                break
    if not prepared:
        raise ValueError(f"no sample left to evaluate (skipped: {dict(skips.counts) or 'none'}"
                         f"{f'; --tasks {sorted(tasks)}' if tasks else ''}); check --data, --images and --tasks")
    p0 = next(model.parameters())
    capacity = max(len(p.ids) for p in prepared) + max_new_tokens
    try:  # the engine refuses a model it cannot hold before allocating anything
        engine = InferenceEngine(model, batch_size=min(batch_size, len(prepared)), capacity=capacity,
                                 **(engine_kwargs or {}))
        batch_size = engine.batch_size
    except EngineUnsupported as e:  # a growing state whose state_spec does not follow the capacity: eager
        engine, batch_size = None, 1
        log.warning("vlt eval: %s. Decoding with the eager path instead, one sample at a time (same greedy "
                    "answers, slower)", e)
    stop = {tok.eos_id, tok.pad_id}
    results = []
    bar = tqdm(total=len(prepared), desc="eval", unit="sample", disable=not progress, file=sys.stderr)
    for start in range(0, len(prepared), batch_size):
        batch, prompts = [], []
        for p in prepared[start:start + batch_size]:
            try:
                media = media_inputs(p, image_processor, p0.device, p0.dtype)
            except Exception as e:  # a file that passed its header check but does not decode
                skips.add("unreadable_image", f"{p.raw.source}: {type(e).__name__}: {e}")
                continue
            batch.append(p)
            prompts.append((torch.tensor(p.ids, dtype=torch.long), media))
        if prompts:
            for p, row in zip(batch, _generate_rows(engine, model, prompts, max_new_tokens, sorted(stop))):
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                r = _result(p, tok.decode(row[:cut]).strip(), row[:cut], metric)
                # no end token within the budget: the answer may be cut short, and scored so
                r["cut_at_max_new_tokens"] = cut >= max_new_tokens
                results.append(r)
        bar.update(len(prepared[start:start + batch_size]))
    bar.close()
    return results, skips


def _generate_rows(engine, model, prompts, max_new_tokens: int, stop: list[int]) -> list[list[int]]:
    """Greedy new tokens per prompt: batched through the engine, or (engine None) the eager loop."""
    from vlt.inference import generate, generate_eager
    if engine is not None:
        return generate(engine, prompts, max_new_tokens=max_new_tokens, eos_token_id=stop).cpu().tolist()
    device = next(model.parameters()).device
    return [generate_eager(model, ids[None].to(device), images=media, max_new_tokens=max_new_tokens,
                           eos_token_id=stop)[0].tolist() for ids, media in prompts]


def _result(p: Prepared, prediction: str, tokens: list, metric: str) -> dict:
    raw = p.raw
    m = metric_for(raw.task, raw.reference, metric)
    return {"id": raw.id, "task": raw.task, "prompt_tokens": len(p.ids), "prediction": prediction,
            "tokens": tokens, "reference": raw.reference, "metric": m, "score": score(prediction, raw.reference, m),
            "exact": exact_match(prediction, raw.reference), "evidence_distance": p.evidence_distance,
            "source": raw.source}


def summarise(results: list[dict], skips: Skips, window: int | None) -> dict:
    """Mean score and exact match per task, per (task, prompt-length bucket) and, for samples that
    record their evidence, per (task, distance-to-window bucket)."""
    by_task, by_len, by_dist = defaultdict(list), defaultdict(lambda: defaultdict(list)), \
        defaultdict(lambda: defaultdict(list))
    for r in results:
        by_task[r["task"]].append(r)
        by_len[r["task"]][length_bucket(r["prompt_tokens"])].append(r)
        if r["evidence_distance"] is not None:
            r["window_ratio"] = r["evidence_distance"] / window if window else None
            by_dist[r["task"]][distance_bucket(r["evidence_distance"], window)].append(r)

    def agg(rs):
        return {"n": len(rs), "score": mean(r["score"] for r in rs), "exact": mean(r["exact"] for r in rs)}

    def agg_dist(rs):
        return {**agg(rs), "mean_distance": mean(r["evidence_distance"] for r in rs)}

    tasks = {t: {**agg(rs), "metric": "/".join(sorted({r["metric"] for r in rs}))} for t, rs in sorted(by_task.items())}
    return {"n": len(results), "score": mean(r["score"] for r in results), "exact": mean(r["exact"] for r in results),
            "tasks": tasks, "window": window,
            "by_length": {t: {b: agg(rs) for b, rs in sorted(bs.items(), key=lambda kv: _bucket_key(kv[0]))}
                          for t, bs in sorted(by_len.items())},
            "by_distance": {t: {b: agg_dist(rs) for b, rs in sorted(bs.items(), key=_distance_bucket_order)}
                            for t, bs in sorted(by_dist.items())},
            "skipped": skips.as_dict(), "cut_at_max_new_tokens": sum(bool(r.get("cut_at_max_new_tokens"))
                                                                      for r in results)}


def cut_answers_warning(summary: dict, max_new_tokens: int) -> str | None:
    """A sentence for answers that hit ``--max-new-tokens`` without an end token (their scores may be of a
    cut answer: a byte tokenizer spends a token per character), or None."""
    n = summary.get("cut_at_max_new_tokens", 0)
    if not n:
        return None
    return (f"{n} of {summary['n']} answers reached --max-new-tokens {max_new_tokens} without an end token, so "
            f"they may be cut short and scored as cut; raise --max-new-tokens above the longest reference "
            f"answer (in tokens)")


_DIST_ORDER = {"in window": 0, "1-2x window": 1, "2-4x window": 2, ">4x window": 3, "no window": 4}


def _distance_bucket_order(item) -> int:
    return _DIST_ORDER.get(item[0], 9)


def _bucket_key(b: str) -> int:
    digits = "".join(c if c.isdigit() else " " for c in b).split()
    return int(digits[-1]) + (1 if b.startswith(">") else 0)
