"""The embedded default CoMeT model: SmolLM2-135M-Instruct with the shipped trained memory.

    python -m convert.comet_default        # prints the folder, building it on first use

Its memory settings are those of the weights it ships (`DEFAULT_MEMORY`): with the recall weights, 8 global slots
written as a window of token states (`global_write="window"`) and a temporary memory of 16 entries holding each
chunk's last token states (`temp_write="tail"`). The recall weights were trained on 64-token chunks; the default
reads with the chunk size that the ``"read"`` entry of their record names (`READ_SETTINGS`, with the passkey
measurements that chose it): fewer folds, so the filler that follows a fact dilutes its memory less often. The
repository ships trained weights, applied in this order of preference:

* ``checkpoints/smollm2-comet-recall.safetensors``: memory plus LoRA factors from recall training
  (`training/recipes/smollm2_distill.yaml`, then `smollm2_window.yaml`, exported with `training.export_weights`),
  described by ``checkpoints/smollm2-comet-recall.json`` (stages, commands, what was measured);
* ``checkpoints/smollm2-comet-memory.safetensors``: memory only, from a short language-modelling run.

The cached folder is rebuilt whenever the weights, their record or the model code it carries (``modeling_comet/``)
change, so that loading it with ``trust_remote_code=True`` runs the code of this checkout. It lives under
``$COMET_CACHE`` (default ``~/.cache/comet``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from .atomic import atomic_file
from .smollm2 import cache_root, smollm2_path

# The memory settings `MEMORY_WEIGHTS` (the language-modelling fine-tune) were trained with.
LM_MEMORY = dict(chunk_size=256, global_mem_size=8, temp_beacon_stride=16, temp_mem_budget=64)
CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
RECALL_WEIGHTS = CHECKPOINTS / "smollm2-comet-recall.safetensors"
RECALL_INFO = CHECKPOINTS / "smollm2-comet-recall.json"
MEMORY_WEIGHTS = CHECKPOINTS / "smollm2-comet-memory.safetensors"
MODEL_CODE = Path(__file__).resolve().parent.parent / "modeling_comet"


def _read_settings() -> dict:
    """Memory settings the default reads with in place of those its recall weights were trained with: the
    ``"read"`` entry of ``RECALL_INFO`` (with the measurements that chose it), empty if there is none."""
    if not (RECALL_WEIGHTS.is_file() and RECALL_INFO.is_file()):
        return {}
    return dict(json.loads(RECALL_INFO.read_text()).get("read", {}).get("settings", {}))


def _shipped_memory() -> dict:
    """The default's memory settings: those the shipped recall weights were trained with (their metadata) with
    `READ_SETTINGS` over them, else those of the language-modelling memory weights."""
    if RECALL_WEIGHTS.is_file():
        from .trained_weights import read_metadata

        return {**read_metadata(RECALL_WEIGHTS)["memory"], **READ_SETTINGS}
    return dict(LM_MEMORY)


READ_SETTINGS = _read_settings()
DEFAULT_MEMORY = _shipped_memory()
STAMP = "comet_default.json"
TRAINED_NOTE = (
    "Only the memory parameters were fine-tuned (base frozen), for 60 steps (10 CPU minutes) with the "
    "language-modelling loss on two-chunk samples of the standard library's pydoc prose "
    "(`python -m training.comet_trainer --finetuning memory`). On held-out samples this brought the "
    "next-token loss after the first chunk from 4.44 (fresh memory) to 3.21, against 3.11 for SmolLM2 "
    "reading only the current chunk and 2.69 with full attention (`results/comet_lm_loss.json`): the memory "
    "no longer disturbs the model much, but it has not learned to carry information across chunks."
)


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _code_sha256() -> str:
    """One hash of the model files a checkpoint carries (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(MODEL_CODE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _fingerprint() -> dict:
    return {
        "memory": DEFAULT_MEMORY,
        "memory_weights_sha256": _sha256(MEMORY_WEIGHTS),
        "recall_weights_sha256": _sha256(RECALL_WEIGHTS),
        "recall_info_sha256": _sha256(RECALL_INFO),
        "model_code_sha256": _code_sha256(),
    }


def recall_note() -> str:
    """The model card's training note for the recall weights, from ``RECALL_INFO``."""
    info = json.loads(RECALL_INFO.read_text()) if RECALL_INFO.is_file() else {}
    return info.get("note", "Memory and LoRA factors trained on passkey and associative recall.")


def comet_default_path(force: bool = False) -> Path:
    """Folder of the default CoMeT model, loadable with ``from_pretrained(..., trust_remote_code=True)``."""
    target = cache_root() / "smollm2-comet"
    fingerprint = _fingerprint()
    stamp = target / STAMP
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return target
    from .to_comet import convert

    if fingerprint["recall_weights_sha256"] is not None:
        kwargs = dict(trained_weights=RECALL_WEIGHTS, training_note=recall_note(), read_fields=tuple(READ_SETTINGS))
    elif fingerprint["memory_weights_sha256"] is not None:  # (then DEFAULT_MEMORY is LM_MEMORY)
        kwargs = dict(memory_weights=MEMORY_WEIGHTS, training_note=TRAINED_NOTE)
    else:
        kwargs = {}
    convert(smollm2_path(), target, **kwargs, **DEFAULT_MEMORY)
    with atomic_file(target / STAMP) as tmp:
        tmp.write_text(json.dumps(fingerprint))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    print(comet_default_path(force=parser.parse_args(argv).force))


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
