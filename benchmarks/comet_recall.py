"""Does the CoMeT memory learn to remember? Synthetic recall trained from scratch, side by side with ablations.

    python -m benchmarks.comet_recall                    # all variants, results/comet_recall/{comet_recall.json,png}
    python -m benchmarks.comet_recall --variants comet --steps 600

A small Llama-family model (4 layers, d=128) is trained from random initialisation on synthetic recall:
random filler tokens, a marker followed by a key of several tokens, and at the end a query marker after
which the model must reproduce the key. Inputs are at most ``--train-chunks`` chunks long; the key lies
0 .. ``--train-chunks - 1`` chunks before the question, raised by a curriculum. Then exact recall (every
key token right under greedy decoding) is measured with the key 0 .. 64 chunks before the question.

Variants, same data, same steps, same optimiser:

* ``comet``: global memory (gated, ``--global-mem-size`` slots) plus temporary memory, whose budget is
  sampled per batch (0, half, full) so that the global memory must carry what lies beyond it;
* ``temp_only``: the same model with the global memory ablated (``global_mem_size=0``): the temporary
  memory covers the last ``budget/beacons-per-chunk`` chunks, nothing older;
* ``full_attention``: the base model reading the whole input, within its position range (the training
  length); longer inputs are not scored.

Training teaches the key with several keys per sample (each with its own marker, all queried at the end),
which gives a denser signal than one key; scoring uses one key per input. Every variant's result is saved
as soon as it is done; a rerun skips finished variants unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from evaluation.common import atomic_save_figure, atomic_write_json, pyplot
from modeling_comet import CometForCausalLM

VARIANTS = ("comet", "temp_only", "full_attention")
PAD, QUERY = 0, 1  # ids below RecallSpec.first_marker are special; then markers, key symbols, filler


@dataclass
class RecallSpec:
    """The synthetic task and the model size (all small enough for minutes on one CPU thread)."""

    chunk_size: int = 32
    key_len: int = 4
    key_symbols: int = 16
    num_markers: int = 4
    vocab_size: int = 96
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    global_mem_size: int = 16
    temp_beacon_stride: int = 8
    temp_mem_budget: int = 16

    @property
    def first_marker(self) -> int:
        return 2

    @property
    def first_key(self) -> int:
        return self.first_marker + self.num_markers

    @property
    def first_filler(self) -> int:
        return self.first_key + self.key_symbols


def make_batch(spec: RecallSpec, gen: torch.Generator, batch: int, num_chunks: int, distances: torch.Tensor, num_keys: int):
    """(input_ids, labels) of ``batch`` samples of ``num_chunks`` chunks.

    Key ``j`` (marker ``j``, then ``key_len`` key symbols) is planted ``distances[b, j]`` chunks before the
    last chunk; the last chunk ends with ``[QUERY, marker j, key j]`` for every key in random order, and only
    the key symbols are labelled.
    """
    C, K = spec.chunk_size, spec.key_len
    L = num_chunks * C
    ids = torch.randint(spec.first_filler, spec.vocab_size, (batch, L), generator=gen)
    labels = torch.full((batch, L), -100)
    keys = torch.randint(spec.first_key, spec.first_filler, (batch, num_keys, K), generator=gen)
    fact = K + 1
    tail = num_keys * (K + 2)
    last = (num_chunks - 1) * C
    for b in range(batch):
        order = torch.randperm(num_keys, generator=gen).tolist()
        taken: list[tuple[int, int]] = []
        for j in range(num_keys):
            chunk = num_chunks - 1 - int(distances[b, j])
            hi = (chunk + 1) * C - fact if chunk < num_chunks - 1 else L - tail - fact
            lo = chunk * C
            for _ in range(50):  # keep facts from overlapping one another
                start = int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=gen))
                if all(start + fact <= s or start >= e for s, e in taken):
                    break
            taken.append((start, start + fact))
            ids[b, start] = spec.first_marker + j
            ids[b, start + 1 : start + fact] = keys[b, j]
        pos = L - tail
        for j in order:
            ids[b, pos], ids[b, pos + 1] = QUERY, spec.first_marker + j
            ids[b, pos + 2 : pos + 2 + K] = keys[b, j]
            labels[b, pos + 2 : pos + 2 + K] = keys[b, j]
            pos += K + 2
    assert last <= L - tail, "the queries must fit in the last chunk"
    return ids, labels


def build_model(spec: RecallSpec, variant: str, max_positions: int, seed: int):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=2 * spec.hidden_size,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=max_positions,
            pad_token_id=PAD,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    if variant == "full_attention":
        return base
    return CometForCausalLM.from_base(
        base,
        chunk_size=spec.chunk_size,
        global_mem_size=spec.global_mem_size if variant == "comet" else 0,
        temp_beacon_stride=spec.temp_beacon_stride,
        temp_mem_budget=spec.temp_mem_budget,
    )


def answer_exact(model, ids: torch.Tensor, labels: torch.Tensor, tail: int) -> torch.Tensor:
    """(B,) bool: every labelled token predicted by greedy argmax (teacher forcing = greedy decoding here)."""
    logits = model(ids, logits_to_keep=tail + 1).logits[:, :-1]
    target = labels[:, -tail:]
    hit = (logits.argmax(-1) == target) | (target == -100)
    return hit.all(-1)


def train_variant(spec: RecallSpec, variant: str, args, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    model = build_model(spec, variant, args.train_chunks * spec.chunk_size, args.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))
    )
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    budgets = [0, spec.temp_mem_budget // 2, spec.temp_mem_budget]
    max_distance, recent, log = 0, [], []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"train {variant}", disable=not progress)
    for step in bar:
        # Short inputs while the distance is short (cheap steps early on), never longer than train_chunks.
        num_chunks = min(args.train_chunks, max_distance + 1 + rng.randint(0, 1))
        distances = torch.randint(0, max_distance + 1, (args.batch, args.train_keys), generator=gen)
        ids, labels = make_batch(spec, gen, args.batch, num_chunks, distances, args.train_keys)
        kwargs = {}
        if variant != "full_attention":
            kwargs["temp_budget"] = rng.choice(budgets)
        tail = args.train_keys * (spec.key_len + 2)
        out = model(ids, logits_to_keep=tail + 1, **kwargs)  # only the answers are labelled: keep their logits
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, -tail:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            target = labels[:, -tail:]
            pred = out.logits[:, :-1].argmax(-1)
            mask = target != -100
            acc = ((pred == target) & mask).sum().item() / mask.sum().item()
        recent.append(acc)
        if len(recent) >= 20 and sum(recent[-20:]) / 20 >= args.advance_at and max_distance < args.train_chunks - 1:
            max_distance += 1
            recent.clear()
        if step % 20 == 0:
            log.append({"step": step, "loss": round(loss.item(), 4), "token_accuracy": round(acc, 4), "max_distance": max_distance})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", dist=max_distance)
    return model.eval(), {"train_seconds": round(time.perf_counter() - start, 1), "final_max_distance": max_distance, "log": log}


@torch.no_grad()
def evaluate_variant(spec: RecallSpec, model, variant: str, distances: list[int], samples: int, train_chunks: int, seed: int):
    """Exact recall per distance (one key per input, two chunks of filler before it); None beyond positions."""
    gen = torch.Generator().manual_seed(seed + 1)
    result = {}
    tail = spec.key_len + 2
    for distance in distances:
        num_chunks = distance + 2
        if variant == "full_attention" and num_chunks > train_chunks:
            result[str(distance)] = None
            continue
        hits = []
        for start in range(0, samples, 50):
            n = min(50, samples - start)
            d = torch.full((n, 1), distance)
            ids, labels = make_batch(spec, gen, n, num_chunks, d, 1)
            hits.append(answer_exact(model, ids, labels, tail))
        result[str(distance)] = round(torch.cat(hits).float().mean().item(), 4)
    return result


def plot(results: dict, spec: RecallSpec, train_chunks: int, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant, res in results["variants"].items():
        points = [(int(d), a) for d, a in res["exact_recall"].items() if a is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
    window = spec.temp_mem_budget // (spec.chunk_size // spec.temp_beacon_stride)
    ax.axvline(train_chunks - 1, color="grey", ls="--", lw=1, label=f"longest trained distance ({train_chunks - 1})")
    ax.axvline(window, color="grey", ls=":", lw=1, label=f"temporary-memory window ({window} chunks)")
    ax.axhline(1 / spec.key_symbols**spec.key_len, color="black", lw=0.5)
    ax.set_xscale("symlog", linthresh=1)
    distances = sorted({int(d) for res in results["variants"].values() for d in res["exact_recall"]})
    ax.set_xlim(-0.3, max(distances) * 1.3)
    ax.set_xticks(distances, [str(d) for d in distances])
    ax.set_xlabel("key distance before the question (chunks)")
    ax.set_ylabel("exact recall")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Recall trained from scratch ({spec.layers} layers, d={spec.hidden_size}, chunk {spec.chunk_size})")
    ax.legend(fontsize=8)
    atomic_save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--train-chunks", type=int, default=8, help="longest training input, in chunks")
    parser.add_argument("--train-keys", type=int, default=1, help="keys per training sample (all queried)")
    parser.add_argument("--advance-at", type=float, default=0.8, help="token accuracy that raises the distance")
    parser.add_argument("--distances", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("results/comet_recall"))
    parser.add_argument("--overwrite", action="store_true", help="rerun variants that already have results")
    for name, value in asdict(RecallSpec()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = RecallSpec(**{name: getattr(args, name) for name in asdict(RecallSpec())})
    path = args.output_dir / "comet_recall.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "overwrite", "output_dir", "threads")}
    results = {"settings": settings, "variants": {}}
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("settings") == settings:
            results = previous
        elif not args.overwrite:
            raise SystemExit(f"{path} holds results of other settings; pass --overwrite or another --output-dir")
    for variant in args.variants:
        if variant in results["variants"] and not args.overwrite:
            print(f"{variant}: kept from {path}")
            continue
        model, training = train_variant(spec, variant, args)
        recall = evaluate_variant(spec, model, variant, args.distances, args.eval_samples, args.train_chunks, args.seed)
        if path.is_file():  # another process may have finished other variants meanwhile: keep them
            current = json.loads(path.read_text())
            if current.get("settings") == settings:
                results["variants"] = {**current["variants"], **results["variants"]}
        results["variants"][variant] = {"exact_recall": recall, **training}
        print(variant, recall, f"({training['train_seconds']} s)")
        atomic_write_json(path, results)
        plot(results, spec, args.train_chunks, args.output_dir / "comet_recall.png")
    return results


if __name__ == "__main__":
    main()
