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
labels=labels).loss`` on one process; its gradients are identical too once all-reduced. The model may
be a `CometForCausalLM` or a PEFT (LoRA) wrapper of one; `training.pipeline_trainer.PipelineTrainer`
runs this inside `transformers.Trainer`, with data parallelism across pipeline groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from modeling_comet import CometForCausalLM, CometMemoryState
from modeling_comet.modeling_comet import _TokenSource


class PipelineCommunicationError(RuntimeError):
    """A send, receive or all-reduce between pipeline ranks failed: a rank died, hung past the timeout, or the
    ranks disagree about the sample."""


def _global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _communicate(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as error:  # gloo/NCCL report a dead peer or a timeout as RuntimeError (DistBackendError)
        raise PipelineCommunicationError(
            f"{what} failed: a pipeline rank died, or did not answer within the process group's timeout "
            f"(--ddp_timeout). Original error: {error}"
        ) from error


class _SendToNext(torch.autograd.Function):
    """Forward: send tensors to global rank ``dst``. Backward: receive their gradients from ``dst``."""

    @staticmethod
    def forward(ctx, dst, group, what, anchor, *tensors):
        ctx.dst, ctx.group, ctx.what = dst, group, what
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        for t in tensors:
            _communicate(f"sending {what} to rank {dst}", dist.send, t.detach().contiguous(), dst, group=group)
        # A zero that joins the loss, so that autograd visits this node in backward.
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        grads = []
        for shape, dtype, device in ctx.shapes:
            g = torch.empty(shape, dtype=dtype, device=device)
            _communicate(f"receiving the gradient of {ctx.what} from rank {ctx.dst}", dist.recv, g, ctx.dst,
                         group=ctx.group)
            grads.append(g)
        return (None, None, None, None, *grads)


class _ReceiveFromPrevious(torch.autograd.Function):
    """Forward: receive tensors from global rank ``src``. Backward: send their gradients back to ``src``."""

    @staticmethod
    def forward(ctx, src, group, what, anchor, *templates):
        ctx.src, ctx.group, ctx.what = src, group, what
        received = []
        for t in templates:
            buf = torch.empty_like(t)
            _communicate(f"receiving {what} from rank {src}", dist.recv, buf, src, group=group)
            received.append(buf)
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        for g in grads:
            _communicate(f"sending the gradient of {ctx.what} to rank {ctx.src}", dist.send, g.contiguous(), ctx.src,
                         group=ctx.group)
        return (None, None, None, None, *[None] * len(grads))


def _layer_tensors(state: CometMemoryState, layer: int, with_temp: bool) -> list[torch.Tensor]:
    tensors = [state.global_state[layer], state.global_memory[layer]]
    return tensors + [state.temp_memory[layer]] if with_temp else tensors


def unwrap_comet(model: torch.nn.Module) -> CometForCausalLM:
    """The `CometForCausalLM` inside ``model`` (itself, a PEFT wrapper's base model, or a DDP/accelerate wrapper's)."""
    seen = model
    for _ in range(4):
        if isinstance(seen, CometForCausalLM):
            return seen
        if hasattr(seen, "get_base_model"):  # peft.PeftModel (LoRA layers are injected in place)
            seen = seen.get_base_model()
        elif hasattr(seen, "module"):  # DistributedDataParallel and friends
            seen = seen.module
        else:
            break
    raise TypeError(f"layer-level pipeline parallelism needs a CometForCausalLM (or a PEFT model of one), got "
                    f"{type(model).__name__}")


def split_chunks(num_chunks: int, ranks: int, length: int, chunk_size: int) -> list[int]:
    """Chunks per pipeline rank: contiguous blocks whose sizes differ by at most one."""
    if num_chunks < ranks:
        raise ValueError(
            f"a sample of {length} tokens is {num_chunks} chunk(s) of chunk_size={chunk_size}, which cannot be split "
            f"over {ranks} pipeline ranks (each rank needs at least one chunk): use samples of at least "
            f"{(ranks - 1) * chunk_size + 1} tokens or a smaller --pipeline_parallel"
        )
    return [num_chunks // ranks + (r < num_chunks % ranks) for r in range(ranks)]


@dataclass
class PipelineOutput:
    """This rank's share of the loss (the shares sum to the sample's loss; carries the gradient) and, when asked,
    the logits of the last ``logits_to_keep`` columns, gathered from the ranks that hold them (no gradient)."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None


def layer_pipeline_forward(
    model,
    input_ids: torch.LongTensor,
    labels: torch.LongTensor,
    group=None,
    *,
    attention_mask: torch.Tensor | None = None,
    label_weights: torch.Tensor | None = None,
    temp_budget: int | None = None,
    logits_to_keep: int = 0,
) -> PipelineOutput:
    """Run this rank's block of chunks of the whole sample with the layer wavefront; see `layer_pipeline_loss`."""
    comet = unwrap_comet(model)
    backbone = comet.model
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config = comet.config
    C, P = config.chunk_size, config.memory_slots
    B, L, dtype, device = backbone._input_shape(input_ids, None)
    if tuple(labels.shape) != (B, L):
        raise ValueError(f"labels must have the input's shape {(B, L)}, got {tuple(labels.shape)}")
    if label_weights is not None and label_weights.shape != labels.shape:
        raise ValueError("label_weights must have the shape of labels")
    if temp_budget is not None and (not config.use_temp_memory or not 0 <= temp_budget <= config.temp_slots):
        raise ValueError(f"temp_budget must lie in [0, {config.temp_slots}] on a model with temporary memory, "
                         f"got {temp_budget}")
    valid = torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None else attention_mask[:, -L:].bool()
    tokens = _TokenSource(backbone.embed_tokens, input_ids, None, valid)
    windows = backbone._windows(L)  # (start, end, stop, emit): see CometModel._windows
    sizes = split_chunks(len(windows), world, L, C)
    first = sum(sizes[:rank])
    mine = windows[first : first + sizes[rank]]

    folded = torch.ones(B, dtype=torch.bool, device=device)
    first_state = CometMemoryState.empty(config, B, dtype, device)
    for _ in range(first):  # the slots valid at this rank's first chunk depend only on its index
        first_state.global_valid, first_state.temp_valid = backbone._fold_validity(first_state, folded, temp_budget)
    hiddens, chunks, states = backbone._layer_major_chunks(
        lambda i, start, stop: tokens.embed(tokens.span(start, stop)), tokens.valid, mine, L, first_state, temp_budget
    )

    # A leaf that requires grad: every receive and send joins the graph and runs in backward on every rank, even
    # where nothing trainable precedes it (memory-only tuning, a last rank without folds), so no peer waits forever.
    anchor = torch.zeros((), device=device, requires_grad=True)
    with_temp = config.use_temp_memory
    previous = _global_rank(group, rank - 1) if rank > 0 else None
    following = _global_rank(group, rank + 1) if rank < world - 1 else None
    tokens_in_loss = []
    for layer in range(config.base_config.num_hidden_layers):
        what = f"layer {layer}'s memory"
        if rank > 0:
            received = _ReceiveFromPrevious.apply(previous, group, what, anchor, *_layer_tensors(states[0], layer, with_temp))
            states[0].global_state[layer], states[0].global_memory[layer] = received[0], received[1]
            if with_temp:
                states[0].temp_memory[layer] = received[2]
            tokens_in_loss.append(sum(r.sum() for r in received) * 0)
        backbone._layer_over_chunks(layer, hiddens, chunks, states, mine, L)
        if rank < world - 1:
            tokens_in_loss.append(_SendToNext.apply(following, group, what, anchor, *_layer_tensors(states[-1], layer, with_temp)))

    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100).masked_fill(~valid, -100)
    shift_weights = None
    if label_weights is not None:
        shift_weights = F.pad(label_weights[:, 1:].float(), (0, 1)).masked_fill(shift_labels == -100, 0.0)
    K = min(int(logits_to_keep), L)
    kept = torch.zeros(B, K + 1, config.base_config.hidden_size, dtype=dtype, device=device) if K else None
    loss_sum = anchor * 0
    for i, (start, _, stop, emit) in enumerate(mine):
        columns, real = tokens.columns(tokens.span(emit, stop)), tokens.valid[:, emit:stop]
        text = backbone.norm(hiddens[i][:, P + emit - start : P + stop - start])
        if kept is not None:
            slot = torch.where(real & (columns >= L - K), columns - (L - K), K)
            kept.scatter_(1, slot[..., None].expand_as(text), text.detach().to(dtype))
        targets = shift_labels.gather(1, columns).masked_fill(~real, -100)
        token_loss = F.cross_entropy(comet.lm_head(text).float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                     reduction="none")
        if shift_weights is not None:
            token_loss = token_loss * shift_weights.gather(1, columns).masked_fill(~real, 0.0).flatten()
        loss_sum = loss_sum + token_loss.sum()
    count = shift_weights.sum() if shift_weights is not None else (shift_labels != -100).sum()
    loss = loss_sum / count.clamp(min=1) + sum(tokens_in_loss, anchor * 0)

    logits = None
    if kept is not None:
        _communicate("gathering the kept logits' hidden states", dist.all_reduce, kept, group=group)
        with torch.no_grad():
            logits = comet.lm_head(kept[:, :K])
    return PipelineOutput(loss=loss, logits=logits)


def layer_pipeline_loss(model, input_ids: torch.LongTensor, labels: torch.LongTensor, group=None, **kwargs) -> torch.Tensor:
    """This rank's share of the sample's mean next-token loss; the shares sum to the single-process loss.

    Every rank of ``group`` passes the same (B, L) ``input_ids`` and ``labels`` (and, optionally, ``attention_mask``
    for padded batches, ``label_weights`` and ``temp_budget`` as `CometForCausalLM.forward` takes them); rank r
    reads one contiguous block of chunks (block sizes differ by at most one). A sample with fewer chunks than ranks
    raises `ValueError`; a rank that dies or stops answering raises `PipelineCommunicationError` on its peers within
    the process group's timeout.
    """
    return layer_pipeline_forward(model, input_ids, labels, group, **kwargs).loss


def _flat_buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        same_kind = buckets and buckets[-1][0].dtype == t.dtype and buckets[-1][0].device == t.device
        if not same_kind or size + t.numel() * t.element_size() > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel() * t.element_size()
    return buckets


def all_reduce_gradients(model: torch.nn.Module, group=None, bucket_mb: float = 25.0, scale: float = 1.0) -> int:
    """Sum every trainable parameter's gradient over ``group``, times ``scale``, in flat buckets of ``bucket_mb``.

    Each pipeline rank computed its chunks' share of the gradient; summing gives the full gradient (``scale =
    1 / data_parallel`` also averages over data-parallel replicas in the same collective). Buckets are flattened
    copies launched asynchronously, so a 135M-parameter model takes a handful of collectives, not one per tensor.
    A parameter without a gradient counts as zero. Returns the number of collectives issued.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets = _flat_buckets([p.grad for p in params], int(bucket_mb * 2**20))
    flats, works = [], []
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        flats.append(flat)
        works.append(_communicate("all-reducing gradients", dist.all_reduce, flat, group=group, async_op=True))
    for bucket, flat, work in zip(buckets, flats, works, strict=True):
        _communicate("all-reducing gradients", work.wait)
        if scale != 1.0:
            flat.mul_(scale)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return len(buckets)


def all_reduce_loss(loss: torch.Tensor, group=None) -> torch.Tensor:
    """The whole sample's loss from the ranks' shares (for logging)."""
    total = loss.detach().clone()
    _communicate("all-reducing the loss", dist.all_reduce, total, group=group)
    return total


__all__ = [
    "PipelineCommunicationError",
    "PipelineOutput",
    "all_reduce_gradients",
    "all_reduce_loss",
    "layer_pipeline_forward",
    "layer_pipeline_loss",
    "split_chunks",
    "unwrap_comet",
]
