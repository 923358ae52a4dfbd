"""What `fold_delay` costs and what it changes: next-token loss by position in the chunk, and read time, side by side.

    python -m benchmarks.comet_fold_delay [--model smollm2-comet] [--delays 0 32]

The same weights are loaded once per delay (`from_pretrained(..., fold_delay=D)`). On held-out prose (the samples of
`benchmarks.comet_lm_loss`), every token's loss is computed with each delay; the JSON gives, per delay, the mean
loss at the positions the largest delay D changes (the first D of every chunk after the first) and at all others (the
same up to rounding: the memory does not change), and the loss by position in the chunk, plotted. Read time
(`model.read`, the cache path that `generate` uses) is measured with the delays alternating in one process, so
that their ratio holds on a busy machine: medians and the ratio to the first delay.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluation.common import (
    add_output_arguments,
    atomic_write_json,
    refuse_to_replace,
    resolve_dtype,
    resolve_model_path,
)


def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """(L - 1,) next-token losses of one sample, read without a cache (the training path)."""
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:], reduction="none")


def summarise(losses: list[torch.Tensor], chunk: int, split: int) -> dict:
    """Mean loss after the first chunk at the first ``split`` positions of a chunk (those the largest delay
    changes) and at the others, and the mean by position in the chunk."""
    by_rank = [[] for _ in range(chunk)]
    first, rest = [], []
    for loss in losses:
        for column in range(chunk, loss.shape[0]):  # loss[column]: the next token, predicted from this column
            value, rank = float(loss[column]), column % chunk
            by_rank[rank].append(value)
            (first if rank < split else rest).append(value)
    return {
        "split": split,
        "tokens_first_positions": len(first),
        "loss_first_positions": statistics.fmean(first) if first else None,
        "loss_other_positions": statistics.fmean(rest),
        "loss_by_position_in_chunk": [statistics.fmean(v) for v in by_rank],
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for delay, result in report["delays"].items():
        curve = result["loss_by_position_in_chunk"]
        width = 8
        binned = [statistics.fmean(curve[i : i + width]) for i in range(0, len(curve), width)]
        ax.plot([i + width / 2 for i in range(0, len(curve), width)], binned, marker="o", label=f"fold_delay={delay}")
    ax.set_xlabel(f"position in its chunk of the token that predicts the next (bins of 8; chunk {report['chunk_size']})")
    ax.set_ylabel("next-token loss (chunks after the first)")
    ax.set_title(f"{report['model_name']}: {report['samples']} samples of {report['sample_tokens']} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-comet", help="a CoMeT folder or alias")
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 32])
    parser.add_argument("--sample-tokens", type=int, default=2048)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed reads per delay (alternating)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("results/benchmarks/fold_delay"))
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    refuse_to_replace(args.output_dir / "fold_delay.json", args.output_dir / "fold_delay.png", overwrite=args.overwrite)
    if len(set(args.delays)) != len(args.delays) or min(args.delays) < 0:
        raise ValueError(f"--delays must be distinct non-negative integers, got {args.delays}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_comet  # noqa: F401  (registers CoMeT with the Auto classes)
    from benchmarks.comet_lm_loss import held_out_samples

    path, _ = resolve_model_path(args.model)
    dtype = resolve_dtype(args.dtype, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = held_out_samples(tokenizer, args.sample_tokens, args.eval_samples, args.seed)
    models = {d: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, fold_delay=d).eval() for d in args.delays}
    chunk = models[args.delays[0]].config.chunk_size

    report = {
        "model": str(path), "model_name": args.model, "dtype": str(dtype).removeprefix("torch."),
        "chunk_size": chunk, "samples": len(samples), "sample_tokens": args.sample_tokens,
        "threads": torch.get_num_threads(), "delays": {},
    }  # fmt: skip
    losses = {}
    for delay, model in models.items():
        losses[delay] = [token_losses(model, ids) for ids in tqdm(samples, desc=f"loss, fold_delay={delay}")]
        report["delays"][str(delay)] = summarise(losses[delay], chunk, max(args.delays))

    seconds = {d: [] for d in args.delays}
    ids = samples[0]
    for _ in tqdm(range(args.repeats), desc="timed reads"):
        for delay, model in models.items():
            start = time.perf_counter()
            with torch.inference_mode():
                model.read(ids)
            seconds[delay].append(time.perf_counter() - start)
    first = statistics.median(seconds[args.delays[0]])
    for delay in args.delays:
        median = statistics.median(seconds[delay])
        report["delays"][str(delay)].update(
            read_seconds=seconds[delay], read_median_seconds=median, read_ratio_to_first=median / first
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_dir / "fold_delay.json", report)
    plot(report, args.output_dir / "fold_delay.png")
    for delay in args.delays:
        r = report["delays"][str(delay)]
        print(f"fold_delay={delay}: first {r['split']} positions {r['loss_first_positions']:.4f}, others {r['loss_other_positions']:.4f}, "
              f"read {r['read_median_seconds']:.2f} s ({r['read_ratio_to_first']:.2f}x)")
    return report


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
