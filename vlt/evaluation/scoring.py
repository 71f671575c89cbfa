"""Answer scoring for generated text: exact match after normalisation, numeric match, ANLS.

- ``normalise_answer``: lower case, punctuation dropped, articles (a/an/the) dropped, whitespace
  collapsed (the SQuAD / VQA convention), so "The shape is Blue." and "blue" differ only by words.
- ``exact_match``: 1.0 when the normalised prediction equals a normalised reference.
- ``numeric_match``: the first number in the prediction (digits, or a number word up to twenty)
  equals the reference number (relative tolerance 1e-9, so 3 == 3.0); for counts.
- ``anls``: Average Normalised Levenshtein Similarity (Biten et al., ICCV 2019, ST-VQA / DocVQA):
  ``1 - NLD`` for the closest reference when NLD < 0.5, else 0, with NLD the edit distance over
  the longer string's length, on lower-cased, whitespace-collapsed strings; partial credit for
  OCR-like strings where one wrong character should not count as a wrong answer.

References may be one string or a list of acceptable strings; the best one counts. Every
function returns a float in [0, 1].
"""
from __future__ import annotations

import re
import string
from typing import Iterable, Sequence

METRICS = ("exact", "numeric", "anls")
# the metric that fits each synthetic task's answer (vlt.data.synthetic); other tasks: auto
TASK_METRICS = {"color": "exact", "count": "numeric", "ocr": "anls", "needle": "anls", "dense_ocr": "anls",
                "multi_image": "exact"}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)?|[a-z]+")


def _refs(reference) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("a reference answer list is empty; give at least one acceptable answer")
    return [str(r) for r in refs]


def normalise_answer(text: str) -> str:
    text = str(text).lower()
    text = text.translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference) -> float:
    p = normalise_answer(prediction)
    return float(any(p == normalise_answer(r) for r in _refs(reference)))


def parse_number(text: str) -> float | None:
    """The first number in ``text`` ("3", "3.5", "1,000", "three"), or None."""
    for tok in _NUMBER.findall(str(text).lower()):
        if tok in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[tok])
        if tok[-1].isdigit():
            # "1,000" is a thousand, "3,5" is read as 3.5 only when the group is not 3 digits long
            head, _, tail = tok.partition(",")
            tok = head + tail if len(tail) == 3 else tok.replace(",", ".")
            return float(tok)
    return None


def numeric_match(prediction: str, reference) -> float:
    p = parse_number(prediction)
    if p is None:
        return 0.0
    for r in _refs(reference):
        q = parse_number(r)
        if q is not None and abs(p - q) <= 1e-9 * max(1.0, abs(q)):
            return 1.0
    return 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, reference, threshold: float = 0.5) -> float:
    p = " ".join(str(prediction).lower().split())
    best = 0.0
    for r in _refs(reference):
        r = " ".join(r.lower().split())
        longest = max(len(p), len(r))
        nld = levenshtein(p, r) / longest if longest else 0.0
        best = max(best, 1.0 - nld if nld < threshold else 0.0)
    return best


def metric_for(task: str, reference, metric: str = "auto") -> str:
    """The metric a sample is scored with: ``metric`` unless "auto", then the task's own
    (TASK_METRICS), then "numeric" for references that are a number, else "exact"."""
    if metric != "auto":
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} is not one of {['auto', *METRICS]}")
        return metric
    if task in TASK_METRICS:
        return TASK_METRICS[task]
    refs = _refs(reference)
    return "numeric" if all(re.fullmatch(r"\s*[-+]?\d+(\.\d+)?\s*", r) for r in refs) else "exact"


_FUNCS = {"exact": exact_match, "numeric": numeric_match, "anls": anls}


def score(prediction: str, reference, metric: str) -> float:
    return _FUNCS[metric](prediction, reference)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def length_bucket(n_tokens: int, edges: Sequence[int] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
                                                          65536, 131072)) -> str:
    """The prompt-length bucket of ``n_tokens``: "<=128", "129-256", ..., ">131072"."""
    lo = 0
    for e in edges:
        if n_tokens <= e:
            return f"<={e}" if lo == 0 else f"{lo + 1}-{e}"
        lo = e
    return f">{edges[-1]}"


def distance_bucket(distance: int, window: int | None) -> str:
    """Where the evidence sits relative to the SWA window: "in window" (distance <= window, an SWA
    layer still sees it) or "1-2x window", "2-4x window", ">4x window"; "no window" without SWA."""
    if window is None:
        return "no window"
    r = distance / window
    if r <= 1:
        return "in window"
    for lo, hi in ((1, 2), (2, 4)):
        if r <= hi:
            return f"{lo}-{hi}x window"
    return ">4x window"
