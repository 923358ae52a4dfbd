"""Prefill time and peak memory against input length: CoMeT vs the same base with full attention.

    python -m benchmarks.comet_scaling                       # both suites, results/benchmarks/comet_scaling.{json,png}
    python -m benchmarks.comet_scaling --suite tiny --tiny-lengths 8192 65536 1048576
    python -m benchmarks.comet_scaling --dtypes float32,bfloat16   # both, side by side (bf16: native-bf16 CPUs)

Every measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own;
we report it and peak RSS minus the RSS right after loading the model (the memory the input costs; the
CoMeT process also holds the base model it was built from, which only the first number includes). Timings
are medians over `--repeats` runs inside that subprocess. Both models are measured side by side in one
invocation, with the same thread count.

* suite `smollm2`: SmolLM2-135M-Instruct, CoMeT (default memory: chunk 256, 8 global slots, beacon every
  16, budget 64) vs full attention (sdpa), 1k to 32k tokens (full attention stops at `--base-max`).
* suite `tiny`: a 2-layer, d=64 Llama, CoMeT vs full attention, 8k to 1M tokens.

`--memory-fields` sets other memory fields for both (e.g. the shipped default's `global_write=window temp_write=tail
fold_delay=32`); the memory is freshly initialised either way, which does not change the time or memory.

`--dtypes` (default float32) lists the weight dtypes to measure, each point in each; with more than one, the
summary reports every dtype's targets and the speed-up of each dtype over the first at every point.

Targets (issue 2): CoMeT time per token at 1M within 1.15x of that at 8k; peak memory at 1M within 10% of
that at 8k; overhead against full attention at 2k no worse than (chunk + memory tokens)/chunk x 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from evaluation.common import add_output_arguments, atomic_save_figure, atomic_write_json, pyplot, refuse_to_replace

WORKER = r"""
import json, resource, statistics, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from modeling_comet import CometForCausalLM
if spec["model"] == "smollm2":
    from convert.smollm2 import smollm2_path
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=getattr(torch, spec["dtype"])).eval()
else:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2 ** 21)
    base = LlamaForCausalLM(cfg).to(getattr(torch, spec["dtype"])).eval()
model = CometForCausalLM.from_base(base, **spec["memory"]).eval() if spec["kind"] == "comet" else base
vocab = base.config.vocab_size
ids = torch.randint(0, vocab, (1, spec["length"]))
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
with torch.no_grad():
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        if spec["kind"] == "comet":
            model.read(ids)
        else:
            model(ids, logits_to_keep=1)
        times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": times, "median_s": statistics.median(times), "peak_rss_mib": peak / 1024,
                  "input_rss_mib": (peak - rss_loaded) / 1024}))
"""

SMOLLM2_MEMORY = dict(chunk_size=256, global_mem_size=8, temp_beacon_stride=16, temp_mem_budget=64)
TINY_MEMORY = dict(chunk_size=256, global_mem_size=8, temp_beacon_stride=16, temp_mem_budget=64)


def run_worker(worker: str, spec: dict, threads: int, timeout: int) -> dict:
    """Run ``worker`` in a fresh Python process on ``spec`` (so that its peak RSS is its own); its last stdout line
    is its JSON result, or ``{"error": ...}`` if it failed or timed out."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run([sys.executable, "-c", worker, json.dumps(spec)], capture_output=True, text=True,
                              env=env, cwd=root, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_fields(items: list[str]) -> dict:
    """``["global_write=window", "fold_delay=32"]`` -> ``{"global_write": "window", "fold_delay": 32}``; the fields are
    checked by building a model's configuration in the worker, names here."""
    from modeling_comet import CometConfig

    known = {name for name in CometConfig.__dataclass_fields__} - {"base_config"}
    fields = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--memory-fields takes FIELD=VALUE with a CometConfig field, got {item!r}")
        fields[name] = int(value) if value.lstrip("-").isdigit() else value
    return fields


DTYPES = ("float32", "bfloat16", "float16")


