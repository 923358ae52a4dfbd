"""Does the global memory write a passkey, and does it hold it? A probe of `global_write="window"` models.

    OMP_NUM_THREADS=1 python -m scripts.hold_probe --length 4000 --depth 0.25 --key 49965 --output hold.json

The standard passkey prompt (`evaluation.passkey`) with the key at ``--depth``, read chunk by chunk:

* **write**: the window each layer chooses in the key's chunk (its text and softmax weight): does the write pick
  the key?
* **hold**: every ``--every`` chunks after that, each watched layer's global state's cosine to the state right after
  the key's chunk was folded: how fast do the filler chunks that follow dilute the key's state?

The answer to the prompt (greedy, through `generate`) closes the report.
"""

from __future__ import annotations

import argparse

import torch


def probe(model, tokenizer, length: int, depth: float, key: str, every: int = 2, max_new_tokens: int = 8) -> dict:
    from evaluation.passkey import PasskeyPrompt

    config = model.config
    if config.global_write != "window":
        raise ValueError(f"the probe reads window choices; this model writes its memory with {config.global_write!r}")
    C, G, layers = config.chunk_size, config.global_mem_size, config.base_config.num_hidden_layers
    prompt = PasskeyPrompt.from_tokenizer(tokenizer).build(key, length, depth)
    digits = tokenizer(" " + key, add_special_tokens=False).input_ids
    at = next(i for i in range(len(prompt)) if prompt[i : i + len(digits)] == digits)
    key_chunk = at // C
    ids = torch.tensor([prompt])
    watched = sorted({0, layers // 6, layers // 3, layers // 2, 2 * layers // 3, 5 * layers // 6, layers - 1})
    backbone = model.model
    cache = model.new_cache()
    write, hold, reference = [], [], None
    with torch.inference_mode():
        for begin in range(0, len(prompt) - 1, C):
            chunk = begin // C
            backbone.record_window_scores, backbone.window_scores = chunk == key_chunk, []
            # a chunk of C tokens fills the window, which is folded into memory at once
            model(ids[:, begin : min(begin + C, len(prompt) - 1)], cache=cache, logits_to_keep=1)
            if chunk == key_chunk:
                text = prompt[key_chunk * C : (key_chunk + 1) * C]
                for layer, scores in enumerate(backbone.window_scores[:layers]):
                    weights = scores[0].float().softmax(-1)
                    w = int(weights.argmax())
                    write.append({"layer": layer, "window": tokenizer.decode(text[w : w + G]),
                                  "weight": round(float(weights[w]), 3)})
                reference = [cache.memory.global_state[layer].float().clone() for layer in watched]
            elif reference is not None and (chunk - key_chunk) % every == 0:
                cosines = [
                    round(float(torch.nn.functional.cosine_similarity(
                        cache.memory.global_state[layer].float().flatten(), ref.flatten(), 0)), 3)
                    for layer, ref in zip(watched, reference, strict=True)
                ]  # fmt: skip
                hold.append({"chunks_after_key": chunk - key_chunk, "cosine": cosines})
        backbone.record_window_scores, backbone.window_scores = False, []
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, cache=cache, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)
    return {"length": length, "depth": depth, "key": key, "key_chunk": key_chunk, "watched_layers": watched,
            "write": write, "hold": hold, "answer": answer, "found": key in answer}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-comet", help="CoMeT folder or 'smollm2-comet'")
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--depth", type=float, default=0.25)
    parser.add_argument("--key", default="49965")
    parser.add_argument("--every", type=int, default=2, help="record the hold every N chunks")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output", help="JSON file to write")
    args = parser.parse_args(argv)

    from evaluation.common import atomic_write_json, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    result = {"model": args.model, "dtype": args.dtype,
              **probe(model, tokenizer, args.length, args.depth, args.key, args.every)}
    layers_seen = [w["layer"] for w in result["write"] if args.key in w["window"]]
    print(f"write: the key's window chosen in {len(layers_seen)} of {len(result['write'])} layers")
    for row in result["hold"]:
        print(f"{row['chunks_after_key']:4d} chunks after: cosine to the state after the key {row['cosine']}")
    print(f"answer: {result['answer']!r} ({'found' if result['found'] else 'missed'})")
    if args.output:
        atomic_write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
