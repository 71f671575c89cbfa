"""Streaming video through a model at constant memory: frames in, questions answered, state carried.

    stream = VideoStream(model, tokenizer, fps=2.0)
    for frame in frames:                 # PIL images or [3, H, W] tensors
        stream.add_frame(frame)
    print(stream.ask("What colour was the code?"))

The token layout is the one vlt's data trains video QA on (``vlt.data.tokenizer``): a system turn,
``<|im_start|>user\\n``, then per frame ``<t=1.5s><|vision_start|><|video_pad|> x N<|vision_end|>``,
then ``\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`` and the answer. Each frame is one engine
step of its tokens (``InferenceEngine.step_embeddings``: SWA ring / GDN states updated in place, a
CUDA graph per frame size on the GPU); the vision tower runs per frame (graphed for the Qwen2.5-VL
tower through ``vlt.qwen_vision_static``, in a CUDA graph on the GPU). ``ask`` answers from the state so far and, by
default, restores the state afterwards, so the stream continues as if the question was not asked
(``keep=True`` keeps question and answer in the context). Memory is the engine's cache: constant
for SWA / GDN / linear layouts however many frames arrive (``full`` layers need a ``capacity``).
"""
from __future__ import annotations

import sys

import torch

from vlt.inference.engine import InferenceEngine
from vlt.inference.generate import check_sampling, decode_loop
from vlt.positions import mrope_positions, text_positions


class VideoStream:
    def __init__(self, model, tokenizer, *, image_processor=None, fps: float = 1.0, system: str | None = None,
                 capacity: int | None = None, graphs: bool | None = None, compile: str | None = "auto",
                 engine: InferenceEngine | None = None):
        from vlt.data.image import ImageProcessor
        from vlt.data.tokenizer import DEFAULT_SYSTEM
        if model.vision is None:
            raise ValueError("the model has no vision tower (vision.kind='none'): it cannot take video frames")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.model, self.tok, self.fps = model, tokenizer, fps
        v = model.config.vision
        self.processor = image_processor or ImageProcessor(patch_size=v.patch_size, merge_size=v.merge_size)
        self.engine = engine or InferenceEngine(model, capacity=capacity, graphs=graphs, compile=compile)
        self.frames = 0
        self.events = None         # a list to collect (start, vision done, frame done) CUDA events per frame
        self._vision = {}          # frame grid -> the static Qwen2.5-VL tower's forward (graphed on CUDA)
        self._image_ids = model.image_token_ids
        self.video_pad = model.config.video_token_id or model.config.image_token_id
        system = DEFAULT_SYSTEM if system is None else system
        t = self.tok
        prefix = ([t.im_start_id] + t.encode("system\n" + system) + [t.im_end_id] + t.encode("\n") if system else [])
        prefix += [t.im_start_id] + t.encode("user\n")
        self.engine.reset()
        self.engine.prefill(torch.tensor(prefix))

    # -- frames ----------------------------------------------------------------------------------------
    def _pixels(self, frame):
        if isinstance(frame, torch.Tensor):
            return frame
        return self.processor(frame)

    def _features(self, pixels):
        """Vision features [n, D] of one frame."""
        dev, dt = self.engine.device, self.engine.dtype
        pixels = pixels.to(dev, dt)
        tower = self.model.vision
        qwen = sys.modules.get("vlt.qwen_vision")   # loaded whenever a model holds its tower
        if qwen is not None and isinstance(tower, qwen.QwenVisionTower):
            # the Qwen2.5-VL tower through its fixed-grid, host-sync-free forward (window order, rotary
            # table and masks built once per frame size), in a CUDA graph when the engine uses graphs
            from vlt.qwen_vision import patchify
            from vlt.qwen_vision_static import StaticQwenVision
            patches, grid = patchify(pixels, tower.patch_size, tower.merge_size, tower.temporal_patch_size)
            key = tuple(int(g) for g in grid)
            if key not in self._vision:
                static = StaticQwenVision(tower, key, compile=self.engine.compile)
                self._vision[key] = static.graphed() if self.engine.graphs else static.forward
            return self._vision[key](patches)
        return tower([pixels])

    def _embed_and_position(self, ids: list[int], feats=None, grid=None):
        dev = self.engine.device
        ids_t = torch.tensor([ids])
        start = self.engine.next_pos[:1].cpu()
        if self.engine.mrope:
            pos, _ = mrope_positions(ids_t, self._image_ids, [grid] if grid else [], None, start)
        else:
            pos = text_positions(ids_t, None, start)
        x = self.model.embed_tokens(ids_t.to(dev))
        if feats is not None:
            mask = torch.isin(ids_t.to(dev), torch.tensor(self._image_ids, device=dev))
            x = x.masked_scatter(mask[..., None], feats.to(x.dtype))
        return x, pos.to(dev)

    @torch.no_grad()
    def add_frame(self, frame) -> torch.Tensor:
        """Append one frame (a PIL image or a preprocessed [3, H, W] tensor) at time frames / fps;
        returns the next-token logits after it [V]."""
        ev = None
        if self.events is not None and self.engine.device.type == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
        pixels = self._pixels(frame)
        n = self.processor.num_tokens(pixels)
        v = self.model.config.vision
        grid = (pixels.shape[-2] // (v.patch_size * v.merge_size), pixels.shape[-1] // (v.patch_size * v.merge_size))
        t = self.tok
        ids = (t.encode(f"<t={self.frames / self.fps:.1f}s>") + [t.vision_start_id] + [self.video_pad] * n
               + [t.vision_end_id])
        feats = self._features(pixels)
        if feats.shape[0] != n:
            raise ValueError(f"the frame gives {feats.shape[0]} vision features but {n} were expected for its size "
                             f"{tuple(pixels.shape[-2:])}")
        if ev:
            ev[1].record()
        x, pos = self._embed_and_position(ids, feats, grid)
        logits = self.engine.step_embeddings(x, pos)
        if ev:
            ev[2].record()
            self.events.append(ev)
        self.frames += 1
        return logits[0]

    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, on_token=None, keep: bool = False) -> str:
        """The answer to ``question`` about the frames so far (``on_token(ids [1])`` streams it)."""
        check_sampling(max_new_tokens, temperature, top_p)
        t = self.tok
        snap = None if keep else self.engine.snapshot()
        ids = t.encode("\n" + question) + [t.im_end_id] + t.encode("\n") + [t.im_start_id] + t.encode("assistant\n")
        x, pos = self._embed_and_position(ids)
        logits = self.engine.step_embeddings(x, pos)
        self.question_logits = logits[0].clone()   # the next-token distribution after the question
        new = decode_loop(self.engine, logits, max_new_tokens, temperature, top_p, [t.eos_id, t.pad_id, t.im_end_id],
                          seed, on_token)
        if snap is not None:
            self.engine.restore(snap)
        stop = {t.eos_id, t.pad_id, t.im_end_id}
        out = []
        for i in new[0].tolist():
            if i in stop:
                break
            out.append(i)
        return t.decode(out)

    def state_nbytes(self) -> int:
        return self.engine.state_nbytes()
