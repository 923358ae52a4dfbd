"""Next-token loss per chunk: CoMeT vs the base model with full attention and with only the current chunk.

    python -m benchmarks.comet_lm_loss --comet ~/.cache/comet/smollm2-comet [--comet other-folder ...]

Evaluates on the held-out samples of `training.comet_trainer` (same packing, same shuffle seed), so a
model trained with that script is scored on text it did not see. Writes JSON with the mean loss on
the chunks after the first one, where the memory matters: `full_attention` sees the whole sample,
`chunk_local` only the current chunk (what a memory that carries nothing would give at best). It also
reports the loss on the first chunk alone (inputs shorter than one chunk), where CoMeT equals its base
model unless training changed the base weights (LoRA): the cost of recall training on short inputs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.smollm2 import smollm2_path
from evaluation.common import add_output_arguments, atomic_write_json, refuse_to_replace
from training.comet_config import CometTrainingConfig
from training.comet_trainer import load_texts, pack_samples


def held_out_samples(tokenizer, sample_tokens: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` (1, sample_tokens) samples of `training.comet_trainer`'s text, packed and shuffled as the trainer
    does with ``seed``: the samples this module scores on."""
    config = CometTrainingConfig(output_dir="unused", seed=seed, report_to="none")
    data = pack_samples(load_texts(config), tokenizer, sample_tokens).shuffle(seed=seed)
    return [torch.tensor([row]) for row in data.select(range(count))["input_ids"]]


def chunk_losses(logits: torch.Tensor, ids: torch.Tensor, chunk: int, first: int = 1) -> list[float]:
    """Mean next-token loss of each chunk from chunk ``first`` on (targets inside the chunk)."""
    out = []
    for start in range(first * chunk, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        out.append(F.cross_entropy(logits[0, start : end - 1].float(), ids[0, start + 1 : end]).item())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comet", action="append", required=True, help="CoMeT checkpoint folder (repeatable)")
    parser.add_argument("--sample-tokens", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/comet_lm_loss.json"))
    parser.add_argument(
        "--trust-remote-code", "--trust_remote_code", action="store_true",
        help="let a --comet folder run its own modelling code (a CoMeT checkpoint loads with this package's classes)",
    )  # fmt: skip
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    refuse_to_replace(args.output, overwrite=args.overwrite, option="--output")

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    samples = held_out_samples(tokenizer, args.sample_tokens, args.eval_samples, args.seed)

    base = AutoModelForCausalLM.from_pretrained(smollm2_path()).eval()
    models = {folder: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=args.trust_remote_code).eval()
              for folder in args.comet}
    chunk = next(iter(models.values())).config.chunk_size
    scores: dict[str, list[float]] = {"full_attention": [], "chunk_local": [], **{f: [] for f in models}}
    # Inputs shorter than one chunk: CoMeT equals its base there, unless training changed base weights (LoRA).
    short: dict[str, list[float]] = {"base": [], **{f: [] for f in models}}
    with torch.no_grad():
        for ids in tqdm(samples, desc="samples"):
            base_logits = base(ids).logits
            scores["full_attention"] += chunk_losses(base_logits, ids, chunk)
            short["base"] += chunk_losses(base_logits[:, :chunk], ids[:, :chunk], chunk, first=0)
            for start in range(chunk, ids.shape[1], chunk):
                piece = ids[:, start : start + chunk]
                scores["chunk_local"].append(F.cross_entropy(base(piece).logits[0, :-1], piece[0, 1:]).item())
            for folder, model in models.items():
                logits = model(ids, use_cache=False).logits
                scores[folder] += chunk_losses(logits, ids, chunk)
                short[folder] += chunk_losses(logits[:, :chunk], ids[:, :chunk], chunk, first=0)
    report = {
        "sample_tokens": args.sample_tokens,
        "eval_samples": args.eval_samples,
        "chunk_size": chunk,
        "mean_loss_after_first_chunk": {k: statistics.mean(v) for k, v in scores.items()},
        "mean_loss_first_chunk": {k: statistics.mean(v) for k, v in short.items()},
        "per_chunk": scores,
    }
    atomic_write_json(args.output, report)
    print(report["mean_loss_after_first_chunk"], report["mean_loss_first_chunk"])
    return report


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
