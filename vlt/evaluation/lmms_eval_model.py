"""vlt exports as an lmms-eval model (the optional extra: ``pip install "vlt[lmms]"``).

    lmms-eval --model vlt --model_args ckpt=my-model,device=cuda,batch_size=8 --tasks chartqa

The class registers under the model name ``vlt`` through the Python entry-point group
``lmms_eval.models`` (pyproject.toml; lmms-eval >= 0.7.3 reads it when ``lmms_eval.models`` is
imported). It is a "simple" lmms-eval model: a request's text context and ``doc_to_visual`` images
become one user turn, built with ``vlt eval``'s prompt builder (``vlt.evaluation.runner.prepare``:
the export's chat template, system prompt and image limits), and ``batch_size`` prompts at a time
are decoded by one ``vlt.inference.InferenceEngine`` through ``vlt.inference.generate`` - so at
temperature 0 an answer is token for token what ``vlt eval`` / ``vlt generate`` produce for that
prompt. The images go where the context's ``<image>`` placeholders are when there is one per image,
else before the text (as ``vlt generate --image`` puts them).

Supported: ``generate_until`` with ``until`` (stop strings: the answer is cut before the first;
a stop string that is one token of the tokenizer also ends that row's decoding early),
``max_new_tokens`` (default 128), ``temperature`` / ``top_p`` / ``do_sample`` (temperature 0 or
``do_sample: false`` = greedy). Not supported, each with an error that says so: ``loglikelihood``
(multiple-choice scoring by likelihood), ``generate_until_multi_round`` and agentic tasks, video and
audio inputs (NotImplementedError); ``num_beams`` > 1 and several processes (accelerate / torchrun)
(ValueError).

Model args (``--model_args k=v,...``): ``ckpt`` (required: a directory written by ``vlt export`` /
``save_pretrained_vlt``, or a Qwen2.5-VL directory), ``device`` (auto, cpu, cuda, cuda:N),
``dtype`` (float32, bfloat16, float16; default: as saved), ``batch_size``, ``max_pixels``,
``system`` (default: the export's), and the engine options of ``vlt eval --engine-option``
(``graphs``, ``fused``, ``compile``, ``pack``, ``pdl``, ``chunk_attention``). lmms-eval's own
``--batch_size`` / ``--device`` fill in what ``--model_args`` leaves out.

lmms-eval is imported by this module only: ``import vlt`` never needs it.
"""
from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from vlt.eval_cli import ENGINE_KEYS

try:
    from lmms_eval.api.model import lmms
except ImportError as e:  # the extra is not installed
    raise ImportError(f"vlt's lmms-eval adapter needs lmms-eval ({e}); install it with "
                      "pip install \"vlt[lmms]\" (or pip install lmms-eval)") from e

log = logging.getLogger("vlt")

MODEL_NAME = "vlt"
DEFAULT_MAX_NEW_TOKENS = 128
DTYPES = ("float32", "bfloat16", "float16")
MODEL_ARGS = ("ckpt", "device", "dtype", "batch_size", "max_pixels", "system", *ENGINE_KEYS)
# generation keys tasks commonly carry that change nothing for vlt's decoding
_INERT_GEN_KEYS = frozenset({"use_cache", "image_aspect_ratio"})
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_SUPPORTED = ("the vlt lmms-eval model supports output_type generate_until only (text + images in, text out, "
              "greedy or sampled)")


def lmms_eval_manifest():
    """The entry-point payload (group ``lmms_eval.models``): model name ``vlt`` -> :class:`VltModel`."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VltModel")


@dataclass(frozen=True)
class Decoding:
    """One request's generation settings; requests with equal settings share batches."""

    max_new_tokens: int
    temperature: float
    top_p: float
    until: tuple[str, ...]


