"""Can a CoMeT model *read* a key from its global memory? The read path tested apart from the write path.

    OMP_NUM_THREADS=1 python -m scripts.memory_oracle FOLDER [FOLDER ...] --output oracle.json

Passkey samples as in `scripts.recall_diagnostic` with the key exactly one chunk before the question's chunk and
no temporary memory (budget 0), scored three ways:

- ``learned``: the memory the model writes itself (its readouts, gate and adapter);
- ``oracle``: the global memory slots replaced, at every layer, by the base model's own hidden states (the input
  to that layer, from a full-attention pass over the whole sample) of the ``global_mem_size`` tokens ending with
  the key's last digit: the best a memory of that size could hold, in the form the layers already read;
- ``oracle_shuffled``: the same states taken from another sample's key (a control: what the answer owes to the
  memory's content rather than to its form).

High ``oracle`` with ``learned`` at chance means the model reads slots fine and the learning problem is writing
(what the readouts gather); ``oracle`` at chance means the slots cannot be read as written here.
"""

from __future__ import annotations

import argparse
import random
from contextlib import contextmanager

import torch


def key_window(ids: list[int], answer: list[int], size: int) -> list[int]:
    """Columns of the ``size`` tokens that end with the first occurrence of ``answer``'s digits in ``ids``."""
    for start in range(len(ids) - len(answer) + 1):
        if ids[start : start + len(answer)] == answer:
            end = start + len(answer)
            return list(range(max(end - size, 0), end))
    raise ValueError("the key does not occur in the sample")


@contextmanager
def injected_memory(model, memories: list[torch.Tensor] | None):
    """While active, the global memory carried out of the first chunk is ``memories`` (one (B, G, d) per layer)."""
    backbone = model.model
    original = backbone._advance
    calls = {"n": 0}

    def advance(state, new_memories, validity):
        nxt = original(state, new_memories, validity)
        calls["n"] += 1
        if memories is not None and calls["n"] == 1:
            nxt.global_memory = [m.to(g.dtype) for m, g in zip(memories, nxt.global_memory, strict=True)]
        return nxt

    backbone._advance = advance
    try:
        yield
    finally:
        backbone._advance = original


def score(model, base, samples, mode: str) -> dict[str, float]:
    from training.recall_data import answer_accuracy

    G = model.config.global_mem_size
    exact, digits_right, digits = [], 0, 0
    for index, (batch, answer) in enumerate(samples):
        ids = batch["input_ids"]
        memories = None
        if mode != "learned":
            source_batch, source_answer = samples[(index + 1) % len(samples)] if mode == "oracle_shuffled" else (batch, answer)
            columns = key_window(source_batch["input_ids"][0].tolist(), source_answer, G)
            with torch.no_grad():
                states = base(source_batch["input_ids"], output_hidden_states=True).hidden_states
            memories = [states[layer][:, columns] for layer in range(len(states) - 1)]
        spans, tail = batch["answer_spans"], int(batch["answer_tail"])
        with torch.no_grad(), injected_memory(model, memories):
            out = model(input_ids=ids, logits_to_keep=max(tail, 1), use_cache=False, temp_budget=0)
        exact.append(answer_accuracy(out.logits, ids, spans, tail)[1])
        width, predicted = ids.shape[1], out.logits.argmax(-1)
        for start, end in spans[0]:
            for column in range(start, end):
                if ids[0, column] in answer:
                    digits += 1
                    digits_right += int(predicted[0, column - 1 - (width - tail)] == ids[0, column])
    return {"exact": sum(exact) / len(exact), "digit_accuracy": digits_right / max(digits, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="CoMeT checkpoint folders (built on the embedded SmolLM2 or any base)")
    parser.add_argument("--base", help="the base model folder (default: the embedded SmolLM2)")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--output", help="JSON file to write")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_comet  # noqa: F401  (registers CoMeT with the Auto classes)
    from convert.smollm2 import smollm2_path
    from evaluation.common import atomic_write_json
    from training.lm_data import pydoc_texts
    from training.recall_data import FillerStream, RecallCollator, RecallSampleBuilder

    base = AutoModelForCausalLM.from_pretrained(args.base or str(smollm2_path()), dtype=torch.float32).eval()
    results = {}
    for folder in args.models:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if not model.config.use_temp_memory and model.config.global_mem_size == 0:
            raise ValueError(f"{folder} has no global memory to test")
        builder = RecallSampleBuilder(tokenizer, FillerStream.from_texts(pydoc_texts(), tokenizer),
                                      chunk_size=model.config.chunk_size, task="passkey", num_chunks=(2, 2),
                                      boundary_fraction=0.0)
        collator = RecallCollator(pad_token_id=tokenizer.eos_token_id)
        samples = []
        for index in range(args.samples):
            row = builder.build(random.Random(f"oracle/{index}"), 1, 1)
            start, end = row["answer_spans"][0]
            answer = [t for t in row["input_ids"][start:end] if tokenizer.decode(t).strip().isdigit()]
            samples.append((collator([row]), answer))
        for mode in ("learned", "oracle", "oracle_shuffled"):
            results[f"{folder} {mode}"] = score(model, base, samples, mode)
            print(folder, mode, results[f"{folder} {mode}"], flush=True)
    if args.output:
        atomic_write_json(args.output, {"samples": args.samples, "distance": 1, "temp_budget": 0, "results": results})
    return results


if __name__ == "__main__":
    main()
