"""A multi-turn chat over the inference engine: each turn continues the carried state.

    chat = ChatSession(model, tokenizer, system="")
    print(chat.say("What colour is the shape?", images=[pil_image]))
    print(chat.say("And its size?"))

Turns are rendered as vlt's data templates them for training (ChatML, ``<image>`` expanded to
``<|vision_start|><|image_pad|> x N<|vision_end|>``); a turn's tokens (the previous answer's end
included) are prefilled from the state the last turn left (``InferenceEngine.prefill(extend=True)``),
so a conversation never re-reads its history, and its memory is the engine's cache: constant for
SWA / GDN / linear layouts, ``capacity`` tokens for full attention.
"""
from __future__ import annotations

import torch

from vlt.inference.engine import InferenceEngine
from vlt.inference.generate import check_sampling, decode_loop


class ChatSession:
    def __init__(self, model, tokenizer, *, image_processor=None, system: str | None = None,
                 capacity: int | None = 8192, graphs: bool | None = None, compile: str | None = "auto"):
        from vlt.data.tokenizer import DEFAULT_SYSTEM
        self.model, self.tok = model, tokenizer
        if image_processor is None and model.vision is not None:
            from vlt.data.image import ImageProcessor
            v = model.config.vision
            image_processor = ImageProcessor(patch_size=v.patch_size, merge_size=v.merge_size)
        self.processor = image_processor
        grows = any(getattr(b.mixer, "state_grows", False) for b in model.layers)
        self.engine = InferenceEngine(model, capacity=capacity if grows else None, graphs=graphs, compile=compile)
        self.engine.reset()
        system = DEFAULT_SYSTEM if system is None else system
        t = tokenizer
        self.pending = ([t.im_start_id] + t.encode("system\n" + system) + [t.im_end_id] + t.encode("\n")
                        if system else [])
        self.turns = 0

    @torch.no_grad()
    def say(self, text: str, images=(), max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, on_token=None) -> str:
        """The model's answer to ``text`` (with ``images``: PIL images or [3, H, W] tensors)."""
        check_sampling(max_new_tokens, temperature, top_p)
        t = self.tok
        if images and self.model.vision is None:
            raise ValueError("the model has no vision tower (vision.kind='none'): it cannot take images")
        pixels = [im if isinstance(im, torch.Tensor) else self.processor(im) for im in images]
        dev, dt = self.engine.device, self.engine.dtype
        media = []
        for p in pixels:
            media += [t.vision_start_id] + [t.image_pad_id] * self.processor.num_tokens(p) + [t.vision_end_id]
        ids = self.pending + [t.im_start_id] + t.encode("user\n") + media + t.encode(text) + [t.im_end_id] + \
            t.encode("\n") + [t.im_start_id] + t.encode("assistant\n")
        logits = self.engine.prefill(torch.tensor(ids), [p.to(dev, dt) for p in pixels] or None, extend=True)
        stop = [t.im_end_id, t.eos_id, t.pad_id]
        # one host sync per token: the loop stops right at the end of the answer, so nothing past it
        # enters the state the next turn continues from
        new = decode_loop(self.engine, logits[None], max_new_tokens, temperature, top_p, stop, seed, on_token,
                          sync_every=1)[0].tolist()
        answer = new
        if new and new[-1] in stop:
            answer = new[:-1]
        # the last sampled token was not fed to the model: it opens the next turn, with the turn's end
        self.pending = new[-1:] + ([] if new and new[-1] == t.im_end_id else [t.im_end_id]) + t.encode("\n")
        self.turns += 1
        self.last_answer_ids = answer
        return t.decode(answer)

    def state_nbytes(self) -> int:
        return self.engine.state_nbytes()