def parse_dtypes(text: str) -> list[str]:
    """``float32,bfloat16`` -> ``["float32", "bfloat16"]`` (order kept: speed-ups are against the first)."""
    dtypes = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in dtypes if name not in DTYPES]
    if not dtypes or unknown or len(set(dtypes)) != len(dtypes):
        raise argparse.ArgumentTypeError(
            f"--dtypes takes distinct names from {', '.join(DTYPES)} separated by commas, got {text!r}"
        )
    return dtypes


def measure(model: str, kind: str, length: int, memory: dict, repeats: int, threads: int, timeout: int,
            dtype: str = "float32") -> dict:
    spec = dict(model=model, kind=kind, length=length, memory=memory, repeats=repeats, threads=threads, dtype=dtype)
    result = {"model": model, "kind": kind, "length": length, "dtype": dtype,
              **run_worker(WORKER, spec, threads, timeout)}
    if "error" not in result:
        result["ms_per_1k_tokens"] = 1000 * result["median_s"] / length * 1000
    return result


def run_suite(name, lengths, base_max, memory, repeats, long_repeats, long_from, threads, timeout, results, progress, save,
              dtypes=("float32",)):
    for length in lengths:
        for kind in ("comet", "full_attention"):
            if kind == "full_attention" and length > base_max:
                continue
            for dtype in dtypes:
                progress.set_postfix_str(f"{name} {kind} {length} {dtype}")
                runs = repeats if length < long_from else long_repeats
                results.append(measure(name, kind, length, memory, runs, threads, timeout, dtype))
                save()  # an interrupted run keeps what it measured
                progress.update(1)


def dtype_of(result: dict) -> str:
    return result.get("dtype", "float32")  # results recorded before --dtypes existed were float32


def summarise(results: list[dict], dtypes: list[str] | tuple[str, ...] = ("float32",)) -> dict:
    """The targets for one dtype (a flat dict, as before ``--dtypes``), or for several: ``{dtype: targets}`` plus
    ``speedup_over_<first dtype>``, the ratio of median times at every point measured in both."""
    if len(dtypes) == 1:
        return summarise_dtype([r for r in results if dtype_of(r) == dtypes[0]])
    summary = {dtype: summarise_dtype([r for r in results if dtype_of(r) == dtype]) for dtype in dtypes}
    reference = {(r["model"], r["kind"], r["length"]): r for r in results
                 if dtype_of(r) == dtypes[0] and "error" not in r}  # fmt: skip
    speedups = []
    for r in results:
        ref = reference.get((r["model"], r["kind"], r["length"]))
        if dtype_of(r) != dtypes[0] and ref is not None and "error" not in r:
            speedups.append({"model": r["model"], "kind": r["kind"], "length": r["length"], "dtype": dtype_of(r),
                             "speedup": ref["median_s"] / r["median_s"]})  # fmt: skip
    summary[f"speedup_over_{dtypes[0]}"] = speedups
    return summary


