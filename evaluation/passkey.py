"""Passkey retrieval: a 5-digit key hidden at a given depth in filler text of a given length.

Every cell of the depth × length grid builds a prompt of exactly ``length`` tokens: an instruction,
repeated filler with the key sentence inserted after ``depth`` of the filler, and a question that the
model completes; greedy generation, scored by exact match of the first run of digits it produces.

Several models can be scored on the same prompts (``--model smollm2-comet smollm2``). A model with
bounded positions (any model but CoMeT) is not run on a cell whose prompt plus generated tokens exceed
its ``max_position_embeddings``: the cell is recorded as ``null`` with ``exceeds_max_positions`` and
drawn hatched, unless ``--score-beyond-max-positions`` asks to run it anyway.

Usage::

    python -m evaluation.passkey --model smollm2 --lengths 1024 2048 4096 8000 --output-dir results/passkey/smollm2
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .common import (
    add_model_arguments,
    add_output_arguments,
    atomic_save_figure,
    atomic_write_json,
    is_comet,
    load_model_and_tokenizer,
    max_positions,
    model_device,
    model_label,
    prepare_output,
    pyplot,
    resolve_dtype,
    run_cli,
    special_token_id,
    weights_fingerprint,
)

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5


@dataclass
class PasskeyPrompt:
    """Token ids of the pieces of a passkey prompt; the filler is tiled to fill any length."""

    instruction: list[int]
    filler: list[int]
    question: list[int]
    tokenizer: Any

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> PasskeyPrompt:
        # The instruction takes the tokenizer's usual special tokens (e.g. a BOS), the rest none.
        return cls(
            instruction=tokenizer.encode(INSTRUCTION, add_special_tokens=True),
            filler=tokenizer.encode(FILLER, add_special_tokens=False),
            question=tokenizer.encode(QUESTION, add_special_tokens=False),
            tokenizer=tokenizer,
        )

    def needle(self, key: str) -> list[int]:
        return self.tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)

    def min_length(self, key: str = "0" * KEY_DIGITS) -> int:
        return len(self.instruction) + len(self.needle(key)) + len(self.question)

    def build(self, key: str, length: int, depth: float) -> list[int]:
        """A prompt of exactly ``length`` tokens with the key sentence after ``depth`` of the filler."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"Depth must lie in [0, 1], got {depth}.")
        needle = self.needle(key)
        filler_tokens = length - len(self.instruction) - len(needle) - len(self.question)
        if filler_tokens < 0:
            raise ValueError(f"A passkey prompt needs at least {self.min_length(key)} tokens, got length {length}.")
        repeats = filler_tokens // len(self.filler) + 1
        filler = (self.filler * repeats)[:filler_tokens]
        before = int(round(depth * filler_tokens))
        return self.instruction + filler[:before] + needle + filler[before:] + self.question


def random_key(generator: np.random.Generator) -> str:
    return str(int(generator.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)))


def extract_key(text: str) -> str | None:
    """The first run of digits in the generated text (``None`` if there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.inference_mode()
def generate_answer(model: torch.nn.Module, tokenizer: Any, prompt: list[int], max_new_tokens: int) -> str:
    """Greedy answer to ``prompt``.

    CoMeT first reads all but the last prompt token chunk by chunk (``model.read``), then generates from that
    cache, which feeds only the unseen token: no forward call sees more than one chunk, so activation memory
    stays constant at any prompt length (only the token ids grow with it). Other models get the whole prompt.
    """
    input_ids = torch.tensor([prompt], dtype=torch.long, device=model_device(model))
    pad_id = special_token_id(tokenizer, model, "pad")
    if pad_id is None:
        pad_id = special_token_id(tokenizer, model, "eos")
    extra = {}
    if is_comet(model) and hasattr(model, "read") and len(prompt) > 1:
        extra["cache"] = model.read(input_ids[:, :-1])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        **extra,
    )
    return tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)


def depth_grid(num_depths: int) -> list[float]:
    if num_depths < 1:
        raise ValueError(f"Need at least one depth, got {num_depths}.")
    return [round(float(depth), 4) for depth in np.linspace(0.0, 1.0, num_depths)] if num_depths > 1 else [0.5]


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    lengths: list[int],
    depths: list[float],
    samples: int = 1,
    seed: int = 0,
    max_new_tokens: int = 10,
    score_beyond_max_positions: bool = False,
    progress: bool = True,
    description: str = "passkey",
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    done_cells: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Accuracy per (depth, length) cell; keys are drawn from ``seed`` so every model sees the same prompts.

    ``on_cell`` is called with the results so far after every cell (to save partial results). ``done_cells``:
    cells of an interrupted run, reused where length, depth, keys and whether the cell is scored all match.
    """
    if samples < 1:
        raise ValueError(f"Need at least one sample per cell, got {samples}.")
    prompt = PasskeyPrompt.from_tokenizer(tokenizer)
    too_short = [length for length in lengths if length < prompt.min_length()]
    if too_short:
        raise ValueError(f"Lengths {too_short} are shorter than a passkey prompt ({prompt.min_length()} tokens).")
    limit = max_positions(model)
    accuracy = [[None] * len(lengths) for _ in depths]  # (depths, lengths)
    cells = []
    previous = {(cell["length"], cell["depth"]): cell for cell in done_cells or []}
    bar = tqdm(total=len(lengths) * len(depths) * samples, desc=description, disable=not progress)
    for j, length in enumerate(lengths):
        exceeds = limit is not None and length + max_new_tokens > limit
        for i, depth in enumerate(depths):
            # Seeded by the cell itself, so a cell gets the same keys whatever the rest of the grid.
            generator = np.random.default_rng([seed, length, int(round(depth * 10_000))])
            keys = [random_key(generator) for _ in range(samples)]
            cell = {"length": length, "depth": depth, "keys": keys, "exceeds_max_positions": exceeds}
            skipped = exceeds and not score_beyond_max_positions
            stored = previous.get((length, depth))
            if stored is not None and stored.get("keys") == keys and (stored.get("answers") is None) == skipped:
                cells.append(stored)  # finished in an earlier, interrupted run
                accuracy[i][j] = stored.get("accuracy")
                bar.update(samples)
                continue
            if skipped:
                cell.update(answers=None, correct=None, accuracy=None)
                bar.update(samples)
            else:
                answers = []
                for key in keys:
                    answers.append(generate_answer(model, tokenizer, prompt.build(key, length, depth), max_new_tokens))
                    bar.update(1)
                correct = [extract_key(answer) == key for answer, key in zip(answers, keys, strict=True)]
                cell.update(answers=answers, correct=correct, accuracy=float(np.mean(correct)))
                accuracy[i][j] = cell["accuracy"]
                bar.set_postfix(length=length, depth=depth, acc=cell["accuracy"])
            cells.append(cell)
            if on_cell is not None:
                on_cell(_summary(accuracy, cells, limit, model))
    bar.close()
    return _summary(accuracy, cells, limit, model)


