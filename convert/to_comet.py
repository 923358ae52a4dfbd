"""Turn a pretrained Llama-family causal LM into a CoMeT checkpoint folder (Hub-ready).

    python -m convert.to_comet BASE_PATH_OR_REPO OUTPUT_DIR [--chunk-size 256 --global-mem-size 8 ...]

The base weights are mapped onto the CoMeT model with an explicit key table; any base key the
table does not map, and any CoMeT key left without a value (other than the new memory), is an
error. After conversion the script checks that an input shorter than one chunk gives the base
model's logits, then writes weights (safetensors), remote code, tokenizer and a model card to a
temporary folder and renames it into place.

The output folder is checked before the base model loads: it must be missing, empty, or a CoMeT/RAM
checkpoint (holding only checkpoint files) written earlier; anything else, and any folder that contains
the base model, the working directory or the home directory, is refused (``--overwrite`` replaces a
non-checkpoint folder, never one of the latter). Replacing goes through a rename aside, so a kill at any
moment leaves the old or the new checkpoint complete (see `convert.atomic`). Input errors are one
``error: ...`` line on stderr and exit status 2. The base's own modelling code runs only with
``--trust-remote-code``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_comet import CometForCausalLM

from .atomic import atomic_directory, check_replaceable

# (base key pattern, CoMeT key template). CoMeT keeps the base names; the memory is new.
KEY_TABLE = [
    (re.compile(r"^model\.(embed_tokens|norm)\.weight$"), r"model.\1.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.(.+)$"), r"model.layers.\1.\2"),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight"),
]
NEW_KEY_PREFIX = "comet_memory."


def map_base_key(key: str) -> str:
    for pattern, template in KEY_TABLE:
        if pattern.match(key):
            return pattern.sub(template, key)
    raise KeyError(f"base weight {key!r} has no entry in the CoMeT key table")


def is_memory_key(key: str) -> bool:
    """A CoMeT memory parameter: ``comet_memory.*`` at the top level or under the backbone (``model.comet_memory.*``)."""
    return key.startswith(NEW_KEY_PREFIX) or ("." + NEW_KEY_PREFIX) in key


def canonical_memory_key(key: str) -> str:
    """``comet_memory.<rest>`` whatever module path the memory has in the model (the memory-weights file format)."""
    return NEW_KEY_PREFIX + key.split(NEW_KEY_PREFIX, 1)[1]


def check_key_mapping(base_state: dict, comet_state: dict, tied: bool) -> None:
    """Fail on any unmapped base key or any CoMeT key (outside the new memory) that nothing maps to."""
    mapped = {map_base_key(k) for k in base_state if not k.endswith("rotary_emb.inv_freq")}
    unknown = mapped - comet_state.keys()
    if unknown:
        raise KeyError(f"mapped base keys missing from the CoMeT model: {sorted(unknown)[:5]}")
    uncovered = {k for k in comet_state if not is_memory_key(k)} - mapped
    if tied:
        uncovered.discard("lm_head.weight")
    if uncovered:
        raise KeyError(f"CoMeT weights with no base weight: {sorted(uncovered)[:5]}")


def render_model_card(config, base_model: str, model_name: str, training_note: str, repo_hint: str) -> str:
    """The checkpoint's card (`convert.cards`); `convert.publish` renders it again with the repo id and results."""
    from .cards import base_model_info, render_card

    base = base_model_info(base_model, required=False)
    card = render_card(config, base, model_name=model_name, repo_id=repo_hint, training_note=training_note,
                       require_hub_metadata=False)
    return str(card)


