"""Main job: plant a fact early in a long document, read it once with CoMeT, and ask about it at the end.

    make demo                                   # or: .venv/bin/python -m scripts.long_context_demo
    .venv/bin/python -m scripts.long_context_demo --tokens 131072 --key 90417

Builds the embedded CoMeT model (SmolLM2-135M-Instruct with the trained memory shipped in
`checkpoints/`, cached) and, beside it, the same model with freshly initialised memory. Each reads a
document of at least 32k tokens of English prose (the standard library's pydoc topics, repeated as
needed) with a pass key planted near its start, chunk by chunk with a progress bar; saves the document
state (a `CometCache`) to a file; then answers several questions from that saved state without
reading the document again. Prints both models' answers side by side, the time to read versus the
time to answer from the saved state, the size of the state, and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.comet_default import DEFAULT_MEMORY, comet_default_path
from evaluation.common import resolve_dtype
from modeling_comet import CometCache, CometForCausalLM

QUESTIONS = (
    "\nWhat is the pass key? The pass key is",
    "\nWhich programming language is this documentation about? It is about",
)


def prose_ids(tokenizer, n_tokens: int) -> list[int]:
    from pydoc_data.topics import topics

    corpus = tokenizer("\n\n".join(topics[key] for key in sorted(topics)), add_special_tokens=False).input_ids
    return (corpus * (-(-n_tokens // len(corpus))))[:n_tokens]


def build_document(tokenizer, n_tokens: int, key: str, depth: float) -> tuple[torch.Tensor, int]:
    """Token ids of a document of ``n_tokens`` tokens with the pass-key sentence after ``depth`` of it."""
    fact = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key.", add_special_tokens=False).input_ids
    filler = prose_ids(tokenizer, n_tokens - len(fact))
    at = int(depth * len(filler))
    return torch.tensor([filler[:at] + fact + filler[at:]]), at


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.inference_mode()
def read_and_answer(model, tokenizer, document: torch.Tensor, state_file: Path, max_new_tokens: int) -> dict:
    """Read ``document`` once, save the state, then answer every question from a fresh load of that state."""
    start = time.perf_counter()
    cache = model.read(document, progress=True)
    read_s = time.perf_counter() - start
    cache.save(state_file)
    answers = []
    for question in QUESTIONS:
        q_ids = torch.tensor([tokenizer(question, add_special_tokens=False).input_ids])
        start = time.perf_counter()
        state = CometCache.load(state_file)
        out = model.generate(torch.cat([document, q_ids], dim=1), cache=state, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answers.append((tokenizer.decode(out[0, document.shape[1] + q_ids.shape[1] :], skip_special_tokens=True),
                        time.perf_counter() - start))
    return {"read_s": read_s, "answers": answers, "state_mib": cache.nbytes() / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Read a long document with a planted fact and ask about it.")
    parser.add_argument("--model", default=None, help="CoMeT checkpoint folder (default: the embedded SmolLM2 CoMeT)")
    parser.add_argument("--tokens", type=int, default=32768, help="length of the document in tokens")
    parser.add_argument("--key", default="48213", help="the pass key planted in the document")
    parser.add_argument("--depth", type=float, default=0.05, help="where the key sits, as a fraction of the document")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto (default): bfloat16 where the CPU computes it natively (AVX512-BF16/AMX; "
                             "reads ~2.5x faster than float32), else float32")
    parser.add_argument("--no-baseline", action="store_true", help="skip the model with untrained memory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--trust-remote-code", "--trust_remote_code", action="store_true",
        help="let --model run modelling code from its folder (a CoMeT checkpoint loads with this package's classes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.tokens < 1024:
        parser.error("--tokens must be at least 1024")
    if not 0.0 <= args.depth <= 1.0 or not args.key.isdigit():
        parser.error("--depth must lie in [0, 1] and --key must be digits")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = resolve_dtype(args.dtype, "cpu")
    dtype = getattr(torch, args.dtype)

    folder = args.model or comet_default_path()
    trust = args.trust_remote_code or args.model is None  # our own default checkpoint may run its own code
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    models = {"trained memory": AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust, dtype=dtype)}
    if not args.no_baseline:
        from convert.smollm2 import smollm2_path

        torch.manual_seed(0)
        models["untrained memory"] = CometForCausalLM.from_base(str(smollm2_path()), dtype=dtype, **DEFAULT_MEMORY)
    document, at = build_document(tokenizer, args.tokens, args.key, args.depth)
    chunk = next(iter(models.values())).config.chunk_size
    print(f"model: {folder} ({args.dtype})")
    print(f"document: {document.shape[1]} tokens; pass key {args.key} at token {at} (chunk {at // chunk} of "
          f"{-(-document.shape[1] // chunk)}); base context {models['trained memory'].config.base_config.max_position_embeddings}")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            print(f"\n[{name}]")
            results[name] = read_and_answer(model.eval(), tokenizer, document, Path(tmp) / "state.safetensors",
                                            args.max_new_tokens)

    print("\n--- answers (from the saved document state) ---")
    for i, question in enumerate(QUESTIONS):
        print(f"Q: {question.strip()}")
        for name, res in results.items():
            answer, _ = res["answers"][i]
            print(f"   {name:>16}: {answer.strip()!r}")
    print("--- stats ---")
    for name, res in results.items():
        answer_s = sum(s for _, s in res["answers"]) / len(res["answers"])
        print(f"{name:>16}: read {document.shape[1]} tokens in {res['read_s']:.1f} s "
              f"({document.shape[1] / res['read_s']:.0f} tokens/s); answer from the saved state in {answer_s:.1f} s "
              f"on average; state {res['state_mib']:.1f} MiB (fixed)")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