def accuracy_summary(accuracy: list[list[float | None]]) -> dict[str, Any]:
    """Per-length means (None where a depth is unscored) and the mean over scored cells of a depths × lengths grid."""
    scored = [value for row in accuracy for value in row if value is not None]
    per_length = [
        None if any(row[j] is None for row in accuracy) else float(np.mean([row[j] for row in accuracy]))
        for j in range(len(accuracy[0]))
    ]
    return {"accuracy_per_length": per_length, "mean_accuracy": float(np.mean(scored)) if scored else None}


def _summary(accuracy: list[list[float | None]], cells: list[dict], limit: int | None, model) -> dict[str, Any]:
    return {
        "max_positions": limit,
        "chunked_forward": is_comet(model),
        "accuracy": [list(row) for row in accuracy],
        **accuracy_summary(accuracy),
        "cells": list(cells),
    }


def plot(results: dict[str, dict[str, Any]], lengths: list[int], depths: list[float], path: Path) -> Path:
    """One heatmap per model: depth (rows) × length (columns), hatched where not scored."""
    plt = pyplot()
    from matplotlib.colors import LinearSegmentedColormap

    colours = LinearSegmentedColormap.from_list("passkey", ["#d7301f", "#fdcc8a", "#1a9850"])
    figure, axes = plt.subplots(
        1, len(results), figsize=(1.2 + 0.9 * len(lengths) * len(results), 1.5 + 0.45 * len(depths)), squeeze=False
    )
    for axis, (name, result) in zip(axes[0], results.items(), strict=True):
        grid = np.array([[np.nan if value is None else value for value in row] for row in result["accuracy"]])
        too_long = {(cell["length"], cell["depth"]) for cell in result["cells"] if cell["exceeds_max_positions"]}
        image = axis.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=0, vmax=1, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if np.isnan(grid[i, j]):
                    axis.add_patch(
                        plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="grey", linewidth=0)
                    )
                    label = "> max\npositions" if (lengths[j], depths[i]) in too_long else "not run"
                    axis.text(j, i, label, ha="center", va="center", fontsize=6, color="dimgrey")
                else:
                    axis.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        axis.set_xticks(range(len(lengths)), [format_length(length) for length in lengths], rotation=45)
        axis.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
        axis.set_xlabel("prompt length (tokens)")
        axis.set_ylabel("key depth")
        mean = result["mean_accuracy"]
        axis.set_title(f"{name}\nmean accuracy {mean:.2f}" if mean is not None else name, fontsize=9)
    figure.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="exact-match accuracy")
    return atomic_save_figure(figure, path)


def format_length(length: int) -> str:
    if length >= 1 << 20 and length % (1 << 20) == 0:
        return f"{length >> 20}M"
    if length >= 1024 and length % 1024 == 0:
        return f"{length >> 10}k"
    return str(length)


