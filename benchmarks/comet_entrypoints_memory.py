"""Peak memory of CoMeT through the entry points users call: `read`, `generate` and `pipeline`, 8k vs 1M tokens.

    python -m benchmarks.comet_entrypoints_memory                 # results/benchmarks/entrypoints/{json,png}
    python -m benchmarks.comet_entrypoints_memory --lengths 8192 131072 1048576 --entries generate

Every measurement runs in a fresh process on a tiny Llama base (2 layers, d=64, vocab 1024; chunk 256), so its
peak resident memory (ru_maxrss) is its own. `pipeline` gets text of that many words and a word-level tokenizer
(one token per word), so it also pays for the text and its tokenisation; `tokenize` measures that tokenisation
alone, without the model. `pipeline_comet` and `tokenize_pieces` are the same with `CometTextGenerationPipeline`
(`pipeline_class=`), which tokenizes the prompt piece by piece (`encode_long_text`). Target (issue 8): peak RSS at
1M within 1.10x of that at 8k for `generate` and `pipeline`. With `--model smollm2 --entries generate
read_generate --lengths 32768` it times the embedded SmolLM2
CoMeT (bf16) generating from a 32k prompt against reading it and generating from the read state.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from evaluation.common import add_output_arguments, atomic_save_figure, atomic_write_json, pyplot, refuse_to_replace

from .comet_scaling import run_worker

ENTRIES = ("read", "generate", "pipeline", "pipeline_comet", "tokenize", "tokenize_pieces", "read_generate")
WORKER = r"""
import json, resource, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
from transformers import LlamaConfig, LlamaForCausalLM
from modeling_comet import CometForCausalLM
if spec["model"] == "smollm2":
    from convert.comet_default import comet_default_path
    model = CometForCausalLM.from_pretrained(comet_default_path(), dtype=torch.bfloat16).eval()
else:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048)
    model = CometForCausalLM.from_base(LlamaForCausalLM(cfg), chunk_size=256, global_mem_size=8,
                                       temp_beacon_stride=16, temp_mem_budget=64).eval()
n = spec["length"]
start = time.perf_counter()
if spec["entry"] in ("pipeline", "pipeline_comet", "tokenize", "tokenize_pieces"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline
    # One token per word: special tokens named unlike the words (a special "w2" would also match inside "w20").
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<s>": 3, **{f"w{i}": i for i in range(4, 1024)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # " ".join(f"w{i % 1000 + 4}" for i in range(n)), built from its 1000-word period: joining a million separate
    # word strings would itself cost ~70 MiB at 1M words, more than the text (5 MiB) a user's document takes.
    period = " ".join(f"w{i + 4}" for i in range(1000))
    text = " ".join(filter(None, [" ".join([period] * (n // 1000)), " ".join(f"w{i + 4}" for i in range(n % 1000))]))
    start = time.perf_counter()
    if spec["entry"] == "tokenize":  # what the pipeline's preprocessing alone costs, no model call
        tok(text, return_tensors="pt")
    elif spec["entry"] == "tokenize_pieces":  # the same ids, tokenized piece by piece
        from modeling_comet.pipeline_comet import encode_long_text
        encode_long_text(tok, text)
    elif spec["entry"] == "pipeline":
        pipeline("text-generation", model=model, tokenizer=tok)(text, max_new_tokens=2, do_sample=False)
    else:  # the same plain call with the pipeline class that tokenizes in pieces
        from modeling_comet.pipeline_comet import CometTextGenerationPipeline
        pipeline("text-generation", model=model, tokenizer=tok, pipeline_class=CometTextGenerationPipeline)(
            text, max_new_tokens=2, do_sample=False)
else:
    ids = torch.randint(4, 1024, (1, n))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        if spec["entry"] == "read":
            model.read(ids)
        elif spec["entry"] == "read_generate":  # read all but the last token, then generate from that state
            cache = model.read(ids[:, :-1])
            model.generate(ids, cache=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
        else:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024, "loaded_rss_mib": rss_loaded / 1024}))
"""


def measure(entry: str, length: int, timeout: int, model: str = "tiny") -> dict:
    spec = {"entry": entry, "length": length, "model": model}
    return {"entry": entry, "length": length, **run_worker(WORKER, spec, threads=1, timeout=timeout)}


def summarise(results: list[dict]) -> dict:
    summary = {}
    for entry in ENTRIES:
        runs = sorted((r["length"], r) for r in results if r["entry"] == entry and "error" not in r)
        if len(runs) >= 2:
            (lo, a), (hi, b) = runs[0], runs[-1]
            summary[entry] = {"lengths": [lo, hi], "peak_rss_ratio": round(b["peak_rss_mib"] / a["peak_rss_mib"], 3),
                              "target": 1.10}
    return summary


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for entry in ENTRIES:
        pts = sorted((r["length"], r["peak_rss_mib"]) for r in results if r["entry"] == entry and "error" not in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=entry)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input tokens")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title("CoMeT peak memory by entry point (tiny Llama, chunk 256)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", nargs="+", choices=ENTRIES, default=list(ENTRIES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 1048576])
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                        help="smollm2: the embedded default CoMeT in bf16 (e.g. --entries generate read_generate)")
    parser.add_argument("--output-dir", type=Path, default=Path("results/benchmarks/entrypoints"))
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    results: list[dict] = []
    report = {"model": args.model, "lengths": args.lengths, "threads": 1}
    name = "comet_entrypoints_memory" + ("" if args.model == "tiny" else f"_{args.model}")
    refuse_to_replace(args.output_dir / f"{name}.json", args.output_dir / f"{name}.png", overwrite=args.overwrite)
    for entry in tqdm(args.entries, desc="entry points"):
        for length in args.lengths:
            results.append(measure(entry, length, args.timeout, args.model))
            report.update(results=results, summary=summarise(results))
            atomic_write_json(args.output_dir / f"{name}.json", report)  # keep what was measured
    plot(results, args.output_dir / f"{name}.png")
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
