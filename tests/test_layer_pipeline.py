"""Layer-level pipeline parallelism on two CPU processes (gloo) against the single-process model."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_comet_model import random_ids, tiny_comet

LENGTH = 5 * 16 + 7  # six chunks of 16: three per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, stride, fold_delay, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from training.layer_pipeline import all_reduce_gradients, all_reduce_loss, layer_pipeline_loss

        model = tiny_comet(temp_beacon_stride=stride, fold_delay=fold_delay).train()
        ids = random_ids(2, LENGTH)
        loss = layer_pipeline_loss(model, ids, ids)
        loss.backward()
        all_reduce_gradients(model)
        total = all_reduce_loss(loss)
        if rank == 0:
            torch.save({"loss": total, "grads": {n: p.grad for n, p in model.named_parameters()}}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("stride", "fold_delay"), [(4, 0), (-1, 0), (4, 5)])
def test_pipeline_over_two_ranks_matches_single_process(stride, fold_delay, tmp_path):
    model = tiny_comet(temp_beacon_stride=stride, fold_delay=fold_delay).train()
    ids = random_ids(2, LENGTH)
    loss = model(ids, labels=ids).loss
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    out_path = tmp_path / "rank0.pt"
    mp.start_processes(worker, args=(2, free_port(), stride, fold_delay, str(out_path)), nprocs=2, start_method="spawn")
    result = torch.load(out_path)
    torch.testing.assert_close(result["loss"], loss.detach(), atol=1e-5, rtol=0)
    for name, grad in expected.items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    memory_grads = [g for n, g in result["grads"].items() if "comet_memory." in n]
    assert memory_grads and any(g.abs().sum() > 0 for g in memory_grads)
