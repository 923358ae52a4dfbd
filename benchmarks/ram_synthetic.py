"""A small RAM reproduction on a synthetic long-context QA task generated locally.

Each context is `--segments` segments of `segment_size` tokens of filler prose; one segment states the fact the
question asks about ("The secret code of the copper kettle is 4821."), `--distractors` other segments state facts
about other objects. The question asks for one object's code; the answer is its number, in one segment only.

Compared on the same held-out examples (answer accuracy = the number appears in the first generated tokens):

* the base model reading the full prompt, and the base model reading only the last 1/4 or 1/8 of the context
  (truncation);
* RAM at 4x (keep_ratio 0.25) and 8x (0.125), default and EPL layouts, untrained (`from_base`) and after a short
  training of the encoder (decoder frozen). `--train_mode full_loss` trains encoder and alignment on
  `L = NLL + lambda * L_con`, once per layout; `--train_mode contrastive_only` (the default, what a shared 2-core
  CPU affords) trains the encoder's relevance on `L_con` alone, which does not depend on the layout, so one run
  serves both layouts.

Usage::

    python -m benchmarks.ram_synthetic                   # results/ram_synthetic.{md,json}
    python -m benchmarks.ram_synthetic --train_steps 2 --test_examples 2 --output_dir /tmp/synth   # smoke run
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from convert.atomic import atomic_file
from evaluation.common import add_output_arguments, atomic_write_json, refuse_to_replace

OBJECTS = [
    f"{colour} {thing}"
    for colour in ("copper", "silver", "amber", "violet", "crimson", "olive", "ivory", "cobalt")
    for thing in ("kettle", "lantern", "door", "compass", "drawer", "bicycle", "clock", "mirror")
]
FILLER = [
    "The morning fog lifted slowly over the quiet harbour.",
    "A few gulls circled above the fishing boats.",
    "Shopkeepers swept the pavement and opened their shutters.",
    "The baker had been awake since four, shaping loaves.",
    "Children walked to school along the old stone wall.",
    "Somewhere a radio played a song nobody remembered.",
    "The tide was low and the sand shone like wet glass.",
    "An old man fed the pigeons from a paper bag.",
    "Clouds gathered in the west but the rain held off.",
    "The ferry horn sounded twice across the water.",
    "Tourists studied maps outside the little museum.",
    "A cat slept in the window of the bookshop.",
    "The church bell rang the hour, slightly out of tune.",
    "Fishermen mended nets on the edge of the quay.",
    "The smell of coffee drifted from the corner cafe.",
    "By noon the streets were warm and crowded.",
]
QUESTION_TEMPLATE = "\n\nQuestion: What is the secret code of the {name}?\nAnswer: The secret code of the {name} is"


def filler_ids(tokenizer, rng: random.Random, count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer(" " + rng.choice(FILLER), add_special_tokens=False)["input_ids"]
    return ids[:count]


def make_example(tokenizer, rng: random.Random, segments: int, segment_size: int, distractors: int) -> dict:
    """Token-level example whose fact sentences never cross a segment boundary."""
    names = rng.sample(OBJECTS, 1 + distractors)
    codes = [str(rng.randint(1000, 9999)) for _ in names]
    fact_segments = rng.sample(range(segments), len(names))
    context_ids: list[int] = []
    for index in range(segments):
        if index in fact_segments:
            which = fact_segments.index(index)
            fact = tokenizer(f" The secret code of the {names[which]} is {codes[which]}.", add_special_tokens=False)
            fact = fact["input_ids"][:segment_size]
            lead = rng.randint(0, segment_size - len(fact))
            segment = filler_ids(tokenizer, rng, lead) + fact
            segment += filler_ids(tokenizer, rng, segment_size - len(segment))
        else:
            segment = filler_ids(tokenizer, rng, segment_size)
        context_ids += segment
    question_ids = tokenizer(QUESTION_TEMPLATE.format(name=names[0]), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + codes[0] + ".", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {
        "context_ids": context_ids,
        "question_ids": question_ids,
        "answer_ids": answer_ids,
        "segment_labels": [int(index == fact_segments[0]) for index in range(segments)],
        "answer": codes[0],
        "answer_segment": fact_segments[0],
    }


def answer_accuracy(tokenizer, outputs: torch.Tensor, examples: list[dict]) -> float:
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return sum(example["answer"] in text for text, example in zip(texts, examples, strict=True)) / len(examples)


def evaluate_base(base, tokenizer, examples, keep_fraction: float, options: dict) -> float:
    outputs = []
    for example in examples:
        context = example["context_ids"][len(example["context_ids"]) - int(len(example["context_ids"]) * keep_fraction) :]
        prompt = torch.tensor([context + example["question_ids"]])
        outputs.append(base.generate(prompt, attention_mask=torch.ones_like(prompt), **options)[0, prompt.shape[1] :])
    return answer_accuracy(tokenizer, torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True), examples)


def evaluate_ram(ram, tokenizer, examples, keep_ratio: float, layout: str, options: dict) -> dict:
    ram.config.keep_ratio, ram.config.position_layout = keep_ratio, layout
    outputs, hits = [], 0
    for example in examples:
        context, question = torch.tensor([example["context_ids"]]), torch.tensor([example["question_ids"]])
        hits += int(ram.compress(context, question).kept_segments[0, example["answer_segment"]])
        outputs.append(ram.generate(context_ids=context, question_ids=question, **options)[0])
    accuracy = answer_accuracy(tokenizer, torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True), examples)
    return {"accuracy": accuracy, "answer_segment_kept": hits / len(examples)}


def train_ram(ram, train_examples, args, layout: str, output_dir: Path) -> dict:
    """Train `ram` in place (encoder finetuning mode) at keep_ratio 0.25 under `layout`; returns the run's logs."""
    from training.ram_config import RamTrainingConfig
    from training.ram_trainer import RamDataCollator, RamTrainer, apply_finetuning

    config = RamTrainingConfig(
        output_dir=str(output_dir / f"train-{layout}"), per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_steps=args.train_steps, logging_steps=max(1, args.train_steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, finetuning="encoder", lr_scheduler_type="constant",
        warmup_steps=0, seed=args.seed, keep_ratio=0.25, position_layout=layout, disable_tqdm=True,
        contrastive_only=args.train_mode == "contrastive_only",
    )
    ram.config.keep_ratio, ram.config.position_layout = 0.25, layout
    model = apply_finetuning(ram, config)
    columns = ("context_ids", "question_ids", "answer_ids", "segment_labels")
    features = [{key: example[key] for key in columns} for example in train_examples]
    trainer = RamTrainer(model=model, args=config, train_dataset=features, data_collator=RamDataCollator(0))
    start = time.perf_counter()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "seconds": time.perf_counter() - start,
        "first_log": logs[0] if logs else None,
        "last_log": logs[-1] if logs else None,
    }


