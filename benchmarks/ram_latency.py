"""End-to-end answer latency of RAM against the full prompt on SmolLM2-135M-Instruct.

For each context length the same question is answered by the base model reading the whole prompt, and by RAM
(built with `RamForCausalLM.from_base`, untrained: latency does not depend on the weights) reading a context
compressed to `keep_ratio`, once per encoder depth in `--encoder_layers`. Both generate exactly `--new_tokens` greedy tokens. We report the median over
`--repeats` timed runs (after one untimed warm-up at the smallest length) and write JSON and a PNG plot.

Usage::

    python -m benchmarks.ram_latency                       # 4k, 8k, 16k; results/ram_latency.{json,png}
    python -m benchmarks.ram_latency --lengths 1024 --repeats 1 --output_dir /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from evaluation.common import add_output_arguments, atomic_save_figure, atomic_write_json, pyplot, refuse_to_replace

QUESTION = "\n\nQuestion: Which module is described first in the text above?\nAnswer:"


def prose_token_ids(tokenizer, length: int) -> torch.Tensor:
    """`length` tokens of English prose from the standard library's pydoc topics (repeated if needed)."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[key] for key in sorted(topics)), add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor(ids[:length]).unsqueeze(0)


def timed(fn, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    lengths = [row["context_tokens"] for row in results["rows"]]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(lengths, [row["full_median_s"] for row in results["rows"]], "o-", label="full prompt")
    for layers in results["encoder_layers"]:
        medians = [row["ram"][str(layers)]["median_s"] for row in results["rows"]]
        axis.plot(lengths, medians, "s-", label=f"RAM keep {results['keep_ratio']}, {layers} encoder layers")
        for row, median in zip(results["rows"], medians, strict=True):
            axis.annotate(f"{row['ram'][str(layers)]['speedup']:.2f}x", (row["context_tokens"], median),
                          textcoords="offset points", xytext=(0, -14), ha="center")
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [f"{length // 1024}k" for length in lengths])
    axis.set_xlabel("context tokens")
    axis.set_ylabel(f"seconds to answer ({results['new_tokens']} tokens), median")
    axis.set_title(f"RAM vs full prompt, {results['model']}, {results['threads']} CPU threads")
    axis.legend()
    figure.tight_layout()
    atomic_save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--keep_ratio", type=float, default=0.25)
    parser.add_argument("--encoder_layers", type=int, nargs="+", default=[8, 2],
                        help="one RAM model per value (8: the authors' setting)")
    parser.add_argument("--segment_size", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output_dir", default="results")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    refuse_to_replace(Path(args.output_dir) / "ram_latency.json", Path(args.output_dir) / "ram_latency.png",
                      overwrite=args.overwrite, option="--output_dir")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.smollm2 import smollm2_path
    from modeling_comet.modeling_ram import RamForCausalLM

    torch.set_num_threads(args.threads)
    load_average = os.getloadavg()  # the machine may be shared: record how busy it was
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rams = {
        layers: RamForCausalLM.from_base(
            base, encoder_layers=layers, segment_size=args.segment_size, keep_ratio=args.keep_ratio
        ).eval()
        for layers in args.encoder_layers
    }
    question = tokenizer(QUESTION, add_special_tokens=False, return_tensors="pt")["input_ids"]
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
               "pad_token_id": tokenizer.eos_token_id}

    def full(context):
        prompt = torch.cat([context, question], 1)
        return base.generate(prompt, attention_mask=torch.ones_like(prompt), **options)

    def compressed(ram, context):
        return ram.generate(context_ids=context, question_ids=question, **options)

    rows = []
    with torch.inference_mode():
        warmup = prose_token_ids(tokenizer, 512)
        full(warmup)
        for ram in rams.values():
            compressed(ram, warmup)
        for length in args.lengths:
            context = prose_token_ids(tokenizer, length)
            full_seconds = timed(lambda context=context: full(context), args.repeats)
            row = {"context_tokens": length, "full_seconds": full_seconds,
                   "full_median_s": statistics.median(full_seconds), "ram": {}}
            print(f"{length:>6} tokens: full {row['full_median_s']:7.2f} s", flush=True)
            for layers, ram in rams.items():
                seconds = timed(lambda ram=ram, context=context: compressed(ram, context), args.repeats)
                median = statistics.median(seconds)
                row["ram"][str(layers)] = {"seconds": seconds, "median_s": median,
                                           "speedup": row["full_median_s"] / median}
                print(f"        RAM, {layers} encoder layers: {median:7.2f} s  "
                      f"speedup {row['full_median_s'] / median:.2f}x", flush=True)
            rows.append(row)

    results = {
        "model": "SmolLM2-135M-Instruct", "dtype": "float32", "device": "cpu", "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "keep_ratio": args.keep_ratio, "encoder_layers": args.encoder_layers, "segment_size": args.segment_size,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "question_tokens": question.shape[1],
        "load_average_at_start": load_average, "rows": rows,
    }
    output = Path(args.output_dir)
    atomic_write_json(output / "ram_latency.json", results)
    plot(results, output / "ram_latency.png")
    return results


if __name__ == "__main__":
    main()


__all__ = ["main", "prose_token_ids"]