@torch.no_grad()
def check_parity(base, model, vocab_size: int, length: int) -> float:
    ids = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    diff = (base(ids).logits - model(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"CoMeT logits differ from the base model's on a one-chunk input by {diff}")
    return diff


def load_memory_weights(model: CometForCausalLM, path: str | Path) -> None:
    """Load trained memory parameters (a safetensors file of ``comet_memory.*`` tensors), all or nothing."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"memory weights not found: {path}")
    weights = {canonical_memory_key(k) if is_memory_key(k) else k: v for k, v in load_file(path).items()}
    model_keys = {canonical_memory_key(k): k for k in model.state_dict() if is_memory_key(k)}
    expected = {k: model.state_dict()[model_keys[k]] for k in model_keys}
    if weights.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
        raise KeyError(f"memory weights in {path} do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} in {path}, model expects {tuple(expected[key].shape)}")
    model.load_state_dict({model_keys[k]: v for k, v in weights.items()}, strict=False)


def save_memory_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Write only the ``comet_memory.*`` parameters (a few MB), e.g. after memory-only fine-tuning."""
    from safetensors.torch import save_file

    from .atomic import atomic_file

    state = {canonical_memory_key(k): v.detach().contiguous() for k, v in model.state_dict().items() if is_memory_key(k)}
    if not state:
        raise ValueError("the model has no comet_memory.* parameters")
    with atomic_file(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)


MEMORY_SIZE_LIMITS = {  # field: smallest allowed value (temp_beacon_stride also takes -1: no beacons)
    "chunk_size": 1,
    "global_mem_size": 0,
    "temp_beacon_stride": 1,
    "temp_mem_budget": 1,
    "adapter_rank": 1,
    "fold_delay": 0,
}


def check_memory_fields(fields: dict) -> None:
    """Raise a `ValueError` naming every memory size that cannot build a model (before any weights load)."""
    errors = []
    for name, smallest in MEMORY_SIZE_LIMITS.items():
        if name not in fields:
            continue
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{name} must be an integer, got {value!r}")
        elif value < smallest and not (name == "temp_beacon_stride" and value == -1):
            allowed = "-1 or at least 1" if name == "temp_beacon_stride" else f"at least {smallest}"
            errors.append(f"{name} must be {allowed}, got {value}")
    chunk, stride = fields.get("chunk_size"), fields.get("temp_beacon_stride")
    if not errors and isinstance(chunk, int) and isinstance(stride, int) and stride > 0 and chunk % stride:
        errors.append(f"temp_beacon_stride ({stride}) must divide chunk_size ({chunk})")
    delay = fields.get("fold_delay")
    if not errors and isinstance(chunk, int) and isinstance(delay, int) and delay >= chunk:
        errors.append(f"fold_delay ({delay}) must be smaller than chunk_size ({chunk})")
    if errors:
        raise ValueError("; ".join(errors))


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub repo id (``owner/name`` or ``name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


def check_base_source(base_path: str | Path) -> None:
    """Fail early, with one clear message, on a missing base folder or a folder with no readable config.json."""
    name = str(base_path)
    if not looks_like_path(name):
        return  # a Hub repo id: loading reports what is wrong
    folder = Path(name).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"base model folder not found: {name}")
    if not folder.is_dir():
        raise NotADirectoryError(f"base model {name} is not a folder (expected a Hugging Face model folder)")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{name} has no config.json: not a Hugging Face model folder")
    try:
        parsed = json.loads(config.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{config} is not valid JSON: {error}") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ValueError(f"{config} has no model_type: not a Hugging Face model config")


def load_base(base_path: str | Path, trust_remote_code: bool = False):
    """(model, tokenizer) of the base; loading errors become one-line `FileNotFoundError`/`ValueError`s."""
    check_base_source(base_path)
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"cannot load the base model {base_path}: {first}") from error
    return base.eval(), tokenizer


# Memory settings a model may be read with other than those its trained weights were trained with: no parameter's
# shape depends on them (`convert(read_fields=...)`).
READ_FIELDS = frozenset({"chunk_size", "fold_delay"})


def convert(
    base_path: str | Path,
    output_dir: str | Path,
    training_note: str = "The memory parameters are freshly initialised: fine-tune before relying on long-range recall.",
    memory_weights: str | Path | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    trained_weights: str | Path | None = None,
    read_fields: tuple[str, ...] = (),
    **memory_fields,
) -> Path:
    """Convert ``base_path`` into a CoMeT checkpoint at ``output_dir`` (see the module doc for what is refused).

    ``trained_weights`` (a `convert.trained_weights` file: memory plus LoRA factors) is applied after the parity
    check, since merged LoRA factors change the base weights on purpose. Its memory settings must be the ones
    given, except those named in ``read_fields``: settings chosen for reading that no parameter's shape depends
    on (the default reads with longer chunks than it was trained with; `convert.comet_default`).
    """
    output_dir = Path(output_dir)
    check_memory_fields(memory_fields)
    if set(read_fields) - READ_FIELDS:
        raise ValueError(f"read_fields may name {sorted(READ_FIELDS)}, not {sorted(set(read_fields) - READ_FIELDS)}")
    check_base_source(base_path)
    protect = [base_path] if looks_like_path(str(base_path)) else []
    check_replaceable(output_dir, overwrite, protect=protect)  # before the (slow) load
    for kind, weights in (("memory", memory_weights), ("trained", trained_weights)):
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"{kind} weights not found: {weights}")
    base, tokenizer = load_base(base_path, trust_remote_code)
    if len(tokenizer) > base.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {base.config.vocab_size}"
        )
    model = CometForCausalLM.from_base(base, **memory_fields).eval()
    if memory_weights is not None:
        load_memory_weights(model, memory_weights)
    check_key_mapping(base.state_dict(), model.state_dict(), model.config.tie_word_embeddings)
    diff = check_parity(base, model, base.config.vocab_size, min(model.config.chunk_size, 64))
    if trained_weights is not None:
        from .trained_weights import apply_trained_weights

        apply_trained_weights(model, trained_weights, adapt_fields=read_fields)

    with atomic_directory(output_dir, overwrite=overwrite, protect=protect) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        card = render_model_card(model.config, str(base_path), output_dir.name, training_note, str(output_dir))
        (tmp / "README.md").write_text(card)
    print(f"wrote {output_dir} (one-chunk parity with the base model: max |Δlogit| = {diff:.2e})")
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert.to_comet",
        description="Convert a Llama-family causal LM into a CoMeT checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("base", help="base model folder or repo id (llama, mistral, qwen2, qwen3)")
    parser.add_argument("output_dir", help="new folder, or a CoMeT checkpoint written earlier (replaced)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--global-mem-size", type=int, default=8)
    parser.add_argument("--temp-beacon-stride", type=int, default=16, help="a beacon every N tokens; -1: none")
    parser.add_argument("--temp-mem-budget", type=int, default=64)
    parser.add_argument("--adapter-rank", type=int, default=8)
    parser.add_argument("--position-layout", choices=["default", "epl"], default="default")
    parser.add_argument("--global-write", choices=["readout", "window"], default="readout",
                        help="how the global memory is written (CometConfig.global_write)")
    parser.add_argument("--temp-write", choices=["beacon", "tail"], default="beacon",
                        help="what the temporary memory keeps (CometConfig.temp_write)")
    parser.add_argument("--fold-delay", type=int, default=0,
                        help="tokens of the next chunk read beside a full chunk before it folds (CometConfig.fold_delay)")
    parser.add_argument("--memory-weights", default=None, help="trained comet_memory.* safetensors to load")
    parser.add_argument(
        "--trained-weights", default=None, help="trained memory + LoRA file (training.export_weights) to apply"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output folder that is not a checkpoint of ours"
    )
    parser.add_argument(
        "--trust-remote-code",
        "--trust_remote_code",
        action="store_true",
        help="let the base model run modelling code from its folder or repo",
    )
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    return convert(
        args.base,
        args.output_dir,
        chunk_size=args.chunk_size,
        global_mem_size=args.global_mem_size,
        temp_beacon_stride=args.temp_beacon_stride,
        temp_mem_budget=args.temp_mem_budget,
        adapter_rank=args.adapter_rank,
        position_layout=args.position_layout,
        global_write=args.global_write,
        temp_write=args.temp_write,
        fold_delay=args.fold_delay,
        memory_weights=args.memory_weights,
        trained_weights=args.trained_weights,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )


if __name__ == "__main__":
    from evaluation.common import INPUT_ERRORS, run_cli

    run_cli(main, (*INPUT_ERRORS, KeyError))
