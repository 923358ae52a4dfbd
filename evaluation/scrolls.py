"""SCROLLS: generate answers to the seven long-input tasks and score them with each task's metric.

Data comes through ``datasets``: the Hub dataset ``tau/scrolls`` online, or local JSON/JSONL files
(``--data-files``) with the SCROLLS fields ``id``, ``input`` and ``output``; rows sharing an ``id``
are one example with several references. SCROLLS puts the query (if any) before the document, so an
input longer than the token budget is cut at its end and the query survives.

Metrics (see ``evaluation.scrolls_metrics``), as the official scorer computes them: geometric mean of
ROUGE-1/2/L F1 for GovReport, SummScreenFD and QMSum (ROUGE-Lsum reported too, on sentence-split text);
token F1 for Qasper and NarrativeQA; exact match for QuALITY and ContractNLI; aggregates rounded to 4
decimals. With all seven tasks the SCROLLS score (their mean) is reported as well.

Usage::

    python -m evaluation.scrolls --model smollm2 --tasks qasper --data-files qasper=data/qasper.jsonl --output-dir out
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    prepare_output,
    pyplot,
    resolve_dtype,
    run_cli,
    special_token_id,
    weights_fingerprint,
)
from .scrolls_metrics import SCROLLS_TASKS, score_examples, scrolls_score, sentence_splitter

HUB_DATASET = "tau/scrolls"


@dataclass(frozen=True)
class ScrollsTask:
    metric: str  # "rouge", "f1" or "exact_match"
    instruction: str
    answer_prefix: str
    max_new_tokens: int

    @property
    def single_line(self) -> bool:
        """Short answers end at the first line break; summaries keep every line."""
        return self.metric != "rouge"


_QUERY = "given at the start of the text"
TASKS: dict[str, ScrollsTask] = {
    "gov_report": ScrollsTask("rouge", "Write a one-paragraph summary of the report above.", "Summary:", 256),
    "summ_screen_fd": ScrollsTask("rouge", "Write a short summary of the episode script above.", "Summary:", 128),
    "qmsum": ScrollsTask("rouge", f"Answer the query {_QUERY}, using the meeting transcript.", "Answer:", 128),
    "qasper": ScrollsTask(
        "f1",
        f"Answer the question {_QUERY}, using the article, as briefly as possible. Answer 'Yes' or 'No' to a "
        "yes/no question and 'Unanswerable' if the article does not tell.",
        "Answer:",
        32,
    ),
    "narrative_qa": ScrollsTask("f1", f"Answer the question {_QUERY}, using the story, in a few words.", "Answer:", 32),
    "quality": ScrollsTask(
        "exact_match", f"Answer the multiple-choice question {_QUERY} by copying the correct option.", "Answer:", 48
    ),
    "contract_nli": ScrollsTask(
        "exact_match",
        f"Does the contract entail the statement {_QUERY}, contradict it, or not mention it? "
        "Reply with Entailment, Contradiction or Not mentioned.",
        "Answer:",
        16,
    ),
}


# ----------------------------------------------------------------------------------------------- data
def parse_data_files(entries: list[str] | None, tasks: list[str]) -> dict[str, str]:
    """``TASK=PATH`` entries (or one bare ``PATH`` when a single task is asked for) -> {task: path}."""
    files: dict[str, str] = {}
    for entry in entries or []:
        task, sep, path = entry.partition("=")
        if not sep:
            if len(tasks) != 1:
                raise ValueError(f"With several tasks, give data files as TASK=PATH; got {entry!r}.")
            task, path = tasks[0], entry
        if task not in TASKS:
            raise ValueError(f"Unknown SCROLLS task {task!r} in --data-files; choose from {', '.join(TASKS)}.")
        if not Path(path).is_file():
            raise FileNotFoundError(f"Data file for {task} not found: {path}")
        files[task] = path
    return files


def load_examples(task: str, split: str, data_file: str | None = None) -> list[dict[str, Any]]:
    """Examples ``{"id", "input", "references"}`` in first-seen order, references grouped by ``id``."""
    import datasets

    if data_file is not None:
        rows = datasets.load_dataset("json", data_files=data_file, split="train")
    else:
        rows = datasets.load_dataset(HUB_DATASET, task, split=split)
    missing = {"id", "input", "output"} - set(rows.column_names)
    if missing:
        raise ValueError(f"{data_file or HUB_DATASET}:{task} lacks the SCROLLS fields {sorted(missing)}.")
    examples: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for row in rows:
        if row["output"] is None:
            raise ValueError(f"{task} example {row['id']} has no reference output (the test split has none).")
        example = examples.setdefault(row["id"], {"id": row["id"], "input": row["input"], "references": []})
        example["references"].append(row["output"])
    if not examples:
        raise ValueError(f"No {task} examples in {data_file or f'{HUB_DATASET} ({split})'}.")
    return list(examples.values())


# ----------------------------------------------------------------------------------------------- prompts
def build_prompt(tokenizer: Any, task: ScrollsTask, text: str, max_input_tokens: int | None) -> tuple[list[int], bool]:
    """``[specials] input[:budget] \\n\\n instruction \\n answer_prefix`` as ids; also whether the input was cut."""
    head = tokenizer.encode("", add_special_tokens=True)  # the tokenizer's own leading specials (e.g. BOS)
    body = tokenizer.encode(text, add_special_tokens=False)
    tail = tokenizer.encode(f"\n\n{task.instruction}\n{task.answer_prefix}", add_special_tokens=False)
    truncated = False
    if max_input_tokens is not None:
        budget = max_input_tokens - len(head) - len(tail)
        if budget <= 0:
            raise ValueError(f"--max-input-tokens {max_input_tokens} leaves no room for the input.")
        truncated = len(body) > budget
        body = body[:budget]
    return head + body + tail, truncated


def postprocess(task: ScrollsTask, text: str) -> str:
    text = text.strip()
    return text.split("\n", 1)[0].strip() if task.single_line else text


@torch.inference_mode()
def generate(model: torch.nn.Module, tokenizer: Any, prompt: list[int], max_new_tokens: int) -> str:
    input_ids = torch.tensor([prompt], dtype=torch.long, device=model_device(model))
    pad_id = special_token_id(tokenizer, model, "pad")
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id if pad_id is not None else special_token_id(tokenizer, model, "eos"),
    )
    return tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    name: str,
    examples: list[dict[str, Any]],
    max_input_tokens: int | None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    done: list[dict[str, Any]] | None = None,
    on_example: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Generate and score every example. ``on_example`` gets the records so far after each prediction (to save
    them); ``done``: records of an interrupted run, reused for examples with the same id, prompt and references."""
    task = TASKS[name]
    new_tokens = max_new_tokens or task.max_new_tokens
    previous = {record["id"]: record for record in done or []}
    predictions, records = [], []
    for example in tqdm(examples, desc=f"scrolls {name}", disable=not progress):
        prompt, truncated = build_prompt(tokenizer, task, example["input"], max_input_tokens)
        record = previous.get(example["id"])
        if (
            record is None
            or record.get("prompt_tokens") != len(prompt)
            or record.get("references") != list(example["references"])
        ):
            prediction = postprocess(task, generate(model, tokenizer, prompt, new_tokens))
            record = {
                "id": example["id"],
                "prompt_tokens": len(prompt),
                "truncated": truncated,
                "prediction": prediction,
                "references": example["references"],
            }
        else:
            record = {key: value for key, value in record.items() if key != "scores"}
        predictions.append(record["prediction"])
        records.append(record)
        if on_example is not None:
            on_example(records)
    metrics, per_example = score_examples(task.metric, predictions, [example["references"] for example in examples])
    for record, scores in zip(records, per_example, strict=True):
        record["scores"] = scores
    return {"metric": task.metric, "max_new_tokens": new_tokens, "metrics": metrics, "examples": records}


