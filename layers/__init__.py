"""vlt.layers: token mixers behind one contract (see base.py) and a registry to build them by name.

Built in: ``full`` (causal attention, GQA, RoPE/M-RoPE), ``swa`` (sliding window), ``linear``
(linear attention with a feature map), ``gdn`` (Gated DeltaNet), ``hybrid`` / ``swa_gdn``
(several mixers on one input). Your own mixer: subclass ``TokenMixer`` and decorate it with
``@register_mixer("name")``, or name it by class path in a layout.
"""
from vlt.layers.base import TensorSpec, TokenMixer, pack_linears, project, spec_nbytes, state_nbytes
from vlt.layers.norm import RMSNorm
from vlt.layers.registry import create_mixer, get_mixer_class, list_mixers, register_mixer
from vlt.layers import attention, gdn, hybrid, linear  # noqa: F401  (registers the built-ins)

__all__ = ["RMSNorm", "TokenMixer", "TensorSpec", "spec_nbytes", "state_nbytes", "pack_linears", "project",
           "create_mixer", "get_mixer_class", "list_mixers", "register_mixer"]
