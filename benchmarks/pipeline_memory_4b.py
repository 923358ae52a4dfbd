"""Memory and time of one pipeline rank's training step for a 4B CoMeT on a GPU, by chunks held.

    python -m benchmarks.pipeline_memory_4b --out results/benchmarks/pipeline_scaling/four_b_gpu.json

A pipeline rank holding n of a sample's chunks keeps the activations of those n chunks only, so its memory is
weights + n·(bytes per chunk) + a transient. This measures bytes per chunk directly: a Qwen3-4B-shaped CoMeT (random
weights, bf16, the authors' memory configuration: chunk 2048, 512 global slots, a beacon every 8 tokens, temporary
budget 2048) runs `layer_pipeline_loss` forward and backward on samples of n chunks, base frozen and memory trained
(the activation footprint of LoRA), with and without activation checkpointing; peak CUDA memory above the weights,
fitted against n, gives the per-chunk slope and the transient; the step time per chunk comes with it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from evaluation.common import add_output_arguments, refuse_to_replace

FOUR_B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, vocab_size=151936)
MEMORY = dict(chunk_size=2048, global_mem_size=512, temp_beacon_stride=8, temp_mem_budget=2048)


def build(device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from modeling_comet import CometForCausalLM

    config = Qwen3Config(**FOUR_B, max_position_embeddings=32768, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds, not minutes
        base = Qwen3ForCausalLM(config).to(torch.bfloat16)
        model = CometForCausalLM.from_base(base, **MEMORY).train()
    del base
    for name, param in model.named_parameters():
        param.requires_grad = "comet_memory." in name
    return model


def step(model, chunks: int, device) -> tuple[int, float]:
    """(peak bytes above what was allocated before, seconds) of one forward + backward over ``chunks`` chunks."""
    from training.layer_pipeline import layer_pipeline_loss

    ids = torch.randint(3, FOUR_B["vocab_size"], (1, chunks * MEMORY["chunk_size"]), device=device)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    layer_pipeline_loss(model, ids, ids).backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before
    model.zero_grad(set_to_none=True)
    return peak, seconds


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of peak bytes against chunks."""
    n = len(points)
    mx = sum(c for c, _ in points) / n
    my = sum(b for _, b in points) / n
    slope = sum((c - mx) * (b - my) for c, b in points) / sum((c - mx) ** 2 for c, _ in points)
    return slope, my - slope * mx


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/pipeline_scaling/four_b_gpu.json"))
    parser.add_argument("--checkpointed-chunks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--plain-chunks", type=int, nargs="+", default=[1, 2])
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    refuse_to_replace(args.out, overwrite=args.overwrite, option="--out")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("gloo", rank=0, world_size=1)  # one pipeline rank: the code path of training
    device = torch.device("cuda")
    t0 = time.perf_counter()
    model = build(device)
    weights = torch.cuda.memory_allocated()
    build_s = time.perf_counter() - t0
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": {**FOUR_B, **MEMORY},
              "parameters": sum(p.numel() for p in model.parameters()), "weights_bytes": weights,
              "build_seconds": build_s, "runs": []}
    step(model, 1, device)  # warm-up
    for checkpointing, chunk_list in ((True, args.checkpointed_chunks), (False, args.plain_chunks)):
        if checkpointing:
            model.activation_checkpointing_enable()
        else:
            model.activation_checkpointing_disable()
        points = []
        for chunks in chunk_list:
            peak, seconds = step(model, chunks, device)
            points.append((chunks, peak))
            result["runs"].append(dict(checkpointing=checkpointing, chunks=chunks, peak_above_weights_bytes=peak,
                                       seconds=seconds))
            print(json.dumps(result["runs"][-1]), flush=True)
        slope, intercept = fit(points) if len(points) > 1 else (float("nan"), float("nan"))
        key = "checkpointed" if checkpointing else "plain"
        result[f"{key}_bytes_per_chunk"] = slope
        result[f"{key}_bytes_per_layer_chunk"] = slope / FOUR_B["num_hidden_layers"]
        result[f"{key}_transient_bytes"] = intercept
    window = (MEMORY["global_mem_size"] + MEMORY["temp_mem_budget"] + MEMORY["chunk_size"]
              + MEMORY["chunk_size"] // MEMORY["temp_beacon_stride"] + MEMORY["global_mem_size"])
    memory_rows = 2 * MEMORY["global_mem_size"] + MEMORY["temp_mem_budget"]
    result["formula_bytes_per_layer_chunk_checkpointed"] = (2 * window + memory_rows) * FOUR_B["hidden_size"] * 2
    dist.destroy_process_group()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return result


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
