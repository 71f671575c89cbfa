"""Evaluation: generated answers scored per task, prompt length and evidence distance (``vlt eval``).

``scoring`` (exact / numeric / ANLS), ``samples`` (vlt shards and LLaVA JSONL as eval samples),
``runner`` (batched generation through vlt.inference and aggregation), ``report`` (JSON, Markdown,
PNG)."""
from vlt.evaluation.runner import check_vocabulary, evaluate, summarise, swa_window
from vlt.evaluation.samples import RawSample, Skips, read_samples
from vlt.evaluation.scoring import anls, exact_match, normalise_answer, numeric_match, score

__all__ = ["anls", "check_vocabulary", "evaluate", "exact_match", "normalise_answer", "numeric_match", "read_samples",
           "RawSample", "score", "Skips", "summarise", "swa_window"]
