"""Export a training checkpoint's trained weights (memory + LoRA factors) as one small safetensors file.

    python -m training.export_weights --config training/recipes/smollm2_recall.yaml \\
        --checkpoint runs/smollm2-recall/checkpoint-400 --output checkpoints/smollm2-comet-recall.safetensors

The model is rebuilt from the same training configuration (base, memory fields, LoRA settings), the
checkpoint's adapter is loaded into it (memory keys mapped to the current layout), and
`convert.trained_weights.save_trained_weights` writes the file that `convert.comet_default` ships.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from convert.trained_weights import remap_memory_keys, save_trained_weights

from .comet_trainer import build_model, parse_config


def export(config_args: list[str], checkpoint: Path, output: Path) -> Path:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = parse_config(config_args)
    adapter = checkpoint / "adapter_model.safetensors"
    if not adapter.is_file():
        raise FileNotFoundError(f"{checkpoint} has no adapter_model.safetensors (is it a LoRA or memory-only run?)")
    model, _ = build_model(config)
    if not hasattr(model, "peft_config"):
        raise ValueError("export reads PEFT checkpoints (finetuning lora); a full or memory-only run saves the model")
    result = set_peft_model_state_dict(model, remap_memory_keys(load_file(adapter), model))
    if result.unexpected_keys:
        raise KeyError(f"{adapter} holds weights this model does not have: {result.unexpected_keys[:5]}")
    return save_trained_weights(model, output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training recipe (YAML) the checkpoint was trained with")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    print(export(["--config", args.config, "--output_dir", "unused-export"], args.checkpoint, args.output))


if __name__ == "__main__":
    main()