def parse_length(text: str) -> int:
    """``4096``, ``32k`` (×1024) or ``1M`` (×2**20)."""
    match = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (use e.g. 4096, 32k or 1M)")
    value, unit = int(match.group(1)), match.group(2).lower()
    return value * {"": 1, "k": 1 << 10, "m": 1 << 20}[unit]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.passkey",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", nargs="+", required=True, help="one or more: local folder, Hub repo id, 'smollm2', 'smollm2-comet'"
    )
    add_model_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="folder for passkey.json and passkey.png")
    add_output_arguments(parser)
    parser.add_argument(
        "--lengths", nargs="+", type=parse_length, default=[1024, 2048, 4096, 8000], help="prompt lengths in tokens"
    )
    parser.add_argument("--num-depths", type=int, default=5, help="key depths evenly spaced over [0, 1]")
    parser.add_argument("--depths", nargs="+", type=float, default=None, help="explicit key depths in [0, 1]")
    parser.add_argument("--samples", type=int, default=1, help="random keys per cell")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="tokens generated per answer")
    parser.add_argument(
        "--score-beyond-max-positions",
        action="store_true",
        help="run bounded-position models on prompts longer than max_position_embeddings instead of skipping them",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    lengths = sorted(set(args.lengths))
    depths = args.depths if args.depths is not None else depth_grid(args.num_depths)
    if any(not 0.0 <= depth <= 1.0 for depth in depths):
        raise ValueError(f"Depths must lie in [0, 1], got {depths}.")
    if args.max_new_tokens < KEY_DIGITS:
        raise ValueError(f"--max-new-tokens must be at least {KEY_DIGITS}, got {args.max_new_tokens}.")

    output_dir = Path(args.output_dir)
    dtype = resolve_dtype(args.dtype, args.device)
    prompt_text = {"instruction": INSTRUCTION, "filler": FILLER, "needle": NEEDLE, "question": QUESTION}
    settings = {"lengths": lengths, "depths": depths, "samples": args.samples, "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "prompt": prompt_text, "dtype": dtype}  # fmt: skip
    partial = prepare_output(output_dir, "passkey.json", settings, args.overwrite)  # before any model loads
    earlier = partial["models"] if partial is not None else {}
    weights = {name: weights_fingerprint(name) for name in args.model}
    for name in args.model:  # a model's partial answers are resumed only from the same weights
        if name not in earlier:
            continue
        if "weights" not in earlier[name]:
            print(
                f"warning: {output_dir / 'passkey.json'} holds answers of {name} written before weights were "
                "recorded; resuming them as the weights found now (pass --overwrite to start afresh)",
                file=sys.stderr,
            )
        elif earlier[name]["weights"] != weights[name]:
            raise FileExistsError(
                f"{output_dir / 'passkey.json'} holds a partial result of {name} from other weights "
                f"({earlier[name]['weights']} there, {weights[name]} now); pass --overwrite to replace it, or "
                "choose another --output-dir"
            )
    results = {name: result for name, result in earlier.items() if name not in args.model}  # nothing is dropped
    seconds = {name: result.get("seconds") for name, result in results.items()}

    def payload(complete: bool) -> dict[str, Any]:
        return {
            "complete": complete,
            "lengths": lengths,
            "depths": depths,
            "samples": args.samples,
            "seed": args.seed,
            "max_new_tokens": args.max_new_tokens,
            "prompt": prompt_text,
            "dtype": dtype,
            "models": results,
        }

    def save_partial(name: str, partial: dict[str, Any]) -> None:
        results[name] = {**partial, "weights": weights[name]}
        atomic_write_json(output_dir / "passkey.json", payload(complete=False))

    for name in args.model:
        if "seconds" in earlier.get(name, {}):  # this model finished in an earlier, interrupted run
            results[name], seconds[name] = earlier[name], earlier[name]["seconds"]
            print(f"{name}: kept from {output_dir / 'passkey.json'}")
            continue
        start = time.time()
        model, tokenizer = load_model_and_tokenizer(name, args.trust_remote_code, dtype, args.device)
        results[name] = evaluate_model(
            model,
            tokenizer,
            lengths,
            depths,
            args.samples,
            args.seed,
            args.max_new_tokens,
            args.score_beyond_max_positions,
            progress=not args.no_progress,
            description=f"passkey {model_label(name)}",
            on_cell=lambda partial, name=name: save_partial(name, partial),
            done_cells=earlier.get(name, {}).get("cells"),
        )
        results[name]["model_type"] = getattr(model.config, "model_type", None)
        results[name]["weights"] = weights[name]
        results[name]["seconds"] = seconds[name] = round(time.time() - start, 1)
        atomic_write_json(output_dir / "passkey.json", payload(complete=False))  # this model is finished
        del model

    final = payload(complete=True)
    atomic_write_json(output_dir / "passkey.json", final)
    plot(results, lengths, depths, output_dir / "passkey.png")
    for name, result in results.items():
        per_length = ", ".join(
            f"{format_length(length)}: {'n/a' if acc is None else f'{acc:.2f}'}"
            for length, acc in zip(lengths, result["accuracy_per_length"], strict=True)
        )
        print(f"{name}: {per_length} ({seconds[name]} s)")
    print(f"wrote {output_dir / 'passkey.json'} and .png")
    return final


if __name__ == "__main__":
    run_cli(main)
