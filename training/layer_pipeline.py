"""Layer-level pipeline parallelism for CoMeT training (DESIGN §1).

P ranks split one sample's chunks into P contiguous blocks; every rank holds all layers. At layer
l, rank r receives layer l's memory from rank r−1, runs its chunks through layer l, sends layer l's
memory on to rank r+1 and moves to layer l+1: a diagonal wavefront whose ideal speed-up over one
rank is P·L/(L+P−1). Backward mirrors it: the send/receive pairs are autograd functions, so the
gradient of each memory flows back to the rank that produced it.

    loss = layer_pipeline_loss(model, input_ids, labels)   # every rank passes the whole sample
    loss.backward()
    all_reduce_gradients(model)                             # every rank then holds the full gradient
    optimizer.step()

The loss is the mean next-token loss over the whole sample, identical to ``model(input_ids,
labels=labels).loss`` on one process; its gradients are identical too once all-reduced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from modeling_comet import CometForCausalLM, CometMemoryState


class _SendToNext(torch.autograd.Function):
    """Forward: send tensors to ``dst``. Backward: receive their gradients from ``dst``."""

    @staticmethod
    def forward(ctx, dst, group, *tensors):
        ctx.dst, ctx.group = dst, group
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        for t in tensors:
            dist.send(t.detach().contiguous(), dst, group=group)
        # A zero that joins the loss, so that autograd visits this node in backward.
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        grads = []
        for shape, dtype, device in ctx.shapes:
            g = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(g, ctx.dst, group=ctx.group)
            grads.append(g)
        return (None, None, *grads)


class _ReceiveFromPrevious(torch.autograd.Function):
    """Forward: receive tensors from ``src``. Backward: send their gradients back to ``src``."""

    @staticmethod
    def forward(ctx, src, group, anchor, *templates):
        ctx.src, ctx.group = src, group
        received = []
        for t in templates:
            buf = torch.empty_like(t)
            dist.recv(buf, src, group=group)
            received.append(buf)
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        for g in grads:
            dist.send(g.contiguous(), ctx.src, group=ctx.group)
        return (None, None, None, *[None] * len(grads))


def _layer_tensors(state: CometMemoryState, layer: int, with_temp: bool) -> list[torch.Tensor]:
    tensors = [state.global_state[layer], state.global_memory[layer]]
    return tensors + [state.temp_memory[layer]] if with_temp else tensors


def layer_pipeline_loss(
    model: CometForCausalLM, input_ids: torch.LongTensor, labels: torch.LongTensor, group=None
) -> torch.Tensor:
    """This rank's share of the sample's mean next-token loss; the shares sum to the single-process loss.

    Every rank passes the same (B, L) ``input_ids`` and ``labels``; rank r reads chunks
    one contiguous block of chunks (block sizes differ by at most one). Sequences must have no padding.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config = model.config
    C, P = config.chunk_size, config.memory_slots
    B, L = input_ids.shape
    bounds = [(s, min(s + C, L)) for s in range(0, L, C)]
    if len(bounds) < world:
        raise ValueError(f"{len(bounds)} chunks cannot be split over {world} pipeline ranks")
    sizes = [len(bounds) // world + (r < len(bounds) % world) for r in range(world)]
    first = sum(sizes[:rank])
    mine = bounds[first : first + sizes[rank]]

    backbone = model.model
    device, dtype = input_ids.device, backbone.embed_tokens.weight.dtype
    all_valid = torch.ones(B, L, dtype=torch.bool, device=device)
    folded = torch.ones(B, dtype=torch.bool, device=device)
    first_state = CometMemoryState.empty(config, B, dtype, device)
    for _ in range(first):  # the slots valid at this rank's first chunk depend only on its index
        first_state.global_valid, first_state.temp_valid = backbone._fold_validity(first_state, folded)
    hiddens, chunks, states = backbone._layer_major_chunks(
        lambda i, start, end: backbone.embed_tokens(input_ids[:, start:end]), all_valid, mine, L, first_state
    )

    with_temp = config.use_temp_memory
    anchor = hiddens[0].sum() * 0  # gives the receive node a place in the graph
    tokens = []
    for layer in range(config.base_config.num_hidden_layers):
        if rank > 0:
            received = _ReceiveFromPrevious.apply(rank - 1, group, anchor, *_layer_tensors(states[0], layer, with_temp))
            states[0].global_state[layer], states[0].global_memory[layer] = received[0], received[1]
            if with_temp:
                states[0].temp_memory[layer] = received[2]
        backbone._layer_over_chunks(layer, hiddens, chunks, states, mine, L)
        if rank < world - 1:
            tokens.append(_SendToNext.apply(rank + 1, group, *_layer_tensors(states[-1], layer, with_temp)))

    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    loss_sum = anchor.new_zeros(())
    for i, (start, end) in enumerate(mine):
        text = backbone.norm(hiddens[i][:, P : P + end - start])
        logits = model.lm_head(text).float()
        loss_sum = loss_sum + F.cross_entropy(logits.flatten(0, 1), shifted[:, start:end].flatten(), ignore_index=-100,
                                              reduction="sum")
    count = (shifted != -100).sum().clamp(min=1)
    return loss_sum / count + sum(tokens, anchor.new_zeros(()))


def all_reduce_gradients(model: torch.nn.Module, group=None) -> None:
    """Sum every parameter's gradient over the pipeline ranks (each rank computed its chunks' share)."""
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)


def all_reduce_loss(loss: torch.Tensor, group=None) -> torch.Tensor:
    """The whole sample's loss from the ranks' shares (for logging)."""
    total = loss.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


__all__ = ["all_reduce_gradients", "all_reduce_loss", "layer_pipeline_loss"]
