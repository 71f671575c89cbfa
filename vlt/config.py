"""The model config: one serialisable dataclass tree (vision tower, projector, decoder + layout).

Named configs in the style of litgpt: ``VLMConfig.from_name("tiny-hybrid", decoder={"hidden_size": 64})``.
Every check that a user can fail (unknown mixer, layout length, window, heads) runs in
``__post_init__`` - before any parameter is allocated - and raises ValueError naming the key and
the allowed values. ``to_dict``/``from_dict`` (and ``save``/``load`` as JSON) round-trip exactly,
layout and per-layer options included; checkpoints carry this dict.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VISION_KINDS = ("timm", "qwen2_5_vl", "none")
PROJECTORS = ("patch_merger", "linear")


@dataclass
class VisionConfig:
    """Vision tower. ``timm``: any timm ViT by name (pretrained=False; ``weights_file`` loads local
    weights). ``qwen2_5_vl``: the Qwen2.5-VL ViT + merger built by transformers from ``hf_config``."""
    kind: str = "timm"
    timm_name: str = "vit_tiny_patch16_224"
    timm_kwargs: dict = field(default_factory=dict)
    weights_file: str | None = None
    hf_config: dict | None = None
    patch_size: int = 14
    merge_size: int = 2
    projector: str = "patch_merger"


@dataclass
class DecoderConfig:
    """Language decoder: pre-norm blocks of (mixer, SwiGLU MLP), RMSNorm, optional tied embeddings.

    ``layout``: pattern string or per-layer list (see vlt.layout). ``mixers``: default options per
    mixer name, e.g. ``{"swa": {"window": 8192}, "gdn": {"expand_v": 2}}``. ``num_heads``,
    ``num_kv_heads``, ``head_dim``, ``rope_theta``, ``mrope_section`` and ``norm_eps`` are passed to
    every mixer that takes them.
    """
    vocab_size: int = 272
    hidden_size: int = 128
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    layout: Any = "[swa, gdn, gdn, gdn]"
    num_layers: int | None = None
    mixers: dict = field(default_factory=dict)
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] | None = None
    tie_embeddings: bool = True
    initializer_range: float = 0.02


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    name: str = "custom"
    #: user modules that register the layout's mixers (vlt.layers.registry.import_user_modules):
    #: imported before the layout is resolved, then completed with the module of every mixer class
    #: that is not vlt's own, so checkpoints and exports name what a fresh process must import.
    imports: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = _build(VisionConfig, self.vision, "vision")
        if isinstance(self.decoder, dict):
            self.decoder = _build(DecoderConfig, self.decoder, "decoder")
        from vlt.layers.registry import import_user_modules
        self.imports = import_user_modules(self.imports, "the model config's imports (modules of its mixers)")
        self.validate()
        self.imports = sorted(set(self.imports) | set(self.mixer_modules()))

    # ---- checks that run before any allocation ------------------------------------------------
    def validate(self):
        v, d = self.vision, self.decoder
        if v.kind not in VISION_KINDS:
            raise ValueError(f"vision.kind={v.kind!r}; allowed: {list(VISION_KINDS)}")
        if v.projector not in PROJECTORS:
            raise ValueError(f"vision.projector={v.projector!r}; allowed: {list(PROJECTORS)}")
        if v.kind == "qwen2_5_vl" and not v.hf_config:
            raise ValueError("vision.hf_config is required for vision.kind='qwen2_5_vl' (the Qwen2.5-VL vision_config)")
        for key in ("vocab_size", "hidden_size", "intermediate_size"):
            if not isinstance(getattr(d, key), int) or getattr(d, key) <= 0:
                raise ValueError(f"decoder.{key} must be a positive integer, got {getattr(d, key)!r}")
        if v.kind != "none" and self.image_token_id is None:
            raise ValueError("image_token_id is required when the model has a vision tower "
                             "(the tokenizer's <|image_pad|> id; the CLI links it from the data module)")
        for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
            tid = getattr(self, key)
            if tid is not None and not 0 <= tid < d.vocab_size:
                raise ValueError(f"{key}={tid} is outside the vocabulary (decoder.vocab_size={d.vocab_size})")
        self.layers()  # layout + per-mixer options

    def shared_mixer_options(self) -> dict:
        d = self.decoder
        return dict(hidden_size=d.hidden_size, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads,
                    head_dim=d.head_dim, rope_theta=d.rope_theta, mrope_section=d.mrope_section,
                    norm_eps=d.norm_eps)

    def layers(self) -> list[tuple[str, dict]]:
        """(mixer name, options) per decoder layer, validated."""
        from vlt.layout import resolve_layout
        return resolve_layout(self.decoder.layout, self.decoder.num_layers, self.decoder.mixers,
                              self.shared_mixer_options())

    def mixer_modules(self) -> list[str]:
        """Modules outside vlt that define this layout's mixer classes."""
        from vlt.layers.registry import get_mixer_class, user_module_of
        mods = {user_module_of(get_mixer_class(name)) for name, _ in self.layers()}
        return sorted(m for m in mods if m)

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        d = copy.deepcopy(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config key(s) {sorted(unknown)}; allowed: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**d)

    def save(self, path: str | Path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "VLMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def with_overrides(self, **overrides) -> VLMConfig:
        """A new config: this one with ``overrides`` merged the way ``from_name`` merges them
        (nested dicts update key by key, ``mixers`` is replaced whole); ``self`` is unchanged."""
        d = self.to_dict()
        deep_update(d, copy.deepcopy(overrides))
        return type(self).from_dict(d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "VLMConfig":
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {sorted(NAMED_CONFIGS)}")
        d = copy.deepcopy(NAMED_CONFIGS[name])
        deep_update(d, overrides)
        d["name"] = name
        return cls.from_dict(d)


def _build(klass, d: dict, prefix: str):
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(f'{prefix}.{k}' for k in unknown)}; allowed under "
                         f"{prefix}: {sorted(names)}")
    return klass(**d)


def deep_update(base: dict, new: dict):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("mixers",):
            deep_update(base[k], v)
        else:
            base[k] = v


# Shapes of ../shared/REFERENCE.md (InfiniteVL-4B) and a tiny model for CPU runs and tests.
NAMED_CONFIGS: dict[str, dict] = {
    "tiny-hybrid": dict(
        vision=dict(kind="timm", timm_name="vit_tiny_patch16_224",
                    timm_kwargs=dict(patch_size=14, embed_dim=64, depth=2, num_heads=2, img_size=56,
                                     dynamic_img_size=True, class_token=False, reg_tokens=0),
                    patch_size=14, merge_size=2),
        decoder=dict(vocab_size=272, hidden_size=128, intermediate_size=384, num_heads=4, num_kv_heads=2,
                     layout="[swa, gdn, gdn, gdn]", mixers={"swa": {"window": 64}}, rope_theta=10000.0),
        image_token_id=261, video_token_id=262, vision_start_token_id=259),
    "infinitevl-4b": dict(
        vision=dict(kind="none"),
        decoder=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_heads=16,
                     num_kv_heads=2, head_dim=128, layout="[swa, gdn, gdn, gdn] * 9",
                     mixers={"swa": {"window": 8192, "qkv_bias": True}, "gdn": {"expand_v": 2.0}},
                     rope_theta=1_000_000.0, mrope_section=[16, 24, 24], tie_embeddings=True),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652),
}