def decoding_from(gen_kwargs: dict | None) -> Decoding:
    """lmms-eval's ``generation_kwargs`` -> :class:`Decoding` (ValueError naming a bad key)."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    if not all(isinstance(s, str) for s in until):
        raise ValueError(f"generation_kwargs until={until!r}: expected a string or a list of strings")
    max_new = kw.pop("max_new_tokens", None)
    max_new = DEFAULT_MAX_NEW_TOKENS if max_new is None else max_new
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"generation_kwargs max_new_tokens={max_new!r}: expected an integer >= 1")
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    top_p = kw.pop("top_p", None)
    top_p = 1.0 if top_p is None else float(top_p)
    if kw.pop("do_sample", None) is False:  # transformers' convention: no sampling whatever the temperature
        temperature = 0.0
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generation_kwargs temperature={temperature}, top_p={top_p}: need temperature >= 0 "
                         "(0 = greedy) and 0 < top_p <= 1")
    beams = kw.pop("num_beams", 1)
    if beams not in (None, 1):
        raise ValueError(f"generation_kwargs num_beams={beams}: vlt decodes greedily or by sampling; set num_beams: 1")
    ignored = sorted(k for k, v in kw.items() if v is not None and k not in _INERT_GEN_KEYS)
    if ignored:
        log.warning("vlt lmms-eval model: ignoring generation_kwargs %s (supported: until, max_new_tokens, "
                    "temperature, top_p, do_sample)", ignored)
    return Decoding(max_new, temperature if temperature > 0 else 0.0, top_p if temperature > 0 else 1.0,
                    tuple(s for s in until if s))


def cut_at_stop(text: str, until) -> str:
    """``text`` up to the first occurrence of any stop string, then stripped (as ``vlt eval``)."""
    cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=len(text))
    return text[:cut].strip()


def _option(key: str, value, allowed: str):
    return ValueError(f"vlt lmms-eval model: {key}={value!r} is not valid; allowed: {allowed}")


class VltModel(lmms):
    """A vlt export as an lmms-eval model (``--model vlt``); see the module docstring."""

    is_simple = True

    def __init__(self, ckpt=None, device="auto", dtype=None, batch_size=1, max_pixels=None, system=None,
                 **engine) -> None:
        super().__init__()
        import torch

        from vlt.eval_cli import engine_options
        from vlt.evaluation.runner import check_vocabulary
        from vlt.generate_cli import image_processor, load_for_inference, prompt_record, system_prompt
        unknown = sorted(k for k in engine if k not in ENGINE_KEYS)
        if unknown:
            raise ValueError(f"vlt lmms-eval model: unknown model arg(s) {unknown}; allowed: {list(MODEL_ARGS)}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("vlt lmms-eval model runs in one process (WORLD_SIZE="
                             f"{os.environ['WORLD_SIZE']}); launch lmms_eval without accelerate/torchrun")
        if not ckpt:
            raise ValueError("vlt lmms-eval model: ckpt is required: --model_args ckpt=DIR (a directory written "
                             "by vlt export / save_pretrained_vlt)")
        path = Path(str(ckpt)).expanduser()
        if not path.is_dir():
            raise ValueError(f"vlt lmms-eval model: ckpt={str(ckpt)!r} is not a directory; give one written by "
                             "vlt export / save_pretrained_vlt")
        device = str(device or "auto")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise _option("device", device, "auto, cpu, cuda, cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"vlt lmms-eval model: device={device!r} but CUDA is not available; use device=cpu")
        if dtype in ("", "auto"):
            dtype = None
        if dtype is not None and dtype not in DTYPES:
            raise _option("dtype", dtype, f"{', '.join(DTYPES)} or auto (as saved)")
        try:
            batch_size = int(str(batch_size))
        except ValueError:
            raise _option("batch_size", batch_size, "an integer >= 1 (auto batch sizes are not supported)") from None
        if batch_size < 1:
            raise _option("batch_size", batch_size, "an integer >= 1")
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise _option("max_pixels", max_pixels, "an integer >= 1 (pixels per image)")
        try:  # booleans arrive parsed (True), the engine-option parser takes text
            self.engine_kwargs = engine_options([f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                                 for k, v in engine.items()])
        except ValueError as e:
            raise ValueError(f"vlt lmms-eval model: {str(e).replace('--engine-option ', '')}") from None
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model, self.tok = load_for_inference(str(path), self.device, dtype)
        check_vocabulary(self.model, self.tok, str(path))
        self.proc = image_processor(path, self.model, max_pixels) if self.model.vision is not None else None
        self.system = system_prompt(_Args(None if system is None else str(system)), prompt_record(path))
        self.batch_size = batch_size
        self.stop_ids = sorted({self.tok.eos_id, self.tok.pad_id})
        self._engine = None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Like lmms-eval's, except that ``--model_args`` wins over lmms-eval's own ``--batch_size`` /
        ``--device`` (always passed, so a key in both would otherwise be a duplicate-argument TypeError)."""
        from lmms_eval.utils import simple_parse_args_string
        args = simple_parse_args_string(arg_string or "")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ------------------------------------------------------------------------------------ requests
    def loglikelihood(self, requests):
        raise NotImplementedError(f"{_SUPPORTED}; loglikelihood (multiple-choice scoring by likelihood) is not "
                                  "implemented: pick the task's generate_until variant")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{_SUPPORTED}; generate_until_multi_round is not implemented")

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in order; requests with the same generation settings are batched."""
        import torch
        from tqdm import tqdm

        from vlt.evaluation.runner import media_inputs
        if not requests:
            return []
        # two passes over the requests: prompt lengths first (the engine's capacity; images are only
        # measured and then dropped, so a benchmark's images never sit in memory all at once), then
        # per batch the same prompts with their images loaded
        work = [(len(p.ids), d) for p, d in map(self._prepare, requests)]
        groups = defaultdict(list)
        for i, (_, decoding) in enumerate(work):
            groups[decoding].append(i)
        self._ensure_engine(max(n + d.max_new_tokens for n, d in work), len(work))
        p0 = next(self.model.parameters())
        answers: list[str | None] = [None] * len(work)
        bar = tqdm(total=len(work), desc="vlt responding", disable=self.rank != 0)
        for decoding, idx in groups.items():
            stop_ids = self.stop_ids + self._single_token_stops(decoding.until)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                prompts = []
                for i in chunk:
                    p = self._prepare(requests[i])[0]
                    prompts.append((torch.tensor(p.ids, dtype=torch.long), media_inputs(p, self.proc, p0.device,
                                                                                        p0.dtype)))
                for i, row in zip(chunk, self._generate(prompts, decoding, stop_ids)):
                    cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
                    answers[i] = cut_at_stop(self.tok.decode(row[:cut]), decoding.until)
                bar.update(len(chunk))
        bar.close()
        return answers

    def _prepare(self, request):
        """(vlt.evaluation.runner.Prepared, Decoding) for one lmms-eval generate_until request."""
        from vlt.evaluation.runner import prepare
        from vlt.evaluation.samples import RawSample, Skips
        args = request.args
        if len(args) != 6 or not isinstance(args[1], (dict, type(None))):
            raise NotImplementedError(f"{_SUPPORTED}; got a {request.request_type} request of another shape "
                                      "(chat-message or agentic tasks are not implemented)")
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        decoding = decoding_from(gen_kwargs)
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        loaders = [_loader(v, task, doc_id) for v in _flatten(visuals)]
        text = str(context)
        if text.count("<image>") != len(loaders):   # no placeholder per image: images first, as vlt generate
            text = "<image>\n" * len(loaders) + text.replace("<image>", "")
        raw = RawSample(f"{task}/{doc_id}", task, [{"from": "human", "value": text.replace("<video>", "")}], "",
                        loaders, source=f"{task}[{split}][{doc_id}]")
        skips = Skips()
        p = prepare(raw, self.tok, self.proc, self.system, self.model.vision is not None, skips)
        if p is None:
            reason, detail = next(iter(skips.examples.items()))
            raise ValueError(f"vlt lmms-eval model: cannot build the prompt of {detail[0]} ({reason})")
        return p, decoding

    def _single_token_stops(self, until) -> list[int]:
        """Stop strings the tokenizer writes as one token: decoding stops there (the text is cut anyway)."""
        ids = []
        for s in until:
            enc = self.tok.encode(s)
            if len(enc) == 1 and self.tok.decode(enc) == s:
                ids.append(int(enc[0]))
        return ids

    def _ensure_engine(self, capacity: int, n: int) -> None:
        """One engine for the whole call (rebuilt only when a later call needs more room)."""
        from vlt.inference import EngineUnsupported, InferenceEngine
        rows = min(self.batch_size, n)
        e = self._engine
        if e is not None and (e == "eager" or (e.capacity >= capacity and e.batch_size >= rows)):
            return
        try:  # the engine refuses a model it cannot hold before allocating anything
            self._engine = InferenceEngine(self.model, batch_size=rows, capacity=capacity, **self.engine_kwargs)
        except EngineUnsupported as err:
            self._engine = "eager"
            log.warning("vlt lmms-eval model: %s. Decoding with the eager path instead, one prompt at a time "
                        "(same greedy answers, slower)", err)

    def _generate(self, prompts, d: Decoding, stop_ids) -> list[list[int]]:
        from vlt.inference import generate, generate_eager
        kw = dict(max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p, eos_token_id=stop_ids)
        if self._engine != "eager":
            return generate(self._engine, prompts, **kw).cpu().tolist()
        return [generate_eager(self.model, ids[None].to(self.device), media, **kw)[0].tolist()
                for ids, media in prompts]


@dataclass
class _Args:  # what vlt.generate_cli.system_prompt reads from the command line
    system: str | None


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for x in visuals for v in _flatten(x)]


def _loader(visual, task, doc_id):
    """A callable that returns a fresh PIL image (vlt's prompt builder closes the images it opens)."""
    from PIL import Image
    if isinstance(visual, Image.Image):
        return visual.copy
    if isinstance(visual, (str, os.PathLike)) and str(visual).lower().endswith(_IMAGE_SUFFIXES):
        return lambda: Image.open(visual)
    raise NotImplementedError(f"{_SUPPORTED}; {task} doc {doc_id} gives a {type(visual).__name__} visual "
                              f"({str(visual)[:80]!r}): only images (PIL images or image files) are, not video or "
                              "audio")
