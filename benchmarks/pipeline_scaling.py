"""Layer-wavefront pipeline: measured training-step time at P = 1, 2 on this CPU, and a model of larger P and samples.

    python -m benchmarks.pipeline_scaling                      # results/benchmarks/pipeline_scaling/{json,png}
    python -m benchmarks.pipeline_scaling --layers 8 --chunks 16 --repeats 3

Measured (gloo, one thread per rank, every rank a process on this machine): one full fine-tuning step (forward,
backward, bucketed gradient all-reduce) of a small Llama-shaped CoMeT on one long sample, at P = 1 and 2; the
per-layer-per-chunk cost derived from P = 1; the bytes every rank sends per step (memory hand-offs and gradient
all-reduce), the point-to-point message time of those sizes; and the activation bytes saved for backward per layer
and chunk (autograd saved-tensor hooks), without and with activation checkpointing.

Modelled, from those measurements: the wavefront's step time and speed-up for P = 4, 8, 16 and 128k–1M-token
samples, T(P) = (L + P − 1)·(N/P)·t_cell + (N/P)·t_head + 2(L + P − 1)·t_msg + t_allreduce, against the ideal
P·L/(L + P − 1); memory per rank = weights and optimizer state + (N/P)·L·(saved bytes per layer and chunk) + one
chunk's transient. The same formulas give the 4B-at-128k estimate of docs/pipeline_parallel.md; the JSON says which
numbers are measured and which modelled.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation.common import add_output_arguments, atomic_save_figure, atomic_write_json, pyplot, refuse_to_replace

OUT = Path("results/benchmarks/pipeline_scaling")


def build_model(spec: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_comet import CometForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=spec["hidden"], intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
        max_position_embeddings=4 * spec["chunk_size"],
    )
    config._attn_implementation = "sdpa"
    base = LlamaForCausalLM(config)
    return CometForCausalLM.from_base(base, chunk_size=spec["chunk_size"], global_mem_size=spec["global_mem"],
                                      temp_beacon_stride=spec["stride"], temp_mem_budget=spec["temp_budget"]).train()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _saved_bytes(model, ids, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one forward (distinct storages, parameters excluded)."""
    from training.layer_pipeline import layer_pipeline_loss

    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in params:
                seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = layer_pipeline_loss(model, ids, ids)
        loss.backward()
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _head_saved_bytes(model, hidden, targets) -> int:
    """Bytes autograd keeps for one chunk's final norm, LM head and loss."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model.lm_head(model.model.norm(hidden)).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _worker(rank: int, world: int, port: int, spec: dict, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from training.layer_pipeline import all_reduce_gradients, layer_pipeline_forward

        model = build_model(spec)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, spec["vocab"], (1, spec["chunks"] * spec["chunk_size"]), generator=g)
        times = {"forward": [], "backward": [], "allreduce": [], "step": [], "cpu": []}
        for step in range(spec["repeats"] + 1):  # the first step warms up
            model.zero_grad(set_to_none=True)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = layer_pipeline_forward(model, ids, ids).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            buckets = all_reduce_gradients(model)
            t3 = time.perf_counter()
            cpu = torch.tensor([time.process_time() - c0])  # this rank's CPU time: its work, without waiting
            dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
            wall = torch.tensor([t3 - t0])
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
            if step:
                times["forward"].append(t1 - t0)
                times["backward"].append(t2 - t1)
                times["allreduce"].append(t3 - t2)
                times["step"].append(float(wall))
                times["cpu"].append(float(cpu))
        result = {k: statistics.median(v) for k, v in times.items()}
        result["step_all"] = times["step"]
        result["step_min"] = min(times["step"])
        result["buckets"] = buckets
        if world == 1:
            # The chunk-independent part: LM head and loss of one chunk, forward and backward.
            hidden = torch.randn(1, spec["chunk_size"], spec["hidden"], requires_grad=True)
            targets = ids[:, : spec["chunk_size"]]
            head = []
            for _ in range(3):
                t0 = time.perf_counter()
                logits = model.lm_head(model.model.norm(hidden)).float()
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
                head.append(time.perf_counter() - t0)
            result["head_per_chunk_s"] = statistics.median(head)
            result["head_saved_bytes_per_chunk"] = _head_saved_bytes(model, hidden, targets)
            result["saved_bytes"] = _saved_bytes(model, ids, checkpointing=False)
            result["saved_bytes_checkpointed"] = _saved_bytes(model, ids, checkpointing=True)
        if world == 2:
            # Point-to-point time of one layer's memory hand-off (global state + memory + temporary memory).
            cfg = model.config
            numel = (2 * cfg.global_mem_size + cfg.temp_slots) * spec["hidden"]
            buf = torch.zeros(numel)
            msg = []
            for _ in range(20):
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                msg.append((time.perf_counter() - t0) / 2)
            result["message_s"] = statistics.median(msg)
            result["message_bytes"] = numel * 4
        if rank == 0:
            Path(out_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure(spec: dict, world: int, tmp: Path) -> dict:
    out = tmp / f"p{world}.json"
    mp.start_processes(_worker, args=(world, _free_port(), spec, str(out)), nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


def window_tokens(spec: dict) -> int:
    """Tokens one chunk runs through a layer: memory slots, text, beacons, readouts."""
    beacons = spec["chunk_size"] // spec["stride"] if spec["stride"] > 0 else 0
    temp_slots = spec["temp_budget"] if spec["stride"] > 0 else 0
    return spec["global_mem"] + temp_slots + spec["chunk_size"] + beacons + spec["global_mem"]


def memory_message_bytes(hidden: int, global_mem: int, temp_budget: int, batch: int, bytes_per: int) -> int:
    """One layer's memory hand-off between neighbouring ranks (global state, injected global memory, temporary)."""
    return batch * (2 * global_mem + temp_budget) * hidden * bytes_per


