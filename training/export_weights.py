"""Export a training checkpoint's trained weights (memory + LoRA factors) as one small safetensors file.

A LoRA run's adapter gives both; a memory-only run (``finetuning: memory``) gives its memory, and the LoRA factors
are those of the ``init_trained_weights`` file it started from (merged into its frozen base while it trained).

    python -m training.export_weights --config training/recipes/smollm2_recall.yaml \\
        --checkpoint runs/smollm2-recall/checkpoint-400 --output checkpoints/smollm2-comet-recall.safetensors

The model is rebuilt from the same training configuration (base, memory fields, LoRA settings), the
checkpoint's adapter is loaded into it (memory keys mapped to the current layout), and
`convert.trained_weights.save_trained_weights` writes the file that `convert.comet_default` ships.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from convert.trained_weights import MEMORY, remap_memory_keys, save_trained_weights

from .comet_trainer import build_model, parse_config


def export(config_args: list[str], checkpoint: Path, output: Path) -> Path:
    """The trained weights of ``checkpoint``: a LoRA run's adapter (memory + factors), or a memory-only run's
    memory with the LoRA factors of the ``init_trained_weights`` it started from (merged into its base)."""
    config = parse_config(config_args)
    if config.finetuning == "memory":
        return _export_memory_run(config, checkpoint, output)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = checkpoint / "adapter_model.safetensors"
    if not adapter.is_file():
        raise FileNotFoundError(f"{checkpoint} has no adapter_model.safetensors (is it a LoRA or memory-only run?)")
    model, _ = build_model(config)
    if not hasattr(model, "peft_config"):
        raise ValueError("export reads PEFT checkpoints (finetuning lora) and memory-only runs; a full run changes "
                         "the whole base: publish its checkpoint folder instead")
    result = set_peft_model_state_dict(model, remap_memory_keys(load_file(adapter), model))
    if result.unexpected_keys:
        raise KeyError(f"{adapter} holds weights this model does not have: {result.unexpected_keys[:5]}")
    return save_trained_weights(model, output)


def _export_memory_run(config, checkpoint: Path, output: Path) -> Path:
    """``finetuning: memory`` saves the whole model (base with the init file's LoRA merged, frozen; trained memory).
    Only the memory changed, so the export is that memory plus the init file's LoRA factors."""
    import torch
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} has no model.safetensors (a memory-only run saves the whole model)")
    model, _ = build_model(config)  # the run's starting point: same config, base and merged LoRA
    with safe_open(str(weights), "pt") as f:  # read the memory's few MB, not the whole saved model
        memory = remap_memory_keys({k: f.get_tensor(k) for k in f.keys() if MEMORY in k}, model)
    expected = {k for k in model.state_dict() if MEMORY in k}
    if memory.keys() != expected:
        raise KeyError(f"{weights}: memory weights do not fit the recipe's model: missing "
                       f"{sorted(expected - memory.keys())[:5]}, unexpected {sorted(memory.keys() - expected)[:5]}")
    with torch.no_grad():
        model.load_state_dict(memory, strict=False)
    return save_trained_weights(model, output, lora_from=config.init_trained_weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training recipe (YAML) the checkpoint was trained with")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    print(export(["--config", args.config, "--output_dir", "unused-export"], args.checkpoint, args.output))


if __name__ == "__main__":
    main()
