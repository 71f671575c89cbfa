"""vlt.inference: the one decode and streaming path (``vlt generate``, ``vlt chat``, ``vlt stream``,
evaluation and ``vlt bench infer|stream`` all run it).

- ``InferenceEngine``: preallocated in-place cache from the mixers' declared state, per-mixer steps
  registered by class (``register_step``) with a generic fallback for any mixer, CUDA graphs;
- ``generate`` (batched, sampling on the device) and ``generate_eager`` (the reference loop);
- ``VideoStream``: frames in, questions answered, state carried at constant memory;
- ``ChatSession``: multi-turn chat, each turn continuing the carried state.
"""
from vlt.inference.engine import (EngineUnsupported, InferenceEngine, check_engine_support, compile_in_this_process,
                                  pack_projections)
from vlt.inference.generate import generate, generate_eager, sample_next
from vlt.inference.steps import GenericStep, MixerStep, StepContext, register_step, step_for
from vlt.inference.chat import ChatSession
from vlt.inference.stream import VideoStream

__all__ = ["InferenceEngine", "EngineUnsupported", "check_engine_support", "compile_in_this_process",
           "pack_projections", "generate", "generate_eager", "sample_next", "MixerStep", "GenericStep", "StepContext",
           "register_step", "step_for", "VideoStream", "ChatSession"]