def model_step(L: int, N: int, P: int, t_cell: float, t_head: float, t_msg: float, t_allreduce: float) -> float:
    """Wavefront step time: L + P − 1 stages of N/P chunk-layer cells, a message per stage each way."""
    per_rank = -(-N // P)
    return (L + P - 1) * per_rank * t_cell + per_rank * t_head + (2 * (L + P - 1) * t_msg if P > 1 else 0.0) + t_allreduce


# Qwen3-4B-shaped model for the docs' estimate (hidden 2560, 36 layers, MLP 9728, vocab 151936, ~4.0B parameters),
# with the authors' CoMeT configuration (chunk 2048, 512 global slots, beacon every 8, temporary budget 2048).
FOUR_B = dict(params=4.02e9, hidden=2560, layers=36, intermediate=9728, vocab=151936, chunk_size=2048, global_mem=512,
              stride=8, temp_budget=2048)


def four_b_estimate(saved_per_token_layer_hidden: float, gpu: dict | None = None) -> dict:
    """Memory per rank (and, with a GPU measurement, step time) of a 4B CoMeT at 128k tokens, bf16.

    With ``gpu`` (the output of `benchmarks.pipeline_memory_4b`, measured on that model): its bytes per chunk held,
    transient and weights, and its seconds per chunk. Without: the (2·window + 2G + T)·d formula checked on the small
    model here, and a transient from this CPU's per-token coefficient.
    """
    s = FOUR_B
    window = window_tokens(s)
    N = 128 * 1024 // s["chunk_size"]
    logits = 2 * s["chunk_size"] * s["vocab"] * 4
    if gpu is not None:
        per_chunk = gpu["checkpointed_bytes_per_chunk"]
        per_chunk_plain = gpu["plain_bytes_per_chunk"]
        transient = max(gpu["checkpointed_transient_bytes"], 0.0)
        frozen_weights = gpu["weights_bytes"]
        runs = [r for r in gpu["runs"] if r["checkpointing"]]
        longest = max(runs, key=lambda r: r["chunks"])
        seconds_per_chunk = longest["seconds"] / longest["chunks"]
        source = (f"measured on {gpu['gpu']} (benchmarks.pipeline_memory_4b: base frozen, memory trained, "
                  f"activation checkpointing; peak CUDA memory against chunks held)")
    else:
        per_chunk = s["layers"] * (2 * window + 2 * s["global_mem"] + s["temp_budget"]) * s["hidden"] * 2
        per_chunk_plain = s["layers"] * window * s["hidden"] * saved_per_token_layer_hidden * 0.5
        transient = window * s["hidden"] * saved_per_token_layer_hidden * 0.5 + logits
        frozen_weights = s["params"] * 2
        seconds_per_chunk = None
        source = "formula (2*window + 2G + T)*d*2 bytes per layer and chunk, checked on the small CPU model"
    rows = []
    for finetuning, weights in (("lora", frozen_weights), ("full", s["params"] * 16.0)):
        for P in (1, 2, 4, 8, 16):
            held = -(-N // P)
            message = memory_message_bytes(s["hidden"], s["global_mem"], s["temp_budget"], 1, 2)
            row = dict(finetuning=finetuning, P=P, chunks_per_rank=held,
                       memory_bytes_sent_per_rank_per_step=2 * s["layers"] * message if P > 1 else 0,
                       gradient_bytes_allreduced=s["params"] * 4 if finetuning == "full" else 0,
                       weights_optimizer_gib=weights / 2**30,
                       activations_checkpointed_gib=(held * per_chunk + transient) / 2**30,
                       activations_plain_gib=held * per_chunk_plain / 2**30,
                       total_checkpointed_gib=(weights + held * per_chunk + transient) / 2**30)
            if seconds_per_chunk is not None and finetuning == "lora":
                # The wavefront: L + P − 1 stages of held chunks, each a layer's share (1/L) of a chunk's time.
                row["step_seconds_checkpointed"] = (s["layers"] + P - 1) / s["layers"] * held * seconds_per_chunk
            rows.append(row)
    return {"model": FOUR_B, "source": source, "bytes_per_chunk_checkpointed": per_chunk,
            "bytes_per_chunk_plain": per_chunk_plain, "transient_bytes": transient,
            "seconds_per_chunk_checkpointed": seconds_per_chunk,
            "note": "bf16; one 128k-token sample per pipeline (64 chunks of 2048); lora: frozen bf16 weights (adapters "
                    "negligible); full: 16 bytes/param (bf16 weights + fp32 master, AdamW moments, gradients) held "
                    "whole on every pipeline rank; step time (lora rows, GPU source only): memory-only training "
                    "(no weight gradients for the base), interconnect time left out (15.7 MB per hand-off)",
            "rows": rows}


def load_gpu(out: Path) -> dict | None:
    """The 4B GPU measurement (`benchmarks.pipeline_memory_4b`) beside the results, if it was made."""
    path = out / "four_b_gpu.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=16, help="chunks in the measured sample")
    parser.add_argument("--global-mem", type=int, default=16)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--temp-budget", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--remodel", action="store_true",
                        help="measure nothing: recompute the 4B estimate of an existing JSON (e.g. after a GPU run)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if not args.remodel:  # (--remodel updates the estimate in an existing result on purpose)
        refuse_to_replace(args.out / "pipeline_scaling.json", overwrite=args.overwrite, option="--out")
    if args.remodel:
        payload = json.loads((args.out / "pipeline_scaling.json").read_text())
        coef = payload["measured"]["saved_bytes_per_window_token_layer_hidden"]
        payload["modelled"]["four_b_128k"] = four_b_estimate(coef, load_gpu(args.out))
        atomic_write_json(args.out / "pipeline_scaling.json", payload)
        plot(payload, args.out / "pipeline_scaling.png")
        return payload
    spec = dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                kv_heads=args.kv_heads, vocab=args.vocab, chunk_size=args.chunk_size, chunks=args.chunks,
                global_mem=args.global_mem, stride=args.stride, temp_budget=args.temp_budget, repeats=args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    p1 = measure(spec, 1, args.out)
    p2 = measure(spec, 2, args.out)
    load_after = os.getloadavg()
    for f in ("p1.json", "p2.json"):
        (args.out / f).unlink(missing_ok=True)

    L, N = spec["layers"], spec["chunks"]
    t_head = p1["head_per_chunk_s"]
    t_cell = (p1["forward"] + p1["backward"] - N * t_head) / (L * N)
    t_msg, msg_bytes = p2["message_s"], p2["message_bytes"]
    n_params = sum(p.numel() for p in build_model(spec).parameters())
    window = window_tokens(spec)
    head_saved = N * p1["head_saved_bytes_per_chunk"]  # the LM head's share, not a layer's
    saved_cell = max(p1["saved_bytes"] - head_saved, 0) / (L * N)
    saved_cell_ckpt = max(p1["saved_bytes_checkpointed"] - head_saved, 0) / (L * N)
    memory_floats = 2 * spec["global_mem"] + (spec["temp_budget"] if spec["stride"] > 0 else 0)
    # Layer input and output (the fold reads the beacon/readout rows as views of the output, which keeps all of it)
    # plus the memory the layer folds, fp32.
    ckpt_formula = (2 * window + memory_floats) * spec["hidden"] * 4
    # Per token of the window, per layer, per hidden unit, in fp32 bytes (the 4B estimate scales these to bf16).
    coef_plain = saved_cell / (window * spec["hidden"])
    coef_ckpt = saved_cell_ckpt / (window * spec["hidden"])
    measured = {
        "step_seconds": {"1": p1["step"], "2": p2["step"]},
        "step_seconds_all_repeats": {"1": p1["step_all"], "2": p2["step_all"]},
        "forward_seconds": {"1": p1["forward"], "2": p2["forward"]},
        "backward_seconds": {"1": p1["backward"], "2": p2["backward"]},
        "allreduce_seconds": {"1": p1["allreduce"], "2": p2["allreduce"]},
        "allreduce_collectives": {"1": p1["buckets"], "2": p2["buckets"]},
        "speedup_2": p1["step"] / p2["step"],
        "speedup_2_best_of_repeats": p1["step_min"] / p2["step_min"],
        "busiest_rank_cpu_seconds": {"1": p1["cpu"], "2": p2["cpu"]},
        "cpu_speedup_2": p1["cpu"] / p2["cpu"],
        "ideal_speedup_2": 2 * L / (L + 1),
        "head_seconds_per_chunk": t_head,
        "cell_seconds_per_layer_chunk": t_cell,
        "memory_message_bytes": msg_bytes,
        "memory_message_seconds": t_msg,
        "saved_bytes_per_layer_chunk": saved_cell,
        "saved_bytes_per_layer_chunk_checkpointed": saved_cell_ckpt,
        "saved_bytes_per_layer_chunk_checkpointed_formula": ckpt_formula,
        "head_saved_bytes_per_chunk": p1["head_saved_bytes_per_chunk"],
        "saved_bytes_per_window_token_layer_hidden": coef_plain,
        "saved_bytes_per_window_token_layer_hidden_checkpointed": coef_ckpt,
        "load_average_before_after": [load_before, load_after],
    }
    grad_bytes = n_params * 4
    ring_seconds_per_byte = t_msg / msg_bytes  # point-to-point rate measured above (latency folded in)
    modelled = []
    for tokens in (131072, 262144, 524288, 1048576):
        n = tokens // spec["chunk_size"]
        t1 = model_step(L, n, 1, t_cell, t_head, t_msg, 0.0)
        for P in (1, 2, 4, 8, 16):
            allreduce = 2 * (P - 1) / P * grad_bytes * ring_seconds_per_byte if P > 1 else 0.0
            tp = model_step(L, n, P, t_cell, t_head, t_msg, allreduce)
            modelled.append(dict(
                tokens=tokens, P=P, chunks=n, step_seconds=tp, speedup=t1 / tp, ideal_speedup=P * L / (L + P - 1),
                bytes_sent_per_rank_memory=(2 * L * msg_bytes if P > 1 else 0),
                bytes_sent_per_rank_allreduce=(2 * (P - 1) / P * grad_bytes if P > 1 else 0),
                saved_bytes_per_rank=-(-n // P) * L * saved_cell,
                saved_bytes_per_rank_checkpointed=-(-n // P) * L * saved_cell_ckpt,
            ))
    payload = {
        "what": "one full fine-tuning training step (forward + backward + bucketed gradient all-reduce) of one sample, "
                "layer-wavefront pipeline over P gloo ranks on this CPU, one thread per rank",
        "model": {**spec, "parameters": n_params, "window_tokens": window},
        "machine": {"cpus": os.cpu_count(), "note": "shared 2-core machine with other jobs running: P=2 ranks "
                    "compete with them for the cores, so the measured speed-up understates a dedicated machine's"},
        "measured": measured,
        "modelled": {
            "note": "from the measured t_cell, t_head, message time and saved bytes of this small model: "
                    "T(P) = (L+P-1)*ceil(N/P)*t_cell + ceil(N/P)*t_head + 2*(L+P-1)*t_msg + ring all-reduce; "
                    "memory = ceil(N/P)*L*saved bytes per layer and chunk",
            "points": modelled,
            "four_b_128k": four_b_estimate(coef_plain, load_gpu(args.out)),
        },
    }
    atomic_write_json(args.out / "pipeline_scaling.json", payload)
    plot(payload, args.out / "pipeline_scaling.png")
    print(json.dumps({"step_seconds": measured["step_seconds"], "speedup_2": round(measured["speedup_2"], 3),
                      "ideal_speedup_2": round(measured["ideal_speedup_2"], 3)}))
    return payload


def plot(payload: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    L = payload["model"]["layers"]
    ps = [1, 2, 4, 8, 16]
    ax1.plot(ps, [p * L / (L + p - 1) for p in ps], "k--", label=f"ideal P·L/(L+P−1), L={L}")
    for tokens in (131072, 1048576):
        pts = [q for q in payload["modelled"]["points"] if q["tokens"] == tokens]
        ax1.plot([q["P"] for q in pts], [q["speedup"] for q in pts], "o-", label=f"modelled, {tokens // 1024}k tokens")
    m = payload["measured"]
    ax1.plot([1, 2], [1.0, m["speedup_2"]], "s", color="red", markersize=9,
             label=f"measured wall time, {payload['model']['chunks'] * payload['model']['chunk_size']} tokens (loaded CPU)")
    if "cpu_speedup_2" in m:
        ax1.plot([2], [m["cpu_speedup_2"]], "D", color="purple", markersize=7, label="measured busiest-rank CPU time")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(ps, [str(p) for p in ps])
    ax1.set_xlabel("pipeline ranks P")
    ax1.set_ylabel("speed-up over P = 1")
    ax1.set_title("Training step, layer wavefront")
    ax1.legend(fontsize=8)
    for tokens in (131072, 1048576):
        pts = [q for q in payload["modelled"]["points"] if q["tokens"] == tokens]
        ax2.plot([q["P"] for q in pts], [q["saved_bytes_per_rank"] / 2**20 for q in pts], "o-",
                 label=f"{tokens // 1024}k, no checkpointing")
        ax2.plot([q["P"] for q in pts], [q["saved_bytes_per_rank_checkpointed"] / 2**20 for q in pts], "^--",
                 label=f"{tokens // 1024}k, activation checkpointing")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(ps, [str(p) for p in ps])
    ax2.set_yscale("log")
    ax2.set_xlabel("pipeline ranks P")
    ax2.set_ylabel("activations saved per rank (MiB)")
    ax2.set_title(f"Memory per rank (benchmark model, d={payload['model']['hidden']})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)
