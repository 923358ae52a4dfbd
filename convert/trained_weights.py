"""Trained CoMeT weights as one small safetensors file: the memory parameters plus LoRA factors, if any.

A recall run on SmolLM2 changes only the memory (a few MB) and, with LoRA, low-rank factors of some base
projections (a few MB more). This file format keeps just those, so a long run ships in the repository and
can be applied to a freshly built CoMeT model:

* ``comet_memory.<name>``: every memory parameter, named relative to the memory module, so the file loads
  whatever module path the memory has in the model (e.g. ``comet_memory.`` or ``model.comet_memory.``);
* ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``: LoRA factors of base linear layers named as in the
  CoMeT model (``model.layers.0.self_attn.q_proj``); applying merges ``W += (alpha / r) · B @ A``.

The metadata records the format, the LoRA rank and alpha, and the CoMeT memory settings it was trained with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

FORMAT = "comet-trained-weights/1"
MEMORY = "comet_memory."
_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.(?:[^.]+\.)?weight$")
_MEMORY_FIELDS = (
    "chunk_size", "global_mem_size", "temp_beacon_stride", "temp_mem_budget", "adapter_rank", "position_layout",
    "global_write", "temp_write",
)


def _canonical(name: str) -> str | None:
    """The file key of a trainable parameter name of a (possibly PEFT-wrapped) CoMeT model, or None to skip it."""
    name = _PEFT_PREFIX.sub("", name)
    if MEMORY in name:
        rest = name.split(MEMORY, 1)[1]
        if rest.startswith("original_module."):
            return None
        rest = re.sub(r"^modules_to_save\.[^.]+\.", "", rest)
        return MEMORY + rest
    match = _LORA.match(name)
    if match:
        return f"{match['module']}.lora_{match['factor']}.weight"
    return None


def _memory_prefix(model: torch.nn.Module) -> str:
    for name, _ in model.named_modules():
        if name.endswith("comet_memory"):
            return name + "."
    raise ValueError("the model has no comet_memory module: is it a CoMeT model?")


def remap_memory_keys(state: dict, model: torch.nn.Module) -> dict:
    """Rename the memory keys of a state dict (plain or PEFT adapter) to where ``model`` keeps its memory.

    Checkpoints written before `CometModel` existed keep the memory at the top level (``comet_memory.*``,
    ``base_model.model.comet_memory.*`` in a PEFT adapter); the memory now lives in the backbone
    (``model.comet_memory.*``). Keys outside the memory are returned unchanged.
    """
    target = _memory_prefix(model)
    return {(target + key.split(MEMORY, 1)[1] if MEMORY in key else key): value for key, value in state.items()}


def save_trained_weights(model: torch.nn.Module, path: str | Path, lora_from: str | Path | None = None) -> Path:
    """Write the memory parameters and any LoRA factors of ``model`` (a CoMeT model, PEFT-wrapped or not).

    ``lora_from``: a trained-weights file whose LoRA factors are already merged into ``model``'s base (a memory-only
    run started from it, ``finetuning: memory``); its factors are written beside ``model``'s memory, so the new file
    rebuilds the trained model from the plain base. Its memory settings must be ``model``'s.

    Under FSDP2 the parameters are sharded (`DTensor`): every process must call this, each shard is gathered, and
    only the main process (rank 0) writes the file."""
    from safetensors.torch import load_file, save_file

    from .atomic import atomic_file

    tensors = {}
    for name, param in model.named_parameters():
        key = _canonical(name)
        if key is not None and (key.startswith(MEMORY) or param.requires_grad):
            value = param.detach()
            if hasattr(value, "full_tensor"):  # a DTensor shard (FSDP2): gather the whole parameter
                value = value.full_tensor()
            tensors[key] = value.float().contiguous().cpu()
    if not any(k.startswith(MEMORY) for k in tensors):
        raise ValueError("the model has no comet_memory parameters")
    comet = getattr(model, "config", None)
    if getattr(comet, "model_type", None) != "comet" and hasattr(model, "get_base_model"):
        comet = model.get_base_model().config
    settings = {f: getattr(comet, f) for f in _MEMORY_FIELDS}
    lora_meta = None
    if lora_from is not None:
        if any(".lora_" in k for k in tensors):
            raise ValueError(f"the model has LoRA factors of its own; lora_from={lora_from} is for a merged base")
        source = read_metadata(lora_from)
        # temp_write may differ: the trainer warm-starts a tail run from beacon weights (same parameters)
        if {k: v for k, v in source["memory"].items() if k != "temp_write"} != {
            k: v for k, v in settings.items() if k != "temp_write"
        }:
            raise ValueError(f"{lora_from} was trained with memory settings {source['memory']}; the model has {settings}")
        lora_meta = source.get("lora")
        factors = {k: v for k, v in load_file(str(lora_from)).items() if not k.startswith(MEMORY)}
        if set(factors) and lora_meta is None:
            raise ValueError(f"{lora_from} holds LoRA factors but no LoRA rank and alpha")
        tensors.update(factors)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return Path(path)
    metadata = {"format": FORMAT}
    peft_config = getattr(model, "peft_config", {}).get("default")
    if lora_meta is not None:
        metadata["lora"] = json.dumps(lora_meta)
    elif any(".lora_" in k for k in tensors):
        metadata["lora"] = json.dumps({"r": peft_config.r, "alpha": peft_config.lora_alpha})
    metadata["memory"] = json.dumps(settings)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a CoMeT trained-weights file (format {raw.get('format')!r}, expected {FORMAT})")
    return {k: (json.loads(v) if k != "format" else v) for k, v in raw.items()}


@torch.no_grad()
def apply_trained_weights(
    model: torch.nn.Module, path: str | Path, merge_lora: bool = True, adapt_fields: tuple[str, ...] = ()
) -> dict:
    """Load the memory and merge the LoRA factors of ``path`` into a plain CoMeT model; all or nothing.

    Fails, before changing anything, if the file's memory settings differ from the model's, if a memory
    parameter is missing or extra, or if a LoRA factor names no linear layer of the model. Returns the metadata.
    ``merge_lora=False`` loads the memory only (after the same checks), for a run that continues training the
    factors in a LoRA adapter of the same rank (`load_lora_factors`). ``adapt_fields`` names memory settings that
    may differ because the same parameters are trained on under a new setting (the trainer's warm start of a
    ``temp_write="tail"`` model from beacon-trained weights).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trained weights not found: {path}")
    metadata = read_metadata(path)
    for field, value in metadata["memory"].items():
        if field not in adapt_fields and getattr(model.config, field) != value:
            raise ValueError(f"{path} was trained with {field}={value!r}; this model has {getattr(model.config, field)!r}")
    tensors = load_file(path)
    prefix = _memory_prefix(model)
    state = model.state_dict()
    memory = {prefix + k[len(MEMORY) :]: v for k, v in tensors.items() if k.startswith(MEMORY)}
    expected = {k for k in state if k.startswith(prefix)}
    if memory.keys() != expected:
        missing, extra = sorted(expected - memory.keys()), sorted(memory.keys() - expected)
        raise KeyError(f"memory weights in {path} do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in memory.items():
        if value.shape != state[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} in {path}, model expects {tuple(state[key].shape)}")
    deltas = {}
    lora = {k: v for k, v in tensors.items() if not k.startswith(MEMORY)}
    if lora:
        scale = metadata["lora"]["alpha"] / metadata["lora"]["r"]
        modules = dict(model.named_modules())
        for key in lora:
            module_name = key.rsplit(".lora_", 1)[0]
            if not isinstance(modules.get(module_name), torch.nn.Linear):
                raise KeyError(f"{path}: LoRA factor {key} names no linear layer of this model")
            a, b = lora[f"{module_name}.lora_A.weight"], lora[f"{module_name}.lora_B.weight"]
            weight = modules[module_name].weight
            if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                raise ValueError(f"{module_name}: LoRA shapes {tuple(b.shape)}·{tuple(a.shape)} do not fit {tuple(weight.shape)}")
            deltas[module_name] = scale * (b @ a)
    model.load_state_dict(memory, strict=False)
    if not merge_lora:
        return metadata
    for module_name, delta in deltas.items():
        weight = modules[module_name].weight
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return metadata


def lora_modules(path: str | Path) -> set[str]:
    """The short names (``q_proj``, ...) of the linear layers ``path`` has LoRA factors for."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        matches = [_LORA.match(key) for key in f.keys()]
    return {m["module"].rsplit(".", 1)[-1] for m in matches if m is not None}


@torch.no_grad()
def load_lora_factors(peft_model: torch.nn.Module, path: str | Path) -> int:
    """Copy the LoRA factors of ``path`` into the matching adapter of a PEFT-wrapped CoMeT model, so that training
    continues from them (the memory is loaded by ``apply_trained_weights(..., merge_lora=False)``).

    The adapter must have the file's rank and alpha and cover every module the file names. Returns the number of
    factors copied.
    """
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    config = peft_model.peft_config["default"]
    if "lora" not in metadata:
        raise ValueError(f"{path} holds no LoRA factors")
    if (metadata["lora"]["r"], metadata["lora"]["alpha"]) != (config.r, config.lora_alpha):
        raise ValueError(
            f"{path} has LoRA r={metadata['lora']['r']}, alpha={metadata['lora']['alpha']}; the adapter has "
            f"r={config.r}, alpha={config.lora_alpha}"
        )
    params = dict(peft_model.named_parameters())
    targets = {}
    for key, value in load_file(str(path)).items():
        match = _LORA.match(key)
        if match is None:
            continue
        name = f"base_model.model.{match['module']}.lora_{match['factor']}.default.weight"
        if name not in params or params[name].shape != value.shape:
            raise KeyError(f"{path}: the adapter has no LoRA factor {name} of shape {tuple(value.shape)}")
        targets[name] = value
    for name, value in targets.items():
        params[name].copy_(value.to(params[name].dtype))
    return len(targets)


__all__ = [
    "FORMAT",
    "apply_trained_weights",
    "load_lora_factors",
    "lora_modules",
    "read_metadata",
    "remap_memory_keys",
    "save_trained_weights",
]
