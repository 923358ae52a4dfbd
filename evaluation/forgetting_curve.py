"""Forgetting curve: how far back a causal LM can copy, against what it guesses as a language model.

For each copy distance L a random corpus span X of L tokens is scored, in one teacher-forced pass with
greedy argmax, on the last ceil(L/2) tokens of its second occurrence in

- copy:           ``[BOS] X [BOS] X``  -> copy accuracy
- language model: ``[BOS] R [BOS] X``  -> LM accuracy, R an unrelated span of the same length.

The fine-grained memory length is the longest L up to which copy accuracy stays >= a threshold; the
coarse-grained one is the longest L up to which copy accuracy is significantly above LM accuracy
(paired t-test). BOS and EOS are the model's own. CoMeT is scored through its own chunked forward.

Two protocols (``--protocol``):

- ``default``: documents tokenised without special tokens and concatenated (cut after 100k tokens or 8
  spans of the longest length); X and an R disjoint from it drawn with numpy's generator over [0, N-L];
  no EOS; sample std; one-sided test (copy > LM); geometric grid with rounding.
- ``paper``: the authors' ``draw.py`` exactly: every document + ``"\\n"`` tokenised on its own (with the
  tokenizer's usual special tokens) into one stream of N tokens; R the fixed last L tokens of that stream;
  ``[BOS] R [BOS] X [EOS]`` and ``[BOS] X [BOS] X [EOS]``; after ``random.seed(seed)`` and
  ``torch.manual_seed(seed)`` each X starts at ``random.randint(0, N - 3L)``; population std (``np.std``);
  two-sided paired t-test (p = 1 when undefined); grid ``np.linspace(8, max, n, dtype=int)`` or
  ``np.unique(np.geomspace(8, max, n, dtype=int))``.

Usage::

    python -m evaluation.forgetting_curve --model smollm2 --max-length 4095 --output-dir results/forgetting_curve/smollm2
    python -m evaluation.forgetting_curve --protocol paper --model smollm2 --max-length 4094 --output-dir out
"""

from __future__ import annotations

import argparse
import math
import random
import time
import warnings
from collections.abc import Callable
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
    last_logits,
    load_model_and_tokenizer,
    max_positions,
    model_device,
    prepare_output,
    pyplot,
    resolve_dtype,
    run_cli,
    special_token_id,
    weights_fingerprint,
)

MIN_LENGTH = 8
PROTOCOLS = ("default", "paper")
PAPER_MIN_LENGTH = 8  # draw.py starts every grid at 8


# ----------------------------------------------------------------------------------------------- corpus
def default_corpus_texts() -> list[str]:
    """The standard library's ``pydoc_data.topics``: ~90k tokens of English prose, always available offline."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def load_corpus_texts(
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    text_files: list[str] | None = None,
    title_field: str | None = None,
) -> list[str]:
    """Documents from local text files, a ``datasets`` source (Hub name or local data file), or the default.

    With ``title_field`` each dataset row gives two documents, its title then its text (as the authors'
    ``draw.py`` reads PG-19: ``short_book_title`` then ``text``).
    """
    if title_field and not dataset:
        raise ValueError("--title-field applies to --dataset only.")
    if dataset and text_files:
        raise ValueError("Give either --dataset or --text-files, not both.")
    if text_files:
        missing = [name for name in text_files if not Path(name).is_file()]
        if missing:
            raise FileNotFoundError(f"Text files not found: {', '.join(missing)}")
        return [Path(name).read_text(encoding="utf-8") for name in text_files]
    if dataset:
        import datasets

        local = Path(dataset)
        if local.is_file():
            builder = {".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}.get(
                local.suffix
            )
            if builder is None:
                raise ValueError(f"Cannot tell the format of {dataset}; use .json, .jsonl, .txt, .csv or .parquet.")
            data = datasets.load_dataset(builder, data_files=str(local), split="train")
        else:
            data = datasets.load_dataset(dataset, dataset_config, split=split)
        for field in (text_field, title_field):
            if field and field not in data.column_names:
                raise ValueError(f"Dataset has no field {field!r}; its fields are {data.column_names}.")
        if title_field:
            pairs = zip(data[title_field], data[text_field], strict=True)
            return [piece for title, text in pairs for piece in (title or "", text or "")]
        return [text for text in data[text_field] if text]
    return default_corpus_texts()


def tokenize_corpus(tokenizer: Any, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate the documents' token ids (no special tokens) into one 1-D stream."""
    pieces, total = [], 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        raise ValueError("The corpus is empty.")
    return torch.cat(pieces)