def input_budget(model: torch.nn.Module, requested: int | None, max_new_tokens: int) -> int | None:
    """Token budget of a prompt: the request, else what fits the model's positions; CoMeT takes everything."""
    limit = max_positions(model)
    if requested is not None:
        if limit is not None and requested + max_new_tokens > limit:
            raise ValueError(
                f"--max-input-tokens {requested} plus {max_new_tokens} new tokens exceeds the model's {limit} positions."
            )
        return requested
    return None if limit is None else limit - max_new_tokens


def plot(results: dict[str, dict[str, Any]], title: str, path: Path) -> Path:
    plt = pyplot()
    names = list(results)
    scores = [results[name]["metrics"]["score"] for name in names]
    figure, axis = plt.subplots(figsize=(1.5 + 1.1 * len(names), 4))
    bars = axis.bar(names, scores, color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        axis.annotate(f"{bar.get_height():.1f}\n{results[name]['metric']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)  # fmt: skip
    axis.set_ylabel("score (×100)")
    axis.set_ylim(0, max(100.0, max(scores) * 1.15))
    axis.set_title(title, fontsize=9)
    axis.tick_params(axis="x", rotation=30)
    return atomic_save_figure(figure, path)


# ----------------------------------------------------------------------------------------------- cli
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.scrolls",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="local folder, Hub repo id, 'smollm2' or 'smollm2-comet'")
    add_model_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="folder for scrolls.json and scrolls.png")
    add_output_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=["all"], help=f"'all' or some of: {', '.join(TASKS)}")
    parser.add_argument("--split", default="validation", help="split to score (the test split has no references)")
    parser.add_argument(
        "--data-files", nargs="+", default=None, help="local JSON/JSONL: TASK=PATH (or PATH for one task)"
    )
    parser.add_argument("--max-examples", type=int, default=None, help="score only the first N examples of each task")
    parser.add_argument(
        "--max-input-tokens", type=int, default=None,
        help="prompt budget; inputs are cut at the end (default: max positions minus new tokens; CoMeT: no limit)",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override each task's generation length")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"Unknown SCROLLS task(s) {unknown}; choose from {', '.join(TASKS)} or 'all'.")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be positive, got {args.max_examples}.")
    data_files = parse_data_files(args.data_files, tasks)
    datasets_by_task = {
        task: load_examples(task, args.split, data_files.get(task))[: args.max_examples] for task in tasks
    }

    output_dir = Path(args.output_dir)
    dtype = resolve_dtype(args.dtype, args.device)
    settings = {"model": args.model, "split": args.split, "max_examples": args.max_examples, "dtype": dtype,
                "weights": weights_fingerprint(args.model),
                "requested": {"tasks": tasks, "max_input_tokens": args.max_input_tokens,
                              "max_new_tokens": args.max_new_tokens, "data_files": data_files}}  # fmt: skip
    partial = prepare_output(output_dir, "scrolls.json", settings, args.overwrite)  # before the model loads
    earlier = partial.get("tasks", {}) if partial is not None else {}

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, args.trust_remote_code, dtype, args.device)
    start = time.time()
    results = {}

    def save_partial(task: str, records: list[dict[str, Any]]) -> None:
        tasks_so_far = {**results, task: {"examples": records}}
        atomic_write_json(output_dir / "scrolls.json", {"complete": False, **settings, "tasks": tasks_so_far})

    for task, examples in datasets_by_task.items():
        new_tokens = args.max_new_tokens or TASKS[task].max_new_tokens
        budget = input_budget(model, args.max_input_tokens, new_tokens)
        results[task] = evaluate_task(
            model, tokenizer, task, examples, budget, args.max_new_tokens, progress=not args.no_progress,
            done=earlier.get(task, {}).get("examples"), on_example=lambda records, task=task: save_partial(task, records),
        )  # fmt: skip
        results[task]["max_input_tokens"] = budget
        results[task]["data"] = data_files.get(task, f"{HUB_DATASET}:{task}:{args.split}")
    scores = {task: result["metrics"]["score"] for task, result in results.items()}
    overall = scrolls_score(scores)
    payload = {
        "complete": True,
        **settings,
        "model_type": getattr(model.config, "model_type", None),
        "chunked_forward": is_comet(model),
        "split": args.split,
        "max_examples": args.max_examples,
        "seconds": round(time.time() - start, 1),
        "scores": scores,
        # Mean of the seven tasks' scores, as the official benchmark evaluator computes it; null unless all seven
        # were scored (and only comparable to the leaderboard on full splits, i.e. without --max-examples).
        "scrolls_score": overall,
        "rouge_sentence_splitter": (
            sentence_splitter()[1] if any(TASKS[task].metric == "rouge" for task in results) else None
        ),
        "tasks": results,
    }
    atomic_write_json(output_dir / "scrolls.json", payload)
    title = f"SCROLLS ({args.split}): {args.model}"
    if overall is not None:
        title += f" — SCROLLS score {overall:.2f}"
    plot(results, title, output_dir / "scrolls.png")
    for task, score in scores.items():
        print(f"{task}: {score:.2f} ({TASKS[task].metric}, {len(results[task]['examples'])} examples)")
    if overall is not None:
        print(f"SCROLLS score (mean of the {len(SCROLLS_TASKS)} tasks): {overall:.4f}")
    print(f"wrote {output_dir / 'scrolls.json'} and .png")
    return payload


if __name__ == "__main__":
    run_cli(main)