def markdown_table(results: dict) -> str:
    lines = [
        "# RAM on a synthetic long-context QA task",
        "",
        f"SmolLM2-135M-Instruct, {results['segments']} segments x {results['segment_size']} tokens = "
        f"{results['context_tokens']} context tokens, {results['distractors']} distractor facts, "
        f"{results['test_examples']} held-out questions; RAM encoder = first {results['encoder_layers']} layers. "
        f"Training: {results['train_steps']} steps x batch {results['batch_size']} ({results['train_examples']} "
        f"examples), mode {results['train_mode']}, decoder frozen, lr {results['learning_rate']}, trained at keep 0.25. "
        "Accuracy: the answer's digits appear in the first generated tokens (greedy).",
        "",
        "| method | compression | layout | accuracy | answer segment kept | decoder context tokens |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        kept = "-" if row.get("answer_segment_kept") is None else f"{row['answer_segment_kept']:.2f}"
        lines.append(
            f"| {row['method']} | {row['compression']} | {row['layout']} | {row['accuracy']:.2f} | {kept} | "
            f"{row['decoder_context_tokens']} |"
        )
    lines += ["", "Training runs:", ""]
    for layout, run in results["training"].items():  # layout "both": one layout-independent run
        first, last = run["first_log"] or {}, run["last_log"] or {}
        terms = [
            f"{name} {first[key]:.3f} -> {last[key]:.3f}"
            for name, key in (("loss", "loss"), ("nll", "nll_loss"), ("contrastive", "contrastive_loss"))
            if key in first and key in last
        ]
        lines.append(f"- {layout}: {run['seconds']:.0f} s, first -> last logged window: " + ", ".join(terms))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=12)
    parser.add_argument("--segment_size", type=int, default=32)
    parser.add_argument("--distractors", type=int, default=3)
    parser.add_argument("--encoder_layers", type=int, default=4)
    parser.add_argument("--train_examples", type=int, default=256)
    parser.add_argument("--test_examples", type=int, default=24)
    parser.add_argument("--train_steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--train_mode", choices=("contrastive_only", "full_loss"), default="contrastive_only")
    parser.add_argument("--new_tokens", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 avoids thread oversubscription on a shared CPU")
    parser.add_argument("--output_dir", default="results")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    refuse_to_replace(Path(args.output_dir) / "ram_synthetic.json", Path(args.output_dir) / "ram_synthetic.md",
                      overwrite=args.overwrite, option="--output_dir")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.smollm2 import smollm2_path
    from modeling_comet.modeling_ram import RamForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(args.seed)
    make = lambda: make_example(tokenizer, rng, args.segments, args.segment_size, args.distractors)  # noqa: E731
    test_examples = [make() for _ in range(args.test_examples)]
    train_examples = [make() for _ in range(args.train_examples)]
    options = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    context_tokens = args.segments * args.segment_size
    question_tokens = len(test_examples[0]["question_ids"])
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    rows = []
    with torch.inference_mode():
        for compression, fraction in (("1x", 1.0), ("4x", 0.25), ("8x", 0.125)):
            accuracy = evaluate_base(base, tokenizer, test_examples, fraction, options)
            method = "full prompt" if fraction == 1.0 else "truncation (last tokens)"
            rows.append({"method": method, "compression": compression, "layout": "-", "accuracy": accuracy,
                         "decoder_context_tokens": int(context_tokens * fraction)})
            print(rows[-1], flush=True)

    def ram_rows(ram, method, layouts=("default", "epl")):
        with torch.inference_mode():
            for compression, keep_ratio in (("4x", 0.25), ("8x", 0.125)):
                for layout in layouts:
                    row = evaluate_ram(ram, tokenizer, test_examples, keep_ratio, layout, options)
                    kept = ram.num_kept_segments(args.segments)
                    rows.append({"method": method, "compression": compression, "layout": layout, **row,
                                 "decoder_context_tokens": kept * args.segment_size + args.segments - kept})
                    print(rows[-1], flush=True)

    untrained = RamForCausalLM.from_base(base, encoder_layers=args.encoder_layers, segment_size=args.segment_size)
    ram_rows(untrained.eval(), "RAM untrained")
    training = {}
    runs = {"both": ("default", "epl")} if args.train_mode == "contrastive_only" else {"default": ("default",),
                                                                                         "epl": ("epl",)}
    for run, layouts in runs.items():
        torch.manual_seed(args.seed)
        ram = RamForCausalLM.from_base(base, encoder_layers=args.encoder_layers, segment_size=args.segment_size)
        training[run] = train_ram(ram.train(), train_examples, args, layouts[0], Path(tempfile.mkdtemp()))
        print(run, training[run], flush=True)
        ram_rows(ram.eval(), f"RAM trained ({args.train_mode})", layouts)

    results = {**{key: getattr(args, key) for key in vars(args)}, "context_tokens": context_tokens,
               "question_tokens": question_tokens, "rows": rows, "training": training}
    output = Path(args.output_dir)
    atomic_write_json(output / "ram_synthetic.json", results)
    with atomic_file(output / "ram_synthetic.md") as tmp:
        tmp.write_text(markdown_table(results))
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()


__all__ = ["main", "make_example"]
