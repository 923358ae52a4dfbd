"""Where does a CoMeT checkpoint's recall stop? Passkey exact-match by fact distance and temporary-memory budget.

    OMP_NUM_THREADS=1 python -m scripts.recall_diagnostic FOLDER [FOLDER ...] --output diag.json

For each checkpoint folder, passkey samples built like the recall training data (real prose filler, 3-4 chunks,
no question on a window boundary) with the key exactly ``d`` chunks before the question's chunk (d = 0 is the
question's own chunk, read as raw text), scored by teacher-forced exact match of the answer (and the share of its digits predicted right), once with the
temporary memory (the configured budget) and once without it (budget 0: only the global memory can carry the
key). A model whose memory carries nothing scores 0 at every d >= 1.

``--boundary`` scores samples whose answer crosses a window boundary instead (the window folds after 0 .. len-1 of
its tokens): the rest of the answer is then generated in a fresh window that sees the question only through memory,
as at inference whenever a prompt ends within a few tokens of a multiple of the chunk size.
"""

from __future__ import annotations

import argparse
import random

import torch


def exact_match(model, builder, collator, distance: int, budget: int | None, samples: int) -> dict[str, float]:
    """Teacher-forced exact match of the answers, and the share of the answers' digit tokens predicted right
    (chance: 0.1), which shows a memory that carries part of a key before it carries all of it."""
    from training.recall_data import answer_accuracy

    hits, digits_right, digits = [], 0, 0
    for index in range(samples):
        batch = collator([builder.build(random.Random(f"diagnostic/{index}"), distance, distance)])
        spans, tail = batch.pop("answer_spans"), int(batch.pop("answer_tail"))
        extra = {} if budget is None else {"temp_budget": budget}
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        logits_to_keep=max(tail, 1), use_cache=False, **extra)
        hits.append(answer_accuracy(out.logits, batch["input_ids"], spans, tail)[1])
        ids, width = batch["input_ids"], batch["input_ids"].shape[1]
        predicted = out.logits.argmax(-1)
        for b, row in enumerate(spans):
            for start, end in row:
                for column in range(start, end):
                    if builder.tokenizer.decode(ids[b, column]).strip().isdigit():
                        digits += 1
                        digits_right += int(predicted[b, column - 1 - (width - tail)] == ids[b, column])
    return {"exact": sum(hits) / len(hits), "digit_accuracy": digits_right / digits if digits else 0.0}


FILLERS = ("prose", "repeat", "passkey")


def make_filler(kind: str, tokenizer):
    """The filler of a diagnostic: ``prose`` (pydoc, as in training), ``repeat`` (`RepeatedFiller`: a few short
    sentences tiled) or ``passkey`` (`evaluation.passkey.FILLER` tiled, the evaluation's own filler)."""
    from training.lm_data import pydoc_texts
    from training.recall_data import FillerStream, RepeatedFiller

    if kind == "prose":
        return FillerStream.from_texts(pydoc_texts(), tokenizer)
    if kind == "repeat":
        return RepeatedFiller.from_tokenizer(tokenizer)
    if kind == "passkey":
        from evaluation.passkey import FILLER

        return RepeatedFiller.from_tokenizer(tokenizer, [FILLER], max_period=1)
    raise ValueError(f"filler must be one of {FILLERS}, got {kind!r}")


def diagnose_model(
    model, tokenizer, distances, samples: int, prefix: str = "", boundary: bool = False,
    lead_chunks: tuple[int, int] = (0, 0), filler: str = "prose",
) -> dict[str, dict[str, float]]:
    """Scores of one loaded CoMeT model (see the module doc) per distance, with and without the temporary memory,
    keyed ``"{prefix}distance={d} temp_budget=configured|0"``; ``boundary``: answers that cross a fold; ``lead_chunks``:
    chunks of filler before the fact (`RecallSampleBuilder.lead_chunks`); ``filler``: one of `FILLERS`."""
    from training.recall_data import RecallCollator, RecallSampleBuilder

    builder = RecallSampleBuilder(tokenizer, make_filler(filler, tokenizer),
                                  chunk_size=model.config.chunk_size, task="passkey", num_chunks=(3, 4),
                                  boundary_fraction=1.0 if boundary else 0.0, lead_chunks=lead_chunks)
    collator = RecallCollator(pad_token_id=tokenizer.eos_token_id)
    results = {}
    for distance in distances:
        for budget in (None, 0):
            name = f"{prefix}distance={distance} temp_budget={'configured' if budget is None else 0}"
            results[name] = exact_match(model, builder, collator, distance, budget, samples)
            print(name, results[name], flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="CoMeT checkpoint folders")
    parser.add_argument("--distances", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--boundary", action="store_true", help="answers that cross a window boundary")
    parser.add_argument("--lead_chunks", type=int, nargs=2, default=(0, 0), metavar=("MIN", "MAX"),
                        help="chunks of filler before the fact")
    parser.add_argument("--filler", choices=FILLERS, default="prose",
                        help="prose (as in training), repeat (short sentences tiled) or passkey (the evaluation's)")
    parser.add_argument("--output", help="JSON file to write")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_comet  # noqa: F401  (registers CoMeT with the Auto classes)
    from evaluation.common import atomic_write_json

    results = {}
    for folder in args.models:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        results.update(diagnose_model(model, tokenizer, args.distances, args.samples, prefix=f"{folder} ",
                                      boundary=args.boundary, lead_chunks=tuple(args.lead_chunks),
                                      filler=args.filler))
    if args.output:
        atomic_write_json(args.output, {"samples": args.samples, "boundary": args.boundary,
                                        "lead_chunks": list(args.lead_chunks), "filler": args.filler,
                                        "results": results})
    return results


if __name__ == "__main__":
    main()
