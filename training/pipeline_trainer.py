"""Layer-wavefront pipeline parallelism inside `CometTrainer` (DESIGN §1), composed with data parallelism.

    torchrun --nproc_per_node 4 -m training.comet_trainer --pipeline_parallel 2 ...   # P=2 pipeline × D=2 data

The world of W processes is cut into D = W / P pipeline groups of P consecutive ranks (neighbours on one node
share the fastest links). Inside a group every rank holds the whole model and the same batch, and reads one
contiguous block of each sample's chunks (`training.layer_pipeline`): at layer l it receives layer l's memory from
the previous rank, runs its chunks, sends the memory on. Across groups the batches differ, as in ordinary data
parallelism. After the last micro-batch of an optimizer step, one bucketed all-reduce over all W ranks sums the
pipeline shares and averages the data-parallel replicas (sum × 1/D) in the same collective; the model is never
wrapped in DDP. Every process group has the `--ddp_timeout`, so a rank that dies or hangs makes its peers raise
`PipelineCommunicationError` instead of waiting forever.

Evaluation is not pipelined: each rank evaluates its own share of the evaluation set with the plain chunked forward
(constant memory without gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .comet_trainer import CometTrainer
from .layer_pipeline import (
    PipelineCommunicationError,
    all_reduce_gradients,
    all_reduce_loss,
    layer_pipeline_forward,
)
from .recall_data import answer_accuracy


@dataclass
class PipelineGroups:
    """Process groups of a P × D layout: rank = data_rank · P + pipeline_rank."""

    pipeline_parallel: int
    data_parallel: int
    pipeline_rank: int
    data_rank: int
    pipeline_group: object
    data_group: object
    world_group: object

    @classmethod
    def build(cls, pipeline_parallel: int, timeout: timedelta) -> PipelineGroups:
        """Create the groups (a collective call: every rank must call it, in the same order)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"pipeline_parallel={pipeline_parallel} needs torch.distributed: launch with `torchrun "
                f"--nproc_per_node {pipeline_parallel} -m training.comet_trainer ...` or `accelerate launch --config_file "
                f"training/recipes/accelerate_ddp.yaml --num_processes {pipeline_parallel} -m training.comet_trainer ...`"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        P = pipeline_parallel
        if P < 1 or world % P:
            raise ValueError(
                f"pipeline_parallel={P} must divide the number of processes ({world}): launch P × D processes "
                "(P ranks per pipeline, D data-parallel pipelines)"
            )
        D = world // P
        pipeline_group = data_group = None
        for d in range(D):  # every rank creates every group, in the same order
            group = dist.new_group([d * P + p for p in range(P)], timeout=timeout)
            if rank // P == d:
                pipeline_group = group
        for p in range(P):
            group = dist.new_group([d * P + p for d in range(D)], timeout=timeout)
            if rank % P == p:
                data_group = group
        world_group = dist.new_group(list(range(world)), timeout=timeout)
        return cls(P, D, rank % P, rank // P, pipeline_group, data_group, world_group)


class PipelineTrainer(CometTrainer):
    """`CometTrainer` whose training step runs the layer wavefront over `args.pipeline_parallel` ranks.

    Works with LoRA/PEFT, memory-only and full fine-tuning, activation checkpointing (`--gradient_checkpointing`),
    gradient accumulation, mixed precision (autocast), `temp_budget_choices`, `label_weights` and the recall metrics.
    Not with DeepSpeed or FSDP (they shard what every pipeline rank must hold). Args besides `CometTrainer`'s:

        bucket_mb: size of the flat gradient buckets all-reduced after each optimizer step's last micro-batch.
    """

    def __init__(self, *args, bucket_mb: float = 25.0, **kwargs):
        super().__init__(*args, **kwargs)
        P = int(getattr(self.args, "pipeline_parallel", 1))
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("pipeline_parallel > 1 does not combine with DeepSpeed or FSDP: every pipeline rank "
                             "holds the whole model; use plain data parallelism across pipelines")
        self.bucket_mb = bucket_mb
        self.groups = PipelineGroups.build(P, self.args.ddp_timeout_delta)
        self.last_reduce_buckets = 0
        # The pipeline reduces gradients itself: let Accelerate place the model (and add autocast) but not wrap it
        # in DistributedDataParallel, whose per-parameter hooks would reduce over every rank a second time.
        prepare_model = self.accelerator.prepare_model

        def prepare_without_ddp(model, device_placement=None, evaluation_mode=False):
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_without_ddp

    # ------------------------------------------------------------------ data: one batch per pipeline group
    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        shard = getattr(dataloader, "batch_sampler", None)
        if not (hasattr(shard, "num_processes") and hasattr(shard, "process_index")):
            raise ValueError(
                "pipeline_parallel > 1 needs a map-style training dataset (Accelerate's batch sharding), got "
                f"{type(self.train_dataset).__name__}: every rank of a pipeline must read the same batch"
            )
        # Accelerate deals batch i to process i mod W; deal it to pipeline group i mod D instead.
        shard.num_processes = self.groups.data_parallel
        shard.process_index = self.groups.data_rank
        return dataloader

    # ------------------------------------------------------------------ one micro-batch
    def _check_same_batch(self, input_ids: torch.Tensor) -> None:
        """All ranks of a pipeline must hold the same batch; a cheap fingerprint catches a sharding mistake."""
        ids = input_ids.long()
        weights = torch.arange(1, ids.shape[-1] + 1, device=ids.device)
        mine = torch.tensor([ids.shape[0], ids.shape[1], int((ids * weights).sum())], dtype=torch.float64)
        seen = [torch.zeros_like(mine) for _ in range(self.groups.pipeline_parallel)]
        try:
            dist.all_gather(seen, mine, group=self.groups.pipeline_group)
        except RuntimeError as error:
            raise PipelineCommunicationError(f"comparing the batch across the pipeline failed: {error}") from error
        if any(not torch.equal(s, seen[0]) for s in seen):
            raise RuntimeError(
                f"the ranks of pipeline group {self.groups.data_rank} got different batches "
                f"(shape, fingerprint per rank: {[s.tolist() for s in seen]}): they must read the same samples"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain chunked forward, each rank on its own samples
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        spans = inputs.pop("answer_spans", None)
        tail = int(inputs.pop("answer_tail", 0) or 0)
        inputs.pop("distill_mask", None)  # distillation does not run pipelined
        self._check_same_batch(inputs["input_ids"])
        budget = self._temp_budget(inputs["input_ids"])
        if budget is not None:
            self._metrics["temp_budget"].append(budget)
        with self.accelerator.autocast():
            out = layer_pipeline_forward(
                model,
                inputs["input_ids"],
                inputs["labels"],
                self.groups.pipeline_group,
                attention_mask=inputs.get("attention_mask"),
                label_weights=inputs.get("label_weights"),
                temp_budget=budget,
                logits_to_keep=tail if spans and any(spans) else 0,
            )
        if out.logits is not None:
            token_acc, exact = answer_accuracy(out.logits, inputs["input_ids"], spans, tail)
            self._metrics["answer_token_accuracy"].append(token_acc)
            self._metrics["answer_exact"].append(exact)
            if self.curriculum is not None:
                self.curriculum.record(exact)
        return (out.loss, out) if return_outputs else out.loss

    def get_total_train_batch_size(self, args) -> int:
        # The P ranks of a pipeline read one batch between them: only the D pipeline groups add samples.
        return super().get_total_train_batch_size(args) // self.groups.pipeline_parallel

    def _track_num_input_tokens(self, inputs):
        # Trainer sums the tokens of every rank; the P ranks of a pipeline read the same batch, so count it once.
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // self.groups.pipeline_parallel

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            share = self.compute_loss(model, inputs)
        share = share / self.current_gradient_accumulation_steps
        self.accelerator.backward(share)
        if self.accelerator.sync_gradients:  # the optimizer steps after this micro-batch
            self.last_reduce_buckets = all_reduce_gradients(
                model, self.groups.world_group, self.bucket_mb, scale=1.0 / self.groups.data_parallel
            )
        # Log the sample's loss, not this rank's share (Trainer averages it over all ranks).
        return all_reduce_loss(share, self.groups.pipeline_group)


__all__ = ["PipelineGroups", "PipelineTrainer"]