def summarise_dtype(results: list[dict]) -> dict:
    def get(model, kind, length):
        return next((r for r in results if r["model"] == model and r["kind"] == kind and r["length"] == length
                     and "error" not in r), None)

    summary = {}
    tiny = sorted(r["length"] for r in results if r["model"] == "tiny" and r["kind"] == "comet" and "error" not in r)
    if len(tiny) >= 2:
        lo, hi = get("tiny", "comet", tiny[0]), get("tiny", "comet", tiny[-1])
        summary["tiny_time_per_token_ratio"] = {"lengths": [tiny[0], tiny[-1]], "ratio": hi["ms_per_1k_tokens"] / lo["ms_per_1k_tokens"], "target": 1.15}
        summary["tiny_peak_memory_ratio"] = {"lengths": [tiny[0], tiny[-1]], "ratio": hi["peak_rss_mib"] / lo["peak_rss_mib"], "target": 1.10,
                                             "input_rss_mib": [lo["input_rss_mib"], hi["input_rss_mib"]]}
    comet2k, base2k = get("smollm2", "comet", 2048), get("smollm2", "full_attention", 2048)
    if comet2k and base2k:
        m = SMOLLM2_MEMORY
        extra = (m["chunk_size"] + 2 * m["global_mem_size"] + m["temp_mem_budget"] + m["chunk_size"] // m["temp_beacon_stride"]) / m["chunk_size"]
        summary["smollm2_overhead_at_2k"] = {"ratio": comet2k["median_s"] / base2k["median_s"], "target": extra * 1.1,
                                             "tokens_processed_per_text_token": extra}
    return summary


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    models = [m for m in ("smollm2", "tiny") if any(r["model"] == m for r in results)]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    dtypes = list(dict.fromkeys(dtype_of(r) for r in results))
    for row, model in enumerate(models):
        for (kind, style), dtype in ((k, d) for k in (("comet", "o-"), ("full_attention", "s--")) for d in dtypes):
            pts = sorted((r["length"], r) for r in results if r["model"] == model and r["kind"] == kind
                         and dtype_of(r) == dtype and "error" not in r)  # fmt: skip
            if not pts:
                continue
            xs = [p[0] for p in pts]
            label = kind if len(dtypes) == 1 else f"{kind} ({dtype})"
            axes[row][0].plot(xs, [p[1]["ms_per_1k_tokens"] for p in pts], style, label=label)
            axes[row][1].plot(xs, [p[1]["input_rss_mib"] for p in pts], style, label=label)
        for col, ylabel in enumerate(("prefill time per 1k tokens (ms, median)", "peak RSS added by the input (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("input tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["all", "smollm2", "tiny"], default="all")
    parser.add_argument("--smollm2-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--tiny-lengths", type=int, nargs="+", default=[8192, 32768, 131072, 1048576])
    parser.add_argument("--base-max", type=int, default=16384, help="longest input for full attention on SmolLM2")
    parser.add_argument("--tiny-base-max", type=int, default=131072, help="longest input for full attention on the tiny model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-repeats", type=int, default=None, help="repeats for inputs >= --long-from tokens")
    parser.add_argument("--long-from", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    parser.add_argument("--output-dir", type=Path, default=Path("results/benchmarks"))
    parser.add_argument("--dtypes", type=parse_dtypes, default=["float32"],
                        help="weight dtypes to measure, e.g. float32,bfloat16 (bf16 is fast only on CPUs with "
                             "AVX512-BF16/AMX and on Ampere+ GPUs)")
    parser.add_argument("--memory-fields", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="CoMeT fields over the default memory of both suites, e.g. global_write=window "
                             "temp_write=tail fold_delay=32 (the shipped default's reading)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    refuse_to_replace(args.output_dir / "comet_scaling.json", args.output_dir / "comet_scaling.png",
                      overwrite=args.overwrite)
    overrides = parse_fields(args.memory_fields)
    smollm2_memory, tiny_memory = {**SMOLLM2_MEMORY, **overrides}, {**TINY_MEMORY, **overrides}
    if args.long_repeats is None:
        args.long_repeats = args.repeats

    args.output_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    suites = []
    if args.suite in ("all", "smollm2"):
        suites.append(("smollm2", args.smollm2_lengths, args.base_max, smollm2_memory))
    if args.suite in ("all", "tiny"):
        suites.append(("tiny", args.tiny_lengths, args.tiny_base_max, tiny_memory))
    total = len(args.dtypes) * sum(len(lengths) + sum(1 for n in lengths if n <= bmax) for _, lengths, bmax, _ in suites)
    def save():
        report.update(results=results, summary=summarise(results, args.dtypes))
        atomic_write_json(args.output_dir / "comet_scaling.json", report)
        plot(results, args.output_dir / "comet_scaling.png")

    report = {"threads": args.threads, "repeats": args.repeats, "dtypes": args.dtypes,
              "memory": {"smollm2": smollm2_memory, "tiny": tiny_memory}}
    with tqdm(total=total, desc="benchmark", unit="run") as progress:
        for name, lengths, base_max, memory in suites:
            run_suite(name, lengths, base_max, memory, args.repeats, args.long_repeats, args.long_from, args.threads,
                      args.timeout, results, progress, save, args.dtypes)
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