def paper_corpus(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """The authors' stream: each document + ``"\\n"`` tokenised on its own, special tokens as the tokenizer adds
    them by default (``tokenizer(text)["input_ids"]`` in ``draw.py``), all concatenated, nothing cut."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n")["input_ids"])
    if not ids:
        raise ValueError("The corpus is empty.")
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- grid
def length_grid(max_length: int, num_points: int = 32, scale: str = "log", min_length: int = MIN_LENGTH) -> list[int]:
    """Copy distances from ``min_length`` to ``max_length``: evenly spaced (``linear``) or geometric (``log``).

    Rounding can merge neighbouring points at short lengths, so the grid may hold fewer than ``num_points``.
    """
    if min_length < MIN_LENGTH:
        raise ValueError(f"The minimum length must be at least {MIN_LENGTH}, got {min_length}.")
    if max_length < min_length:
        raise ValueError(f"The maximum length must be at least {min_length}, got {max_length}.")
    if num_points < 1:
        raise ValueError(f"Need at least one grid point, got {num_points}.")
    if scale == "linear":
        points = np.linspace(min_length, max_length, num_points)
    elif scale == "log":
        points = np.geomspace(min_length, max_length, num_points)
    else:
        raise ValueError(f"Unknown grid scale {scale!r}; use 'linear' or 'log'.")
    return sorted({int(round(point)) for point in points})


def paper_length_grid(max_length: int, num_points: int = 32, scale: str = "linear") -> list[int]:
    """The authors' grid: ``np.linspace(8, max, n, dtype=int)`` (truncated, duplicates kept) for ``linear``,
    ``np.unique(np.geomspace(8, max, n, dtype=int))`` for ``log``."""
    if max_length < PAPER_MIN_LENGTH:
        raise ValueError(f"The maximum length must be at least {PAPER_MIN_LENGTH}, got {max_length}.")
    if num_points < 1:
        raise ValueError(f"Need at least one grid point, got {num_points}.")
    if scale == "linear":
        points = np.linspace(PAPER_MIN_LENGTH, max_length, num=num_points, dtype=int)
    elif scale == "log":
        points = np.unique(np.geomspace(PAPER_MIN_LENGTH, max_length, num=num_points, dtype=int))
    else:
        raise ValueError(f"Unknown grid scale {scale!r}; use 'linear' or 'log'.")
    return [int(point) for point in points]


# ----------------------------------------------------------------------------------------------- scoring
def scored_count(length: int) -> int:
    """Number of scored tokens for copy distance ``length``: the last ceil(L/2) of the second span."""
    return math.ceil(length / 2)


def second_half_accuracy(model: torch.nn.Module, input_ids: torch.Tensor, length: int, trailing: int = 0) -> float:
    """Greedy accuracy on the last ceil(L/2) tokens of the second span in one teacher-forced pass.

    ``input_ids`` (1, T) ends with the second span followed by ``trailing`` tokens that are not scored (the
    paper protocol's EOS). Logits at position t predict token t+1, so the h targets ending ``trailing``
    tokens before the end need the h logits just before them.
    """
    scored = scored_count(length)
    end = input_ids.shape[1] - trailing
    logits = last_logits(model, input_ids, scored + 1 + trailing)[:, :scored]  # (1, h, V)
    targets = input_ids[:, end - scored : end]  # (1, h)
    return (logits.argmax(-1) == targets).float().mean().item()


def sample_spans(
    num_tokens: int, length: int, generator: np.random.Generator, max_tries: int = 1000
) -> tuple[int, int]:
    """Starts of two non-overlapping spans of ``length`` tokens in a stream of ``num_tokens``."""
    if num_tokens < 2 * length:
        raise ValueError(
            f"The corpus has {num_tokens} tokens, too few for two disjoint spans of {length}; "
            "use a larger corpus or a smaller --max-length."
        )
    last_start = num_tokens - length
    for _ in range(max_tries):
        copy_start = int(generator.integers(0, last_start + 1))
        before = max(0, copy_start - length + 1)  # starts r with r + L <= copy_start
        after = max(0, last_start - (copy_start + length) + 1)  # starts r >= copy_start + L
        if before + after == 0:
            continue
        pick = int(generator.integers(0, before + after))
        other_start = pick if pick < before else copy_start + length + (pick - before)
        return copy_start, other_start
    raise ValueError(f"Could not place two disjoint spans of {length} tokens in {num_tokens} tokens.")


def copy_and_lm_inputs(bos_id: int, span: torch.Tensor, unrelated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[BOS] X [BOS] X`` and ``[BOS] R [BOS] X`` as (1, 2L+2) tensors."""
    bos = torch.tensor([bos_id], dtype=torch.long)
    copy_ids = torch.cat([bos, span, bos, span])
    lm_ids = torch.cat([bos, unrelated, bos, span])
    return copy_ids.unsqueeze(0), lm_ids.unsqueeze(0)


def paper_span_starts(num_tokens: int, lengths: list[int], samples: int, seed: int) -> list[list[int]]:
    """Starts of X as ``draw.py`` draws them: after ``random.seed(seed)``, ``random.randint(0, N - 3L)`` per
    sample, length after length. A private ``random.Random(seed)`` gives the same sequence without touching
    the global generator."""
    too_long = [length for length in lengths if 3 * length > num_tokens]
    if too_long:
        raise ValueError(
            f"The corpus has {num_tokens} tokens; the paper protocol draws X from the first N - 2L tokens and "
            f"needs N >= 3L, so L = {too_long[0]} needs {3 * too_long[0]} tokens. Use a larger corpus or a "
            f"smaller --max-length (at most {num_tokens // 3})."
        )
    generator = random.Random(seed)
    return [[generator.randint(0, num_tokens - 3 * length) for _ in range(samples)] for length in lengths]


def paper_inputs(
    bos_id: int, eos_id: int, span: torch.Tensor, unrelated: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[BOS] X [BOS] X [EOS]`` and ``[BOS] R [BOS] X [EOS]`` as (1, 2L+3) tensors."""
    bos = torch.tensor([bos_id], dtype=torch.long)
    eos = torch.tensor([eos_id], dtype=torch.long)
    copy_ids = torch.cat([bos, span, bos, span, eos])
    lm_ids = torch.cat([bos, unrelated, bos, span, eos])
    return copy_ids.unsqueeze(0), lm_ids.unsqueeze(0)


def measure(
    model: torch.nn.Module,
    corpus: torch.Tensor,
    bos_id: int,
    lengths: list[int],
    samples: int = 10,
    seed: int = 0,
    progress: bool = True,
    on_length: Callable[[list[int], dict[str, list[list[float]]]], None] | None = None,
    protocol: str = "default",
    eos_id: int | None = None,
    done: dict[str, list[list]] | None = None,
) -> dict[str, list[list[float]]]:
    """Copy and LM accuracies, ``samples`` per length, with the same X for both (a paired design).

    Returns ``{"copy", "lm", "x_start", "r_start"}``, one row per length: the accuracies and where X and R
    start in ``corpus``. ``protocol="paper"`` needs ``eos_id``. ``on_length`` is called with the lengths done
    so far and their rows (to save partial results). ``done``: rows of the first lengths from an interrupted run
    (the same keys), reused after checking that the same spans are drawn again, so a resumed run is identical.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}.")
    if samples < 1:
        raise ValueError(f"Need at least one sample per length, got {samples}.")
    if protocol == "paper":
        if eos_id is None:
            raise ValueError("The paper protocol ends every input with EOS; pass eos_id.")
        torch.manual_seed(seed)  # as draw.py does; scoring itself draws nothing
        paper_starts = paper_span_starts(len(corpus), lengths, samples, seed)
    else:
        generator = np.random.default_rng(seed)
    device = model_device(model)
    rows: dict[str, list[list]] = {"copy": [], "lm": [], "x_start": [], "r_start": []}
    bar = tqdm(total=len(lengths) * samples, desc=f"forgetting curve ({protocol})", disable=not progress)
    finished = len(done["copy"]) if done else 0
    for index, length in enumerate(lengths):
        copy_row, lm_row, x_row, r_row = [], [], [], []
        if index < finished:  # drawn again (the draws of later lengths depend on it), not scored again
            for sample in range(samples):
                if protocol == "paper":
                    spans = paper_starts[index][sample], len(corpus) - length
                else:
                    spans = sample_spans(len(corpus), length, generator)
                stored = tuple(done[key][index][sample] for key in ("x_start", "r_start") if key in done)
                if len(done["copy"][index]) != samples or stored != tuple(spans)[: len(stored)]:
                    raise ValueError(f"The partial result at L={length} was drawn differently; rerun with --overwrite.")
            for key, row in zip(
                rows, (done["copy"], done["lm"], done.get("x_start"), done.get("r_start")), strict=True
            ):
                rows[key].append(list(row[index]) if row is not None else [])
            bar.update(samples)
            continue
        for sample in range(samples):
            if protocol == "paper":
                x_start, r_start = paper_starts[index][sample], len(corpus) - length
                copy_ids, lm_ids = paper_inputs(
                    bos_id, eos_id, corpus[x_start : x_start + length], corpus[r_start : r_start + length]
                )
                trailing = 1
            else:
                x_start, r_start = sample_spans(len(corpus), length, generator)
                copy_ids, lm_ids = copy_and_lm_inputs(
                    bos_id, corpus[x_start : x_start + length], corpus[r_start : r_start + length]
                )
                trailing = 0
            copy_row.append(second_half_accuracy(model, copy_ids.to(device), length, trailing))
            lm_row.append(second_half_accuracy(model, lm_ids.to(device), length, trailing))
            x_row.append(x_start)
            r_row.append(r_start)
            bar.update(1)
            bar.set_postfix(L=length, copy=f"{np.mean(copy_row):.3f}", lm=f"{np.mean(lm_row):.3f}")
        for key, row in zip(rows, (copy_row, lm_row, x_row, r_row), strict=True):
            rows[key].append(row)
        if on_length is not None:
            on_length(lengths[: len(rows["copy"])], rows)
    bar.close()
    return rows


def paired_p_value(copy_row: list[float], lm_row: list[float], protocol: str = "default") -> float:
    """Paired t-test p-value of copy against LM accuracy.

    ``default``: one-sided (copy > LM); exact 0/1 when the differences do not vary (0 for a constant positive
    gap). ``paper``: two-sided, ``scipy.stats.ttest_rel(lm, copy)`` as ``draw.py`` calls it, 1 when undefined
    (NaN: a single sample, or no difference at all).
    """
    from scipy import stats

    if protocol == "paper":
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = float(stats.ttest_rel(lm_row, copy_row).pvalue)
        return 1.0 if math.isnan(p_value) else p_value
    differences = np.asarray(copy_row) - np.asarray(lm_row)
    if len(differences) < 2 or np.allclose(differences, differences[0]):
        # No spread: the test is undefined. A constant positive gap is certain, anything else is not.
        return 0.0 if len(differences) >= 2 and differences[0] > 0 else 1.0
    return float(stats.ttest_rel(copy_row, lm_row, alternative="greater").pvalue)


def longest_prefix_length(lengths: list[int], passed: list[bool]) -> int:
    """Largest L such that every grid point up to and including L passed; 0 if the first one fails."""
    best = 0
    for length, ok in zip(lengths, passed, strict=True):
        if not ok:
            break
        best = length
    return best


def summarise(
    lengths: list[int],
    accuracies: dict[str, list[list[float]]],
    copy_threshold: float = 0.99,
    alpha: float = 0.05,
    protocol: str = "default",
) -> dict[str, Any]:
    """Mean ± std per length, paired p-values, and the fine- and coarse-grained memory lengths.

    ``default``: sample std (ddof 1; 0 for one sample) and the one-sided test; ``paper``: population std
    (``np.std``) and the two-sided test. Span starts in ``accuracies`` (``x_start``, ``r_start``) are copied
    into the rows.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}.")
    starts = [key for key in ("x_start", "r_start") if key in accuracies]
    rows = []
    for index, (length, copy_row, lm_row) in enumerate(zip(lengths, accuracies["copy"], accuracies["lm"], strict=True)):
        ddof = 1 if protocol == "default" and len(copy_row) > 1 else 0
        rows.append(
            {
                "length": length,
                "scored_tokens": scored_count(length),
                "copy_mean": float(np.mean(copy_row)),
                "copy_std": float(np.std(copy_row, ddof=ddof)),
                "lm_mean": float(np.mean(lm_row)),
                "lm_std": float(np.std(lm_row, ddof=ddof)),
                "p_value": paired_p_value(copy_row, lm_row, protocol),
                "copy": [float(value) for value in copy_row],
                "lm": [float(value) for value in lm_row],
                **{key: [int(value) for value in accuracies[key][index]] for key in starts},
            }
        )
    fine = longest_prefix_length(lengths, [row["copy_mean"] >= copy_threshold for row in rows])
    coarse = longest_prefix_length(
        lengths, [row["p_value"] < alpha and row["copy_mean"] > row["lm_mean"] for row in rows]
    )
    return {
        "protocol": protocol,
        "std": "population (ddof 0)" if protocol == "paper" else "sample (ddof 1)",
        "t_test": "paired, two-sided" if protocol == "paper" else "paired, one-sided (copy > LM)",
        "copy_threshold": copy_threshold,
        "alpha": alpha,
        "fine_memory_length": fine,
        "coarse_memory_length": coarse,
        "per_length": rows,
    }


# ----------------------------------------------------------------------------------------------- plot
def plot(summary: dict[str, Any], title: str, train_length: int | None, scale: str, path: Path) -> Path:
    """Copy and LM accuracy against L with ±std bands; training length and its half as vertical lines."""
    plt = pyplot()
    rows = summary["per_length"]
    lengths = np.array([row["length"] for row in rows])
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for key, label, colour in (("copy", "copy", "tab:blue"), ("lm", "language model", "tab:orange")):
        mean = np.array([row[f"{key}_mean"] for row in rows])
        std = np.array([row[f"{key}_std"] for row in rows])
        axis.plot(lengths, mean, marker="o", markersize=3, color=colour, label=f"{label} accuracy")
        axis.fill_between(lengths, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=colour, alpha=0.2)
    if train_length:
        axis.axvline(train_length, color="black", linestyle="--", linewidth=1, label=f"training length {train_length}")
        axis.axvline(train_length / 2, color="grey", linestyle=":", linewidth=1, label=f"half: {train_length // 2}")
    for key, style, label in (("fine_memory_length", "-", "fine"), ("coarse_memory_length", "-.", "coarse")):
        if summary[key]:
            axis.axvline(
                summary[key], color="tab:green", linestyle=style, linewidth=1, label=f"{label} memory {summary[key]}"
            )
    if scale == "log":
        axis.set_xscale("log", base=2)
    axis.set_xlabel("copy distance L (tokens)")
    axis.set_ylabel("accuracy on the last ceil(L/2) tokens")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    return atomic_save_figure(figure, path)


# ----------------------------------------------------------------------------------------------- cli
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.forgetting_curve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="local folder, Hub repo id, 'smollm2' or 'smollm2-comet'")
    add_model_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="folder for forgetting_curve.json and .png")
    add_output_arguments(parser)
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="default",
        help="'paper': the authors' draw.py exactly (corpus stream, fixed R, EOS, random.randint spans, population "
        "std, two-sided test); 'default': disjoint random R, no EOS, sample std, one-sided test",
    )
    parser.add_argument("--max-length", type=int, required=True, help=f"largest copy distance L (>= {MIN_LENGTH})")
    parser.add_argument(
        "--min-length",
        type=int,
        default=None,
        help=f"smallest copy distance L (default {MIN_LENGTH}; the paper's is fixed)",
    )
    parser.add_argument(
        "--num-points",
        type=int,
        default=32,
        help="grid points (rounding may merge some; the paper's linear grid keeps duplicates)",
    )
    parser.add_argument(
        "--grid",
        choices=["log", "linear"],
        default=None,
        help="geomspace or linspace grid (default: log; paper: linear)",
    )
    parser.add_argument("--samples", type=int, default=10, help="random spans per length")
    parser.add_argument("--copy-threshold", type=float, default=0.99, help="copy accuracy for the fine memory length")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level for the coarse memory length")
    parser.add_argument(
        "--train-length",
        type=int,
        default=None,
        help="training length to mark (default: max_position_embeddings; 0 hides it)",
    )
    parser.add_argument(
        "--allow-beyond-max-positions",
        action="store_true",
        help="score inputs (2L+2 tokens, paper: 2L+3) longer than the model's max_position_embeddings",
    )
    parser.add_argument("--bos-token-id", type=int, default=None, help="override the model's own BOS id")
    parser.add_argument(
        "--eos-token-id", type=int, default=None, help="override the model's own EOS id (paper protocol)"
    )
    corpus = parser.add_argument_group("corpus (default: the standard library's pydoc_data.topics)")
    corpus.add_argument("--dataset", default=None, help="datasets Hub name or local data file")
    corpus.add_argument("--dataset-config", default=None, help="datasets configuration name")
    corpus.add_argument("--split", default="train", help="datasets split")
    corpus.add_argument("--text-field", default="text", help="field holding the text")
    corpus.add_argument(
        "--title-field", default=None, help="field read as a document before each row's text (PG-19: short_book_title)"
    )
    corpus.add_argument("--text-files", nargs="+", default=None, help="local UTF-8 text files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if not 0 < args.copy_threshold <= 1:
        raise ValueError(f"--copy-threshold must be in (0, 1], got {args.copy_threshold}.")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}.")
    paper = args.protocol == "paper"
    grid = args.grid or ("linear" if paper else "log")
    if paper:
        if args.min_length not in (None, PAPER_MIN_LENGTH):
            raise ValueError(f"The paper protocol's grid starts at {PAPER_MIN_LENGTH}; drop --min-length.")
        lengths = paper_length_grid(args.max_length, args.num_points, grid)
    else:
        lengths = length_grid(args.max_length, args.num_points, grid, args.min_length or MIN_LENGTH)
    texts = load_corpus_texts(
        args.dataset, args.dataset_config, args.split, args.text_field, args.text_files, args.title_field
    )
    corpus_name = args.dataset or (args.text_files and [str(name) for name in args.text_files]) or "pydoc_data.topics"
    output_dir = Path(args.output_dir)
    dtype = resolve_dtype(args.dtype, args.device)
    settings = {"model": args.model, "protocol": args.protocol, "corpus": corpus_name, "grid": grid,
                "lengths": lengths, "samples": args.samples, "seed": args.seed, "dtype": dtype,
                "weights": weights_fingerprint(args.model)}  # fmt: skip
    partial = prepare_output(output_dir, "forgetting_curve.json", settings, args.overwrite)  # before the model loads
    done = None
    if partial is not None and partial.get("per_length"):
        done = {key: [row[key] for row in partial["per_length"]] for key in ("copy", "lm", "x_start", "r_start")
                if all(key in row for row in partial["per_length"])}  # fmt: skip
        print(f"resuming: {len(done['copy'])} of {len(lengths)} lengths already measured in {output_dir}")

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, args.trust_remote_code, dtype, args.device)
    bos_id = args.bos_token_id if args.bos_token_id is not None else special_token_id(tokenizer, model, "bos")
    if bos_id is None:
        raise ValueError("The model has no BOS token in its tokenizer or config; pass --bos-token-id.")
    eos_id = None
    if paper:
        eos_id = args.eos_token_id if args.eos_token_id is not None else special_token_id(tokenizer, model, "eos")
        if eos_id is None:
            raise ValueError("The model has no EOS token in its tokenizer or config; pass --eos-token-id.")
    limit = max_positions(model)
    extra = 3 if paper else 2
    longest_input = 2 * max(lengths) + extra
    if limit is not None and longest_input > limit and not args.allow_beyond_max_positions:
        raise ValueError(
            f"The longest input, 2*{max(lengths)}+{extra} = {longest_input} tokens, exceeds the model's {limit} "
            f"positions; use --max-length {(limit - extra) // 2} or --allow-beyond-max-positions."
        )
    if paper:
        corpus = paper_corpus(tokenizer, texts)  # measure() checks N >= 3L before the first forward
    else:
        # Enough text for two disjoint spans of the longest length, with room for the sampling to vary.
        corpus = tokenize_corpus(tokenizer, texts, max_tokens=max(8 * max(lengths), 100_000))

    train_length = args.train_length if args.train_length is not None else max_positions(model)
    start = time.time()

    def record(done: list[int], accuracies: dict[str, list[list[float]]], complete: bool) -> dict[str, Any]:
        return {
            "complete": complete,
            "model": args.model,
            "model_type": getattr(model.config, "model_type", None),
            "chunked_forward": is_comet(model),
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "corpus": corpus_name,
            "corpus_tokens": len(corpus),
            "grid": grid,
            "lengths": lengths,
            "samples": args.samples,
            "seed": args.seed,
            "dtype": dtype,
            "weights": settings["weights"],
            "train_length": train_length or None,
            "seconds": round(time.time() - start, 1),
            **summarise(done, accuracies, args.copy_threshold, args.alpha, args.protocol),
        }

    accuracies = measure(
        model, corpus, bos_id, lengths, args.samples, args.seed, progress=not args.no_progress,
        on_length=lambda done, partial: atomic_write_json(
            output_dir / "forgetting_curve.json", record(done, partial, complete=False)
        ),
        protocol=args.protocol, eos_id=eos_id, done=done,
    )  # fmt: skip
    result = record(lengths, accuracies, complete=True)
    atomic_write_json(output_dir / "forgetting_curve.json", result)
    fine, coarse = result["fine_memory_length"], result["coarse_memory_length"]
    protocol = " (paper protocol)" if paper else ""
    title = f"Forgetting curve{protocol}: {args.model} (memory length: fine {fine}, coarse {coarse})"
    plot(result, title, train_length or None, grid, output_dir / "forgetting_curve.png")
    print(
        f"fine-grained memory length {fine}, coarse-grained {coarse}"
        f" ({result['seconds']} s); wrote {output_dir / 'forgetting_curve.json'} and .png"
    )
    return result


if __name__ == "__main__":
    run_cli(main)
