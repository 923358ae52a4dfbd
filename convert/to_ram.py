"""Turn a pretrained Llama-family causal LM into a RAM checkpoint folder (Hub-ready).

    python -m convert.to_ram BASE_PATH_OR_REPO OUTPUT_DIR [--encoder-layers 8 --segment-size 32 --keep-ratio 0.25 ...]

Every weight of the RAM model is filled from the base through an explicit key table: the decoder takes the base's
weights under ``decoder.``, and the encoder takes a copy of the base's first ``encoder_layers`` layers. A base key
the table does not map, or a RAM key (other than the new ``alignment``, initialised to the identity) that no base
key fills, is an error. After conversion the script checks that with every segment kept (``keep_ratio = 1``) the
model gives the base's logits on the uncompressed prompt, then writes weights (safetensors), the model and pipeline
code, the tokenizer (with its chat template) and a model card to a temporary folder that replaces ``OUTPUT_DIR``
only once complete (`convert.atomic`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from modeling_comet.configuration_ram import RamConfig
from modeling_comet.modeling_ram import RamForCausalLM

from .atomic import atomic_directory, check_replaceable
from .cards import base_model_info, render_card
from .to_comet import load_base, looks_like_path

NEW_KEY_PREFIX = "alignment."
DEFAULT_TRAINING_NOTE = (
    "The encoder is a copy of the base's first layers and the alignment is the identity: relevance is untrained "
    "(the cosine of the copied layers' mean-pooled states). Fine-tune with `python -m training.ram_trainer`."
)


def map_base_key(key: str, encoder_layers: int) -> list[str]:
    """The RAM keys a base key fills: its decoder copy, plus its encoder copy for the first `encoder_layers` layers.

    >>> map_base_key("model.layers.1.mlp.up_proj.weight", encoder_layers=2)
    ['decoder.model.layers.1.mlp.up_proj.weight', 'encoder_layers.1.mlp.up_proj.weight']
    >>> map_base_key("model.layers.5.mlp.up_proj.weight", encoder_layers=2)
    ['decoder.model.layers.5.mlp.up_proj.weight']
    """
    if re.fullmatch(r"model\.(embed_tokens|norm)\.weight|lm_head\.weight", key):
        return [f"decoder.{key}"]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        keys = [f"decoder.{key}"]
        if layer < encoder_layers:
            keys.append(f"encoder_layers.{layer}.{rest}")
        return keys
    raise KeyError(f"base weight {key!r} has no entry in the RAM key table")


def map_state_dict(base_state: dict, ram_state: dict, encoder_layers: int, tied: bool) -> dict:
    """The RAM state dict filled from the base; fails on unmapped, unknown or uncovered keys and on shape mismatch."""
    mapped = {}
    for key, value in base_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        for target in map_base_key(key, encoder_layers):
            if target not in ram_state:
                raise KeyError(f"base weight {key!r} maps to {target!r}, which the RAM model does not have")
            if ram_state[target].shape != value.shape:
                raise ValueError(f"{target}: shape {tuple(value.shape)} in the base, {tuple(ram_state[target].shape)} in RAM")
            mapped[target] = value
    uncovered = {key for key in ram_state if not key.startswith(NEW_KEY_PREFIX)} - mapped.keys()
    if tied:
        uncovered.discard("decoder.lm_head.weight")
    if uncovered:
        raise KeyError(f"RAM weights with no base weight: {sorted(uncovered)[:5]}")
    return mapped


def build_ram(base, **ram_fields) -> RamForCausalLM:
    """A RAM model on `base` (a loaded causal LM), weights set through the key table."""
    config = RamConfig(base_config=base.config.to_dict(), **ram_fields)
    model = RamForCausalLM(config).to(base.dtype).eval()
    mapped = map_state_dict(base.state_dict(), model.state_dict(), config.encoder_layers, config.tie_word_embeddings)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    left = [key for key in missing if not key.startswith(NEW_KEY_PREFIX)]
    if config.tie_word_embeddings:
        left = [key for key in left if key != "decoder.lm_head.weight"]
    if left or unexpected:
        raise KeyError(f"loading the mapped weights left {left[:5]} missing and {unexpected[:5]} unexpected")
    if base.generation_config is not None:
        model.generation_config = base.generation_config
    return model


@torch.no_grad()
def check_parity(base, model: RamForCausalLM, vocab_size: int, context_length: int = 40, question_length: int = 6):
    """With every segment kept, RAM's logits must equal the base's on the uncompressed prompt; returns max |diff|."""
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab_size, (1, context_length), generator=generator)
    question = torch.randint(0, vocab_size, (1, question_length), generator=generator)
    keep_ratio = model.config.keep_ratio
    model.config.keep_ratio = 1.0
    try:
        logits = model(context_ids=context, question_ids=question).logits
    finally:
        model.config.keep_ratio = keep_ratio
    expected = base(torch.cat([context, question], dim=1)).logits
    diff = (logits - expected).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"RAM logits with every segment kept differ from the base model's by {diff}")
    return diff


def convert(
    base_path: str | Path,
    output_dir: str | Path,
    training_note: str = DEFAULT_TRAINING_NOTE,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    **ram_fields,
) -> Path:
    """Convert ``base_path`` into a RAM checkpoint at ``output_dir``."""
    output_dir = Path(output_dir)
    RamConfig(**ram_fields)  # invalid fields fail here, before the (slow) load
    protect = [base_path] if looks_like_path(str(base_path)) else []
    check_replaceable(output_dir, overwrite, protect=protect)  # before the (slow) load
    base, tokenizer = load_base(base_path, trust_remote_code)
    if len(tokenizer) > base.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {base.config.vocab_size}")
    model = build_ram(base, **ram_fields)
    diff = check_parity(base, model, base.config.vocab_size)
    with atomic_directory(output_dir, overwrite=overwrite, protect=protect) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        base_info = base_model_info(base_path, required=False)
        card = render_card(model.config, base_info, model_name=output_dir.name, repo_id=str(output_dir),
                           training_note=training_note, require_hub_metadata=False)
        card.save(tmp / "README.md")
    print(f"wrote {output_dir} (every segment kept: max |Δlogit| against the base = {diff:.2e})")
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert.to_ram",
        description="Convert a Llama-family causal LM into a RAM (Read As HuMan) checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("base", help="base model folder or repo id (llama, mistral, qwen2, qwen3)")
    parser.add_argument("output_dir", help="new folder, or a checkpoint written earlier (replaced)")
    parser.add_argument("--encoder-layers", type=int, default=8)
    parser.add_argument("--segment-size", type=int, default=32)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--position-layout", choices=["default", "epl"], default="default")
    parser.add_argument("--contrastive-temperature", type=float, default=0.05)
    parser.add_argument("--contrastive-weight", type=float, default=1.0)
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder that is not ours")
    parser.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true",
                        help="let the base model run modelling code from its folder or repo")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    return convert(
        args.base,
        args.output_dir,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        encoder_layers=args.encoder_layers,
        segment_size=args.segment_size,
        keep_ratio=args.keep_ratio,
        position_layout=args.position_layout,
        contrastive_temperature=args.contrastive_temperature,
        contrastive_weight=args.contrastive_weight,
    )


if __name__ == "__main__":
    from evaluation.common import INPUT_ERRORS, run_cli

    run_cli(main, (*INPUT_ERRORS, KeyError))
