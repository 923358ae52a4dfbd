"""Is a long passkey prompt's failure the memory's state or the chunk boundary? Answers and state statistics.

    OMP_NUM_THREADS=1 python -m scripts.boundary_probe --lengths 4020 4032 4050 8000 --output probe.json

For each prompt length, the standard passkey prompt (`evaluation.passkey`) with the key at depth 1 (right before the
question) is read chunk by chunk; every ``--every`` chunks the probe records the global state's mean per-slot norm
(layers 0, 10, 20, 29 of SmolLM2) and its cosine to the state ``--every`` chunks earlier, then generates the answer.
A prompt whose length is a multiple of the chunk size closes a window with its last token, so the answer is written
in a fresh window that sees the question only through memory; other lengths keep the question in the live window.
"""

from __future__ import annotations

import argparse
import time

import torch


def probe(model, tokenizer, length: int, key: str, every: int, max_new_tokens: int = 8) -> dict:
    from evaluation.passkey import PasskeyPrompt

    prompt = PasskeyPrompt.from_tokenizer(tokenizer).build(key, length, 1.0)
    ids = torch.tensor([prompt])
    C = model.config.chunk_size
    cache = model.new_cache()
    layers = model.config.base_config.num_hidden_layers
    watched = sorted({0, layers // 3, 2 * layers // 3, layers - 1})
    trace, previous = [], None
    start = time.time()
    with torch.inference_mode():
        for begin in range(0, len(prompt) - 1, C):
            model(ids[:, begin : min(begin + C, len(prompt) - 1)], cache=cache, logits_to_keep=1)
            chunk = begin // C
            if chunk % every == 0:
                state = torch.cat([cache.memory.global_state[layer].float().flatten() for layer in range(layers)])
                cosine = None if previous is None else float(torch.nn.functional.cosine_similarity(state, previous, 0))
                norms = [float(cache.memory.global_state[layer].float().norm(dim=-1).mean()) for layer in watched]
                trace.append({"chunk": chunk, "slot_norm": dict(zip(map(str, watched), norms, strict=True)),
                              "cosine_to_previous": cosine})
                previous = state
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, cache=cache, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)
    return {"length": length, "tokens_in_last_window": (len(prompt) - 1) % C + 1, "answer": answer,
            "found": key in answer, "seconds": round(time.time() - start, 1), "trace": trace}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-comet", help="CoMeT folder or 'smollm2-comet'")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4020, 4032, 4050, 8000])
    parser.add_argument("--key", default="48213")
    parser.add_argument("--every", type=int, default=8, help="record the state every N chunks")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--output", help="JSON file to write")
    args = parser.parse_args(argv)

    from evaluation.common import atomic_write_json, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    results = []
    for length in args.lengths:
        results.append(probe(model, tokenizer, length, args.key, args.every))
        row = results[-1]
        print(f"{length} tokens ({row['tokens_in_last_window']} in the last window): {row['answer']!r}", flush=True)
    if args.output:
        atomic_write_json(args.output, {"model": args.model, "dtype": args.dtype, "key": args.key, "results": results})
    return results


if __name__ == "__main__":
    main()
