"""`PipelineTrainer` (layer wavefront inside `transformers.Trainer`) on CPU gloo ranks against one process.

One spawned session of 2 ranks (P=2) trains one step in three fine-tuning modes, then checks the failure paths (a
sample too short to split, a rank that hangs, a rank that dies); one session of 4 ranks (P=2 × D=2) trains one LoRA
step on every rank. Each rank records the batch it read and its gradients just before the optimizer step; the test
recomputes the same step with the plain model on one process. A last test runs the command line under torchrun.
"""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_comet_model import VOCAB, tiny_comet

LENGTH = 5 * 16 + 7  # six chunks of 16: three per pipeline rank
ROWS = 8
TIMEOUT_S = 5
HANG_TIMEOUT_S = 2  # a rank that hangs: its peer must give up after this
HANG_S = 6  # how long the hung rank stays silent before it dies
# name: (fine-tuning, temp_beacon_stride, activation checkpointing)
MODES = {"full": ("full", 4, False), "lora": ("lora", 4, True), "memory": ("memory", -1, False)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(finetuning: str, stride: int):
    torch.manual_seed(0)
    model = tiny_comet(temp_beacon_stride=stride).train()
    if finetuning == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["comet_memory"],
                          init_lora_weights=False)  # non-zero B, so the LoRA A factors get gradients too
        model = get_peft_model(model, lora)
    elif finetuning == "memory":
        for name, param in model.named_parameters():
            param.requires_grad = "comet_memory." in name
    return model


def dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(3)
    rows = torch.randint(3, VOCAB, (ROWS, LENGTH), generator=g).tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def extras_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (2, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: row 1 is chunked from its own first token
    weights = torch.rand(ids.shape, generator=g)
    return ids, mask, weights


def train_one_step(mode: str, pipeline_parallel: int, out_dir: str) -> dict:
    """One optimizer step with `PipelineTrainer`; returns the batch, the logged loss and the pre-step gradients."""
    from transformers import TrainerCallback, default_data_collator

    from training.comet_config import CometTrainingConfig
    from training.pipeline_trainer import PipelineTrainer

    finetuning, stride, checkpointing = MODES[mode]
    model = make_model(finetuning, stride)
    seen = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    class RecordingTrainer(PipelineTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen["ids"] = inputs["input_ids"].clone()
            seen["loss"] = super().training_step(model, inputs, num_items_in_batch)
            return seen["loss"]

    args = CometTrainingConfig(
        output_dir=out_dir, use_cpu=True, per_device_train_batch_size=2, max_steps=1, learning_rate=1e-3,
        max_grad_norm=0.0, report_to="none", save_strategy="no", disable_tqdm=True, seed=5,
        pipeline_parallel=pipeline_parallel, activation_checkpointing=checkpointing, ddp_timeout=TIMEOUT_S * 6,
        finetuning=finetuning,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset(), data_collator=default_data_collator,
                               callbacks=[Record()])
    assert trainer.model_wrapped is trainer.model  # not wrapped in DDP
    trainer.train()
    assert trainer.model_wrapped is trainer.model
    seen["buckets"] = trainer.last_reduce_buckets
    return seen


def worker(rank, world, port, pipeline_parallel, modes, out_dir, check_failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    results = {mode: train_one_step(mode, pipeline_parallel, os.path.join(out_dir, f"run-{mode}")) for mode in modes}
    if check_failures:
        from training.layer_pipeline import (
            PipelineCommunicationError,
            all_reduce_gradients,
            all_reduce_loss,
            layer_pipeline_forward,
            layer_pipeline_loss,
        )

        if not dist.is_initialized():  # (the trainers above initialise it)
            dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.new_group([0, 1], timeout=timedelta(seconds=TIMEOUT_S))
        hang_group = dist.new_group([0, 1], timeout=timedelta(seconds=HANG_TIMEOUT_S))
        model = make_model("full", 4)
        short = torch.randint(3, VOCAB, (1, 16))  # one chunk for two ranks
        try:
            layer_pipeline_loss(model, short, short, group)
        except ValueError as error:
            results["split_error"] = str(error)
        # Padding, label weights, a temporary-memory budget and kept logits, as recall training uses them.
        ids, mask, weights = extras_batch()
        out = layer_pipeline_forward(model, ids, ids, group, attention_mask=mask, label_weights=weights, temp_budget=4,
                                     logits_to_keep=5)
        out.loss.backward()
        all_reduce_gradients(model, group)
        results["extras"] = {"loss": all_reduce_loss(out.loss, group), "logits": out.logits,
                             "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
        model.zero_grad(set_to_none=True)
        ids = torch.randint(3, VOCAB, (1, LENGTH))
        dist.barrier()
        if rank == 1:
            time.sleep(HANG_S)  # alive but silent (a hung rank) ...
            os._exit(0)  # ... then dies without a word
        silent_since = time.monotonic()
        for case, grp in (("hung_rank", hang_group), ("dead_rank", group)):
            if case == "dead_rank":  # wait until rank 1 has exited
                time.sleep(max(0.0, silent_since + HANG_S + 0.5 - time.monotonic()))
            start = time.monotonic()
            try:
                layer_pipeline_loss(model, ids, ids, grp).backward()
            except PipelineCommunicationError as error:
                results[f"{case}_error"] = str(error)
            results[f"{case}_seconds"] = time.monotonic() - start
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        os._exit(0)  # the group cannot be torn down cleanly without its peer
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def reference(mode: str, batches: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Single-process loss and gradients of one step over data-parallel batches (their mean, as DDP gives)."""
    model = make_model(*MODES[mode][:2])
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss / len(batches)
        loss.backward()
        losses.append(loss.detach() * len(batches))
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()
             if p.requires_grad}
    return torch.stack(losses), grads


def check_against_reference(results: list[dict], mode: str, pipeline_parallel: int) -> None:
    data_parallel = len(results) // pipeline_parallel
    batches = []
    for d in range(data_parallel):
        group = results[d * pipeline_parallel : (d + 1) * pipeline_parallel]
        for r in group:  # every rank of a pipeline read the same batch
            assert torch.equal(r[mode]["ids"], group[0][mode]["ids"])
        batches.append(group[0][mode]["ids"])
    if data_parallel > 1:  # the pipelines read different batches
        assert not torch.equal(batches[0], batches[1])
    losses, expected = reference(mode, batches)
    for d in range(data_parallel):
        for r in results[d * pipeline_parallel : (d + 1) * pipeline_parallel]:
            torch.testing.assert_close(r[mode]["loss"], losses[d], atol=1e-5, rtol=0)
    for rank, r in enumerate(results):
        grads = r[mode]["grads"]
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=f"{mode} rank {rank}: {name}")
    memory_grads = [g for n, g in expected.items() if "comet_memory." in n]
    assert memory_grads and any(g.abs().sum() > 0 for g in memory_grads)
    if mode == "lora":
        lora = [g for n, g in expected.items() if "lora_A" in n]
        assert lora and all(g.abs().sum() > 0 for g in lora)
    assert 1 <= results[0][mode]["buckets"] <= 2  # a bucketed all-reduce, not one collective per tensor


def run_session(world, pipeline_parallel, modes, tmp_path) -> list[dict]:
    mp.start_processes(worker, args=(world, free_port(), pipeline_parallel, modes, str(tmp_path), False), nprocs=world,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2")
    mp.start_processes(worker, args=(2, free_port(), 2, list(MODES), str(tmp), True), nprocs=2, start_method="spawn")
    return [torch.load(tmp / "rank0.pt", weights_only=False)]


@pytest.mark.parametrize("mode", list(MODES))
def test_two_pipeline_ranks_match_single_process(two_ranks, mode):
    results = two_ranks
    # rank 1 left without saving (it is the rank that dies below); its gradients equal rank 0's by construction of
    # the all-reduce, which the four-rank test checks on every rank.
    finetuning, stride, _ = MODES[mode]
    losses, expected = reference(mode, [results[0][mode]["ids"]])
    torch.testing.assert_close(results[0][mode]["loss"], losses[0], atol=1e-5, rtol=0)
    grads = results[0][mode]["grads"]
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=f"{mode}: {name}")
    assert any(g.abs().sum() > 0 for n, g in expected.items() if "comet_memory." in n)
    if finetuning == "lora":
        assert all(g.abs().sum() > 0 for n, g in expected.items() if "lora_A" in n)
    if finetuning == "memory":
        assert all("comet_memory." in n for n in expected)
    assert 1 <= results[0][mode]["buckets"] <= 2  # a bucketed all-reduce, not one collective per tensor


def test_padding_label_weights_temp_budget_and_kept_logits_match_single_process(two_ranks):
    result = two_ranks[0]["extras"]
    model = make_model("full", 4)
    ids, mask, weights = extras_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, label_weights=weights, temp_budget=4, logits_to_keep=5)
    out.loss.backward()
    torch.testing.assert_close(result["loss"], out.loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(result["logits"], out.logits.detach(), atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(result["grads"][name], expected, atol=1e-5, rtol=1e-4, msg=name)


def test_sample_too_short_to_split_is_a_clear_error(two_ranks):
    message = two_ranks[0]["split_error"]
    assert "1 chunk(s)" in message and "2 pipeline ranks" in message and "at least 17 tokens" in message


def test_hung_rank_raises_after_the_timeout(two_ranks):
    result = two_ranks[0]
    assert "hung_rank_error" in result, "a rank stopped answering and its peer did not raise"
    assert "rank 1" in result["hung_rank_error"] and "--ddp_timeout" in result["hung_rank_error"]
    assert "timed out" in result["hung_rank_error"].lower()
    assert HANG_TIMEOUT_S - 0.5 < result["hung_rank_seconds"] < HANG_S  # the timeout, not the rank's exit, ended it


def test_dead_rank_raises_within_the_timeout(two_ranks):
    result = two_ranks[0]
    assert "dead_rank_error" in result, "a rank died and its peer did not raise"
    assert "rank 1" in result["dead_rank_error"] and "--ddp_timeout" in result["dead_rank_error"]
    assert result["dead_rank_seconds"] < TIMEOUT_S


def test_two_pipelines_of_two_ranks_match_single_process(tmp_path):
    results = run_session(4, 2, ["lora"], tmp_path)
    check_against_reference(results, "lora", 2)


def test_command_line_trains_with_pipeline_parallel(tmp_path):
    """`torchrun -m training.comet_trainer --pipeline_parallel 2`: trains, evaluates and saves like the plain run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_convert import save_tiny_base

    base = save_tiny_base(tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{3 + (i * 7) % 90}" for i in range(2000)))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "training.comet_trainer", "--pipeline_parallel", "2",
        "--model_name_or_path", str(base), "--train_files", str(corpus), "--output_dir", str(out),
        "--chunk_size", "16", "--global_mem_size", "4", "--temp_beacon_stride", "4", "--temp_mem_budget", "8",
        "--sample_tokens", "64", "--max_steps", "3", "--per_device_train_batch_size", "2", "--use_cpu",
        "--report_to", "none", "--save_strategy", "no", "--eval_samples", "2", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--ddp_timeout", "60", "--log_level", "info",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("{'eval_loss_before'")]
    assert summary and "eval_loss_after" in summary[0], result.stdout[-2000:]
    # One pipeline of two ranks reads one batch of 2 samples per step: 2, not 2 per rank.
    assert "Total train batch size (w. parallel, distributed & accumulation) = 2\n" in result.stdout + result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert (out / "adapter_model.safetensors").is_file()
