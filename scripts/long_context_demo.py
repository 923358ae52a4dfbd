"""Main job: read a long input with the embedded CoMeT model (SmolLM2-135M-Instruct) and answer.

    make demo                                   # or: .venv/bin/python -m scripts.long_context_demo
    .venv/bin/python -m scripts.long_context_demo --tokens 65536 --max-new-tokens 48

Builds the CoMeT checkpoint once (cached), reads at least 32k tokens of English prose (the standard
library's pydoc topics, repeated as needed) chunk by chunk with a progress bar, then generates an
answer to a question placed after the document. Prints the generated text, reading and generation
speed (tokens/s), the size of the memory state, and the process's peak resident memory.

The memory of the shipped checkpoint is freshly initialised, so the answer reflects mostly the last
chunk read; the point of this job is that any input length runs in constant memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.comet_default import comet_default_path


def prose_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def build_prompt_ids(tokenizer, n_tokens: int, question: str) -> torch.Tensor:
    corpus_ids = tokenizer(prose_corpus(), add_special_tokens=False).input_ids
    repeats = -(-n_tokens // len(corpus_ids))
    document = tokenizer.decode((corpus_ids * repeats)[:n_tokens])
    messages = [{"role": "user", "content": f"{document}\n\n{question}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Read a long input with CoMeT and generate an answer.")
    parser.add_argument("--model", default=None, help="CoMeT checkpoint folder (default: the embedded SmolLM2 CoMeT)")
    parser.add_argument("--tokens", type=int, default=32768, help="length of the document in tokens")
    parser.add_argument("--question", default="Which programming language is this documentation about? Answer briefly.")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--trust-remote-code", "--trust_remote_code", action="store_true",
        help="let --model run modelling code from its folder (a CoMeT checkpoint loads with this package's classes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = args.model or comet_default_path()
    trust = args.trust_remote_code or args.model is None  # our own default checkpoint may run its own code
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust, dtype=torch.float32).eval()
    ids = build_prompt_ids(tokenizer, args.tokens, args.question)
    rss_loaded = peak_rss_mib()
    print(f"model: {folder}\ninput: {ids.shape[1]} tokens (base context {model.config.base_config.max_position_embeddings})")

    start = time.perf_counter()
    cache = model.read(ids[:, :-1], progress=True)
    read_s = time.perf_counter() - start

    start = time.perf_counter()
    out = model.generate(ids, cache=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    gen_s = time.perf_counter() - start
    new_tokens = out.shape[1] - ids.shape[1]

    print("\n--- generated ---")
    print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    print("--- stats ---")
    print(f"read      : {ids.shape[1] - 1} tokens in {read_s:.1f} s = {(ids.shape[1] - 1) / read_s:.0f} tokens/s")
    print(f"generate  : {new_tokens} tokens in {gen_s:.1f} s = {new_tokens / gen_s:.1f} tokens/s")
    print(f"memory    : CoMeT state {cache.nbytes() / 2**20:.1f} MiB (fixed), peak RSS {peak_rss_mib():.0f} MiB "
          f"({rss_loaded:.0f} MiB after loading the model)")


if __name__ == "__main__":
    main()
