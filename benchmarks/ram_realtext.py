"""RAM on SmolLM2 against truncation and the full prompt, on QA built from real text (`training.ram_qa_data`).

The held-out examples (contexts of 5 real passages, ~300-540 tokens, from source documents no training example uses)
are answered by:

* the base model reading the full prompt, reading only the last 1/4 or 1/8 of the context (truncation), and reading
  the question alone (how far the answer can be guessed without the context);
* RAM at 4x (keep_ratio 0.25) and 8x (0.125), default and EPL layouts, untrained (`from_base`: encoder = a copy of the
  base's first layers, alignment = identity) and trained (`checkpoints/ram-smollm2-pydoc.safetensors`).

Accuracy: the answer word appears in the first `--new_tokens` greedy tokens (the evaluation of
`benchmarks.ram_synthetic`, whose helpers this reuses). "answer segment kept": RAM kept the segment holding the
answer's first token as tokens.

The trained weights are one small safetensors file (`export`): the LoRA factors (decoder attention, and the encoder
layers' projections with `--encoder_lora`) and the alignment, with the RAM settings in its metadata; `load_trained`
merges them into a fresh `RamForCausalLM.from_base` of the embedded SmolLM2.

Usage::

    python -m benchmarks.ram_realtext export --run_dir ~/.cache/ram-runs/pydoc \
        --output checkpoints/ram-smollm2-pydoc.safetensors
    python -m benchmarks.ram_realtext evaluate --data ~/.cache/ram-runs/pydoc-data/test.jsonl \
        [--methods base,untrained,trained] [--test_examples 4 --output_dir /tmp/realtext]   # results/ram_realtext/

`evaluate` merges its rows into an existing `results.json` of `--output_dir` (same method, compression and layout
replaced), so the parts can run separately.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from benchmarks.ram_synthetic import evaluate_base, evaluate_ram
from convert.atomic import atomic_file
from evaluation.common import atomic_save_figure, atomic_write_json, pyplot

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "ram-smollm2-pydoc.safetensors"
FORMAT = "ram-trained-weights/1"
RAM_SETTINGS = ("encoder_layers", "segment_size", "keep_ratio", "position_layout")
SEGMENT_SIZE = 32
COMPRESSIONS = (("4x", 0.25), ("8x", 0.125))
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.(?:[^.]+\.)?weight$")
_ALIGNMENT = re.compile(r"^(?:base_model\.model\.)?alignment\.(?:modules_to_save\.[^.]+\.)?(?P<name>weight|bias)$")


def export(run_dir: str | Path, output: str | Path = CHECKPOINT, recipe: str | Path | None = None,
           commands: list[str] | None = None) -> Path:
    """Write the trained weights of a `training.ram_trainer --finetuning lora --encoder_lora` run as one safetensors
    file: LoRA factors named as in `RamForCausalLM`, `alignment.weight`/`alignment.bias`, and metadata (format, LoRA
    rank and alpha, RAM settings); and a note (`output` with `.json`) on how it was trained.

    `run_dir` is a finished run (its `adapter/` folder and `config.json`) or one of its `checkpoint-N` folders (then
    the RAM settings come from `recipe`, the run's YAML). Refuses an adapter that trained the encoder layers fully."""
    from safetensors.torch import load_file, save_file

    run_dir = Path(run_dir).expanduser()
    adapter_dir = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    if (run_dir / "config.json").is_file():
        ram = json.loads((run_dir / "config.json").read_text())
    elif recipe is not None:
        import yaml

        ram = yaml.safe_load(Path(recipe).read_text())
    else:
        raise FileNotFoundError(f"{run_dir} has no config.json (a checkpoint folder?): pass the run's recipe")
    if any(name.startswith("encoder_layers") for name in adapter.get("modules_to_save") or []):
        raise ValueError(f"{run_dir} trained the encoder layers fully (not --encoder_lora): too big for this format")
    tensors = {}
    for key, value in load_file(adapter_dir / "adapter_model.safetensors").items():
        lora, alignment = _LORA.match(key), _ALIGNMENT.match(key)
        if lora:
            tensors[f"{lora['module']}.lora_{lora['factor']}.weight"] = value.float().contiguous()
        elif alignment:
            tensors[f"alignment.{alignment['name']}"] = value.float().contiguous()
        else:
            raise KeyError(f"unexpected adapter weight {key}")
    settings = {name: ram[name] for name in RAM_SETTINGS}
    lora_settings = {"r": adapter["r"], "alpha": adapter["lora_alpha"]}
    metadata = {"format": FORMAT, "lora": json.dumps(lora_settings), "ram": json.dumps(settings)}
    with atomic_file(output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    states = [run_dir / "trainer_state.json"] if (run_dir / "trainer_state.json").is_file() else states
    state = json.loads(states[-1].read_text()) if states else {}
    logs = [entry for entry in state.get("log_history", []) if "loss" in entry]
    note = {
        "weights": Path(output).name, "format": FORMAT, "bytes": Path(output).stat().st_size,
        "parameters": sum(tensor.numel() for tensor in tensors.values()),
        "base": "SmolLM2-135M-Instruct (embedded, python -m convert.smollm2)", "ram": settings, "lora": lora_settings,
        "lora_target_modules": adapter["target_modules"], "steps": state.get("global_step"),
        "first_log": logs[0] if logs else None, "last_log": logs[-1] if logs else None,
        "source": str(run_dir), "commands": commands or [],
        "load": "benchmarks.ram_realtext.load_trained(path) -> (RamForCausalLM, metadata)",
    }
    atomic_write_json(Path(output).with_suffix(".json"), note)
    return Path(output)


@torch.no_grad()
def load_trained(path: str | Path = CHECKPOINT, base=None):
    """A `RamForCausalLM` on SmolLM2 (or `base`) with the trained weights of `path` merged in; returns (model, meta)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from convert.smollm2 import smollm2_path
    from modeling_comet.modeling_ram import RamForCausalLM

    with safe_open(str(path), "pt") as handle:
        raw = handle.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a RAM trained-weights file (format {raw.get('format')!r})")
    meta = {key: json.loads(value) for key, value in raw.items() if key != "format"}
    model = RamForCausalLM.from_base(base if base is not None else smollm2_path(), **meta["ram"])
    tensors = load_file(str(path))
    model.alignment.load_state_dict({name: tensors[f"alignment.{name}"] for name in ("weight", "bias")})
    modules = dict(model.named_modules())
    scale = meta["lora"]["alpha"] / meta["lora"]["r"]
    for key in (key for key in tensors if key.endswith(".lora_A.weight")):
        name = key[: -len(".lora_A.weight")]
        weight = modules[name].weight
        weight.add_(scale * (tensors[f"{name}.lora_B.weight"] @ tensors[key]).to(weight.dtype))
    return model.eval(), meta


def load_examples(path: str | Path, tokenizer, question_template: str, limit: int | None = None) -> list[dict]:
    """The JSONL examples of `path` tokenized as `benchmarks.ram_synthetic` evaluates them (context, question, answer
    string, segment of the answer's first token)."""
    from training.ram_trainer import context_text

    examples = []
    for line in Path(path).expanduser().read_text().splitlines()[:limit]:
        row = json.loads(line)
        text, answer = context_text(row), row["answers"][0]
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        quoted = row["question"].split('"', 1)[1] + " " + answer  # the question quotes the words before the answer
        start = text.index(row["ctxs"][row["positive"]]["text"])
        answer_start = text.index(quoted, start) + len(quoted) - len(answer)
        token = next(index for index, (_, end) in enumerate(encoded["offset_mapping"]) if end > answer_start)
        question = tokenizer(question_template.format(question=row["question"]), add_special_tokens=False)
        examples.append({"context_ids": encoded["input_ids"], "question_ids": question["input_ids"], "answer": answer,
                         "answer_segment": token // SEGMENT_SIZE})
    return examples


def evaluate(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.smollm2 import smollm2_path
    from modeling_comet.modeling_ram import RamForCausalLM
    from training.ram_qa_data import QUESTION_TEMPLATE

    torch.set_num_threads(args.threads)
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = load_examples(args.data, tokenizer, QUESTION_TEMPLATE, args.test_examples)
    options = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    mean_context = sum(len(example["context_ids"]) for example in examples) / len(examples)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    methods = set(args.methods.split(","))
    rows = []

    def timed(evaluate_fn, fn_args, **fields):
        start = time.perf_counter()
        row = evaluate_fn(*fn_args)
        row = row if isinstance(row, dict) else {"accuracy": row}
        rows.append({**fields, **row, "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)

    with torch.inference_mode():
        if "base" in methods:
            for compression, fraction in (("1x", 1.0), *COMPRESSIONS):
                method = "full prompt" if fraction == 1.0 else "truncation (last tokens)"
                timed(evaluate_base, (base, tokenizer, examples, fraction, options), method=method,
                      compression=compression, layout="-")
        if "nocontext" in methods:  # how far the answer can be guessed from the question alone
            timed(evaluate_base, (base, tokenizer, examples, 0.0, options), method="question only", compression="-",
                  layout="-")
        ram_models = {}
        if "untrained" in methods:
            ram_models["RAM untrained"] = RamForCausalLM.from_base(base, encoder_layers=args.encoder_layers,
                                                                   segment_size=SEGMENT_SIZE).eval()
        if "trained" in methods:
            ram_models["RAM trained"] = load_trained(args.checkpoint)[0]
        for method, ram in ram_models.items():
            for compression, keep_ratio in COMPRESSIONS:
                for layout in ("default", "epl"):
                    timed(evaluate_ram, (ram, tokenizer, examples, keep_ratio, layout, options), method=method,
                          compression=compression, layout=layout)

    output = Path(args.output_dir)
    previous = json.loads((output / "results.json").read_text()) if (output / "results.json").is_file() else {}
    key = lambda row: (row["method"], row["compression"], row["layout"])  # noqa: E731
    merged = {key(row): row for row in previous.get("rows", [])}
    merged.update({key(row): row for row in rows})
    order = ["question only", "full prompt", "truncation (last tokens)", "RAM untrained", "RAM trained"]
    results = {
        "data": str(args.data), "test_examples": len(examples), "mean_context_tokens": round(mean_context, 1),
        "new_tokens": args.new_tokens, "threads": args.threads, "encoder_layers_untrained": args.encoder_layers,
        "checkpoint": str(args.checkpoint),
        "rows": sorted(merged.values(), key=lambda row: (order.index(row["method"]), row["compression"],
                                                         row["layout"])),
    }
    atomic_write_json(output / "results.json", results)
    note_path = Path(args.checkpoint).with_suffix(".json")
    if "trained" in methods and note_path.is_file():  # the checkpoint's note quotes what it scores
        note = json.loads(note_path.read_text())
        note["accuracy"] = {"test": str(args.data), "test_examples": len(examples), "rows": [
            {key: row[key] for key in ("method", "compression", "layout", "accuracy")} for row in results["rows"]]}
        atomic_write_json(note_path, note)
    plot(results, output / "accuracy.png")
    print(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    lines = ["| method | compression | layout | accuracy | answer segment kept | seconds |", "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        kept = "-" if row.get("answer_segment_kept") is None else f"{row['answer_segment_kept']:.2f}"
        lines.append(f"| {row['method']} | {row['compression']} | {row['layout']} | {row['accuracy']:.2f} | {kept} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    series = [("truncation (last tokens)", "-"), ("RAM untrained", "default"), ("RAM untrained", "epl"),
              ("RAM trained", "default"), ("RAM trained", "epl")]
    width = 0.8 / len(series)
    for index, (method, layout) in enumerate(series):
        values = {row["compression"]: row["accuracy"] for row in results["rows"]
                  if row["method"] == method and row["layout"] == layout}
        if values:
            positions = [position + (index - len(series) / 2 + 0.5) * width for position in range(len(COMPRESSIONS))]
            heights = [values.get(name, 0.0) for name, _ in COMPRESSIONS]
            label = method if layout == "-" else f"{method}, {layout}"
            axis.bar(positions, heights, width, label=label)
    for row in results["rows"]:
        if row["method"] in ("full prompt", "question only"):
            style = "--" if row["method"] == "full prompt" else ":"
            axis.axhline(row["accuracy"], color="black", linestyle=style, label=row["method"])
    axis.set_xticks(range(len(COMPRESSIONS)), [name for name, _ in COMPRESSIONS])
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("accuracy")
    axis.set_title(f"SmolLM2-135M-Instruct, {results['test_examples']} held-out pydoc questions")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    atomic_save_figure(figure, path)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", required=True)
    exporting = commands.add_parser("export", help="write a run's trained weights as one safetensors file")
    exporting.add_argument("--run_dir", required=True)
    exporting.add_argument("--output", default=str(CHECKPOINT))
    exporting.add_argument("--recipe", default=None, help="the run's YAML, when --run_dir is a checkpoint folder")
    exporting.add_argument("--command", action="append", default=[], help="a command to record in the note")
    evaluating = commands.add_parser("evaluate", help="accuracy on held-out questions")
    evaluating.add_argument("--data", required=True, help="test.jsonl from training.ram_qa_data")
    evaluating.add_argument("--checkpoint", default=str(CHECKPOINT))
    evaluating.add_argument("--methods", default="base,nocontext,untrained,trained")
    evaluating.add_argument("--encoder_layers", type=int, default=4, help="untrained RAM's encoder depth")
    evaluating.add_argument("--test_examples", type=int, default=None)
    evaluating.add_argument("--new_tokens", type=int, default=4)
    evaluating.add_argument("--threads", type=int, default=1)
    evaluating.add_argument("--output_dir", default="results/ram_realtext")
    args = parser.parse_args(argv)
    if args.action == "export":
        print(export(args.run_dir, args.output, args.recipe, args.command))
        return None
    return evaluate(args)


if __name__ == "__main__":
    main()


__all__ = ["export", "load_examples", "load_trained", "main", "markdown_table"]
