"""Self-describing model directories: what ``vlt generate`` runs and what users ship.

``save_pretrained_vlt(model, out_dir, tokenizer_dir=None, merge_lora=False)`` writes

- ``model.safetensors``: the state dict; with tied embeddings ``lm_head.weight`` is stored once
  (as ``embed_tokens.weight``) and re-tied on load, as transformers does;
- ``vlt_config.json``: ``{"format": "vlt", "format_version": 1, "model": VLMConfig.to_dict(),
  "layout": [...], "dtype", "tied_weights", "tokenizer": "hf" | "byte" | null, "lora": ...}`` - the
  layout and every mixer option, so the model is rebuilt exactly (no layer silently becomes
  full attention);
- tokenizer / chat template / processor files copied from ``tokenizer_dir`` (``"byte"`` records
  vlt's built-in byte tokenizer instead);
- with peft LoRA layers in the model: ``merge_lora=True`` folds them into the base weights first (in
  place, the model loses its adapters); otherwise the base weights go to model.safetensors and the
  adapters to ``adapter/`` (adapter_config.json + adapter_model.safetensors), re-attached on load.

``load_pretrained_vlt(dir) -> (VLM, tokenizer or None)``; the tokenizer is vlt.data's
(``HFTokenizer`` / ``ByteTokenizer``) when that package is importable, else transformers'.
``read_state(dir) -> (vlt_config dict, state dict with tied weights restored)`` for code that
builds the model itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

FORMAT, FORMAT_VERSION = "vlt", 1
CONFIG_FILE, WEIGHTS_FILE, ADAPTER_DIR = "vlt_config.json", "model.safetensors", "adapter"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _unwrap(model: nn.Module) -> nn.Module:
    """The vlt VLM inside a peft ``PeftModel`` (or the model itself)."""
    from vlt.model import VLM
    m = model
    for _ in range(3):  # PeftModel.base_model -> LoraModel.model -> VLM
        if isinstance(m, VLM):
            return m
        nxt = getattr(m, "base_model", None)
        m = nxt if isinstance(nxt, nn.Module) and nxt is not m else getattr(m, "model", None)
        if m is None:
            break
    raise ValueError(f"save_pretrained_vlt needs a vlt.model.VLM (optionally wrapped by peft), "
                     f"got {type(model).__name__}")


def merge_lora_(vlm: nn.Module) -> nn.Module:
    """Fold every peft LoRA layer into its base weight (in place); see vlt.lora.merge_lora."""
    from vlt.lora import merge_lora
    return merge_lora(vlm)


def save_pretrained_vlt(model: nn.Module, out_dir, tokenizer_dir=None, merge_lora: bool = False,
                        prompt: dict | None = None) -> Path:
    """Write ``model`` (a VLM, or a module holding one) as a self-describing directory ``out_dir``:
    ``model.safetensors`` (tied weights stored once), ``vlt_config.json`` (model config with the
    layout and every mixer option, the user modules it needs, dtype, LoRA info) and, from
    ``tokenizer_dir`` (``"byte"`` or an HF tokenizer folder), the tokenizer/processor files. LoRA
    adapters go to ``adapter/`` unless ``merge_lora`` folds them into the weights. Returns the path.

    ``prompt``: how the training data was templated - ``system`` (the system prompt, "" for none),
    ``min_pixels`` / ``max_pixels`` (image resize limits) - read back by ``vlt generate`` / ``vlt
    stream`` / ``vlt eval`` as their defaults, so the model is prompted the way it was trained."""
    from safetensors.torch import save_file
    vlm = _unwrap(model)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    has_lora = any("lora_" in n for n, _ in vlm.named_parameters())
    if has_lora and merge_lora:
        merge_lora_(vlm)
        has_lora = False
    state = vlm.state_dict()
    lora_info = None
    if has_lora:
        adapters = {k: v for k, v in state.items() if "lora_" in k}
        state = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
        (out / ADAPTER_DIR).mkdir(exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()},
                  str(out / ADAPTER_DIR / "adapter_model.safetensors"))
        peft_cfg = getattr(vlm, "peft_config", None) or getattr(model, "peft_config", None)
        if not peft_cfg or "default" not in peft_cfg:
            raise ValueError("the model has LoRA layers but no peft_config['default']; pass merge_lora=True to "
                             "fold them into the weights instead")
        peft_cfg["default"].save_pretrained(str(out / ADAPTER_DIR))
        lora_info = {"merged": False, "dir": ADAPTER_DIR}
    elif merge_lora:
        lora_info = {"merged": True}
    tied = {}
    if vlm.config.decoder.tie_embeddings:
        state.pop("lm_head.weight", None)
        tied["lm_head.weight"] = "embed_tokens.weight"
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    tok_kind = _copy_tokenizer(tokenizer_dir, out)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": vlm.config.to_dict(), "layout": vlm.layout,
            "dtype": str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32",
            "tied_weights": tied, "tokenizer": tok_kind, "lora": lora_info,
            "imports": list(vlm.config.imports)}  # modules to import for the layout's mixers (vlt.config)
    if prompt is not None:
        meta["prompt"] = {k: v for k, v in prompt.items() if v is not None or k == "system"}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _copy_tokenizer(tokenizer_dir, out: Path):
    if tokenizer_dir is None:
        return None
    if str(tokenizer_dir) == "byte":
        return "byte"
    src = Path(tokenizer_dir).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {str(src)!r} is not a directory; give the teacher checkpoint (or "
                                "any local HF tokenizer directory), 'byte', or None")
    found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not any(f in found for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise FileNotFoundError(f"{src} holds no tokenizer (expected tokenizer.json, or vocab.json + merges.txt)")
    for f in found + [f for f in PROCESSOR_FILES if (src / f).is_file()]:
        if (src / f).resolve() != (out / f).resolve():
            shutil.copyfile(src / f, out / f)
    return "hf"


def read_vlt_config(path) -> dict:
    """The parsed vlt_config.json of an export directory (FileNotFoundError/ValueError otherwise)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{str(p)!r} is not a directory; expected a vlt export directory "
                                f"({CONFIG_FILE} + {WEIGHTS_FILE}, written by save_pretrained_vlt / vlt export)")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (p / f).is_file():
            hint = " (this looks like a transformers checkpoint: convert it with vlt.convert first)" \
                if (p / "config.json").is_file() else ""
            raise FileNotFoundError(f"{p / f} is missing; a vlt export directory holds {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE}{hint}")
    meta = json.loads((p / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or "model" not in meta:
        raise ValueError(f"{p / CONFIG_FILE} is not a vlt export config (expected 'format': 'vlt' and a 'model' entry)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{p / CONFIG_FILE} has format_version {meta['format_version']}; this vlt reads up to "
                         f"{FORMAT_VERSION} - upgrade vlt")
    return meta


def read_state(path) -> tuple[dict, dict]:
    """(vlt_config.json contents, state dict with tied weights restored): loads with ``strict=True``."""
    from safetensors.torch import load_file
    p = Path(path).expanduser()
    meta = read_vlt_config(p)
    state = load_file(str(p / WEIGHTS_FILE))
    for dst, src in (meta.get("tied_weights") or {}).items():
        if src in state:
            state.setdefault(dst, state[src])
    return meta, state


def load_pretrained_vlt(path, dtype=None, device=None, load_adapter: bool = True):
    """(VLM in eval mode, tokenizer or None) from a directory written by ``save_pretrained_vlt``."""
    from vlt.config import VLMConfig
    from vlt.model import build_vlm, skipped_init
    p = Path(path).expanduser()
    meta, state = read_state(p)
    target = DTYPES.get(str(dtype).removeprefix("torch."), None) if dtype is not None else DTYPES.get(meta.get("dtype"))
    # built where it will run, in its dtype, with no random init: the strict load below overwrites every
    # parameter (a 4B model's init alone took 145 s on one CPU core)
    with skipped_init():
        model = build_vlm(VLMConfig.from_dict(meta["model"]), device, target or torch.float32)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{p / WEIGHTS_FILE} does not match the model described by {CONFIG_FILE} "
                         f"(layout {meta.get('layout')}): missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatches {wrong[:5]}")
    model.load_state_dict(state)
    lora = meta.get("lora") or {}
    if load_adapter and lora.get("dir"):
        _attach_adapter(model, p / lora["dir"])
    model.to(device=device, dtype=target)
    return model.eval(), load_tokenizer_from(p, meta)



def _attach_adapter(model, adir: Path):
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adir / f).is_file():
            raise FileNotFoundError(f"{adir / f} is missing; vlt_config.json says the LoRA adapters live in {adir}")
    inject_adapter_in_model(LoraConfig.from_pretrained(str(adir)), model)
    res = model.load_state_dict(load_file(str(adir / "adapter_model.safetensors")), strict=False)
    if res.unexpected_keys or any("lora_" in k for k in res.missing_keys):
        raise ValueError(f"{adir}: adapter tensors do not match the model (unexpected {res.unexpected_keys[:3]}, "
                         f"missing {[k for k in res.missing_keys if 'lora_' in k][:3]})")


def load_tokenizer_from(path, meta: dict | None = None):
    """The tokenizer an export directory records: vlt.data's when available, else transformers'."""
    p = Path(path).expanduser()
    kind = (meta or read_vlt_config(p)).get("tokenizer")
    if kind is None:
        return None
    try:
        from vlt.data.tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if kind == "byte":
        if load_tokenizer is None:
            raise ValueError(f"{p} uses vlt's byte tokenizer but vlt.data is not installed")
        return load_tokenizer("byte")
    if load_tokenizer is not None:
        return load_tokenizer(str(p))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
