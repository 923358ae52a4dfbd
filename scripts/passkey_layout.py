"""Where each key of a passkey result sat in its chunk, next to the answer: which misses are fold cases.

    python -m scripts.passkey_layout results/default_eval_stage4/passkey_4k_16k_21depths/passkey.json \\
        --model smollm2-comet --output layout.json

Every cell's prompt is rebuilt from its key, length and depth (`evaluation.passkey.PasskeyPrompt`, the tokenizer of
``--model``) and laid out in chunks of ``--chunk-size`` tokens (read from the model's config by default). For the
first key of the needle: the chunk offsets of its first and last token and of the ``.`` after it, and how many
chunks lie between it and the end of the prompt. Each answer is put in one class:

* ``found``: the key;
* ``fold``: missed, and the key's tokens are split by a fold, or its ``.`` is one of a chunk's first
  ``global_mem_size - 1`` tokens, so that no window of the global write (``global_write="window"``: ``G``
  consecutive tokens of one chunk) holds the key together with the ``.`` after it;
* ``cut``: missed because the answer stopped inside the key: it ends with a proper prefix of the key (the model
  restated the sentence and ran out of ``--max-new-tokens``);
* ``digits``: missed with digits that are not the key (a digit dropped, added or changed);
* ``other``: missed with no digits at all.

The table gives per length how many answers fall in each class; ``--output`` writes every cell as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

CLASSES = ("found", "fold", "cut", "digits", "other")


def key_layout(prompt: Any, key: str, length: int, depth: float, chunk_size: int) -> dict[str, int]:
    """Offsets in their chunk of the first key's first and last token and of the token holding the ``.`` after it.

    ``prompt`` is a `PasskeyPrompt`. ``chunks_back`` counts the chunks between the key's chunk and the last one.
    """
    from evaluation.passkey import NEEDLE

    ids = prompt.build(key, length, depth)
    needle_text = NEEDLE.format(key=key)
    encoded = prompt.tokenizer(needle_text, add_special_tokens=False, return_offsets_mapping=True)
    needle, offsets = encoded["input_ids"], encoded["offset_mapping"]
    start = next((i for i in range(len(ids) - len(needle) + 1) if ids[i : i + len(needle)] == needle), None)
    if start is None:
        raise ValueError(f"the needle of key {key} is not in its prompt (length {length}, depth {depth})")
    first_char = needle_text.index(key)

    def token_at(char: int) -> int:
        return next(i for i, (begin, end) in enumerate(offsets) if begin <= char < end)

    first, last, dot = (
        start + token_at(char) for char in (first_char, first_char + len(key) - 1, first_char + len(key))
    )
    return {
        "key_first": first % chunk_size,
        "key_last": last % chunk_size,
        "dot": dot % chunk_size,
        "key_split": int(first // chunk_size != last // chunk_size),
        "chunks_back": (len(ids) - 1) // chunk_size - first // chunk_size,
    }


def classify(layout: dict[str, int], key: str, answer: str, window: int) -> str:
    from evaluation.passkey import extract_key

    found = extract_key(answer)
    if found == key:
        return "found"
    if layout["key_split"] or layout["dot"] < window - 1:
        return "fold"
    if found is not None and key.startswith(found) and answer.rstrip().endswith(found):
        return "cut"
    return "digits" if found is not None else "other"


def analyse(result: dict[str, Any], tokenizer: Any, chunk_size: int, window: int) -> dict[str, Any]:
    """Every cell of every model of a ``passkey.json`` result, laid out and classified."""
    from evaluation.passkey import PasskeyPrompt

    if chunk_size < 1 or window < 1:
        raise ValueError(f"chunk size and window must be positive, got {chunk_size} and {window}")
    prompt = PasskeyPrompt.from_tokenizer(tokenizer)
    models = {}
    for name, model in result["models"].items():
        cells = []
        for cell in model["cells"]:
            for key, answer in zip(cell["keys"], cell["answers"], strict=True):
                layout = key_layout(prompt, key, cell["length"], cell["depth"], chunk_size)
                cells.append({"length": cell["length"], "depth": cell["depth"], "key": key, "answer": answer,
                              **layout, "class": classify(layout, key, answer, window)})  # fmt: skip
        counts = {}
        for length in sorted({cell["length"] for cell in cells}):
            tally = Counter(cell["class"] for cell in cells if cell["length"] == length)
            counts[str(length)] = {name: tally.get(name, 0) for name in CLASSES}
        models[name] = {"cells": cells, "counts": counts}
    return {"chunk_size": chunk_size, "window": window, "models": models}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from evaluation.common import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="a passkey.json written by evaluation.passkey")
    parser.add_argument("--model", required=True, help="the model (folder, alias) whose tokenizer built the prompts")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the model's chunk_size")
    parser.add_argument("--window", type=int, default=None, help="tokens of a global write; default: global_mem_size")
    parser.add_argument("--output", default=None, help="write every cell as JSON here")
    args = parser.parse_args(argv)

    result = json.loads(Path(args.result).read_text())
    path, _ = resolve_model_path(args.model)
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    chunk_size = args.chunk_size or config.get("chunk_size")
    window = args.window or config.get("global_mem_size")
    if chunk_size is None or window is None:
        raise ValueError(f"{args.model} has no CoMeT config: give --chunk-size and --window")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    report = analyse(result, tokenizer, chunk_size, window)
    for name, model in report["models"].items():
        print(f"{name} (chunks of {chunk_size}, windows of {window})")
        print(f"  {'length':>8} " + " ".join(f"{cls:>7}" for cls in CLASSES))
        for length, counts in model["counts"].items():
            print(f"  {length:>8} " + " ".join(f"{counts[cls]:>7}" for cls in CLASSES))
    if args.output:
        from evaluation.common import atomic_write_json

        atomic_write_json(args.output, report)
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
