"""Fine-tune a CoMeT model: language modelling over long samples, or recall training that teaches the memory.

    python -m training.comet_trainer --output_dir runs/comet --max_steps 200 --sample_tokens 1536
    python -m training.comet_trainer --config training/recipes/smollm2_recall.yaml   # flags override the file

The trainer is a `transformers.Trainer` that calls the CoMeT model's own chunked forward (TRL's
SFTTrainer would patch the forward with a fused LM head and the memory would get no gradient), with
the memory parameters in their own optimizer group at `memory_lr_multiplier` times the learning rate.
Gradients flow through the memories across every chunk of a sample (full BPTT).

Recall tasks (`--task passkey|associative|mixed`, see `training.recall_data`) plant facts in prose at a
distance in chunks that a curriculum raises, label the answers (plus, optionally, the text at a lower
weight), sample a temporary-memory budget per batch (`--temp_budget_choices 0,16,32,64`) so that the
global memory must carry the facts, and log the answers' token and exact-match accuracy.

A run never overwrites the checkpoints of an earlier one: rerun with `--resume_from_checkpoint latest`
(or a checkpoint folder) to continue exactly where it stopped, including the curriculum stage.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from modeling_comet import CometForCausalLM

from .comet_config import CometTrainingConfig
from .lm_data import iter_texts, lm_datasets, pack_dataset
from .recall_data import (
    FillerStream,
    MixedFiller,
    RecallCollator,
    RecallCurriculum,
    RecallSampleBuilder,
    RepeatedFiller,
    answer_accuracy,
    recall_dataset,
)

MEMORY_PREFIX = "comet_memory."


def load_texts(config: CometTrainingConfig) -> list[str]:
    """Training text as a list: local files, a `datasets` source, or the standard library's prose (always present).

    Reads the whole source into memory; training itself streams through `training.lm_data`."""
    return list(iter_texts(config))


def pack_samples(texts: list[str], tokenizer, sample_tokens: int) -> Dataset:
    """Concatenate the tokenised texts (each followed by EOS) and cut them into samples of exactly
    `sample_tokens` tokens (`training.lm_data.pack_dataset` on an in-memory dataset)."""
    return pack_dataset(Dataset.from_dict({"text": list(texts)}), tokenizer, sample_tokens)


def build_model(config: CometTrainingConfig):
    from convert.smollm2 import smollm2_path

    source = config.model_name_or_path or str(smollm2_path())
    loaded = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=config.trust_remote_code, dtype=torch.float32)
    if isinstance(loaded, CometForCausalLM) or getattr(loaded.config, "model_type", None) == "comet":
        model = loaded
    else:
        model = CometForCausalLM.from_base(
            loaded,
            chunk_size=config.chunk_size,
            global_mem_size=config.global_mem_size,
            temp_beacon_stride=config.temp_beacon_stride,
            temp_mem_budget=config.temp_mem_budget,
            global_write=config.global_write,
            temp_write=config.temp_write,
            fold_delay=config.fold_delay,
        )
    if config.window_select_weight and model.config.global_write != "window":
        raise ValueError("window_select_weight supervises the window choice of a model with global_write='window'; "
                         f"this model writes with {model.config.global_write!r}")
    continue_lora = False
    if config.init_trained_weights:
        from convert.trained_weights import apply_trained_weights, lora_modules, read_metadata

        # LoRA factors continue training in the new adapter when it has their rank, alpha and target modules;
        # otherwise they are merged into the base.
        lora = read_metadata(config.init_trained_weights).get("lora")
        continue_lora = (
            config.finetuning == "lora"
            and lora == {"r": config.lora_r, "alpha": config.lora_alpha}
            and lora_modules(config.init_trained_weights) <= set(config.lora_target_modules.split(","))
        )
        # The temporary memory's parameters are the same whatever it keeps: a tail run may start from beacon weights.
        apply_trained_weights(model, config.init_trained_weights, merge_lora=not continue_lora,
                              adapt_fields=("temp_write",))
    if config.finetuning == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            target_modules=config.lora_target_modules.split(","),
            modules_to_save=["comet_memory"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if continue_lora:
            from convert.trained_weights import load_lora_factors

            load_lora_factors(model, config.init_trained_weights)
    elif config.finetuning == "memory":
        for name, param in model.named_parameters():
            param.requires_grad = MEMORY_PREFIX in name
    if config.freeze_memory_modules:
        freeze_memory_modules(model, config.freeze_memory_modules.split(","))
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    return model, tokenizer


def freeze_memory_modules(model, names: list[str]) -> list[str]:
    """Stop training the memory modules called ``names`` (e.g. ``temp_adapter``) in every layer; returns the frozen
    parameters' names. PEFT's trainable copies (`modules_to_save`) are frozen too."""
    names = [n.strip() for n in names if n.strip()]
    frozen, seen = [], set()
    for name, param in model.named_parameters():
        if MEMORY_PREFIX not in name:
            continue
        parts = name.split(".")
        hit = [n for n in names if n in parts]
        if hit:
            param.requires_grad = False
            frozen.append(name)
            seen.update(hit)
    if missing := [n for n in names if n not in seen]:
        raise ValueError(f"--freeze_memory_modules names no memory module called {missing}")
    return frozen


def build_teacher(config: CometTrainingConfig):
    """The frozen full-attention teacher of context distillation (`--distill_weight`, `--distill_hidden_weight`)."""
    from convert.smollm2 import smollm2_path

    source = config.distill_teacher
    if source is None:
        if config.model_name_or_path is not None and _is_comet_source(config.model_name_or_path, config):
            raise ValueError(
                f"{config.model_name_or_path} is a saved CoMeT model: name the full-attention teacher of context "
                "distillation with --distill_teacher (e.g. the base model it was built on)"
            )
        source = config.model_name_or_path or str(smollm2_path())
    teacher = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=config.trust_remote_code, dtype=torch.float32)
    if getattr(teacher.config, "model_type", None) == "comet":
        raise ValueError(f"--distill_teacher {source} is a CoMeT model; the teacher must read with full attention")
    teacher.requires_grad_(False)
    return teacher.eval()


def _is_comet_source(source: str, config: CometTrainingConfig) -> bool:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code).model_type == "comet"


def distillation_losses(student, teacher, inputs: dict, chunk_size: int, hidden: bool, keep: int = 1,
                        token_mask: torch.Tensor | None = None, **student_kwargs):
    """(student outputs, KL(teacher ‖ student) per token, mean per-layer hidden-state cosine distance) over every
    text token after a sample's first chunk: the part where the student depends on its memory (its first chunk
    reads like the base model). Rows may be left-padded (``attention_mask``); each is chunked from its first token.
    ``token_mask`` (B, L), where given, leaves out the tokens where it is 0 (a recall sample's repetitive filler).

    The student keeps logits from the first such column (or from the last ``keep`` columns, if that starts
    earlier) to the end; its loss (``labels`` in ``student_kwargs``) is computed as usual."""
    input_ids = inputs["input_ids"]
    B, L = input_ids.shape
    mask = inputs.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    position = real.long().cumsum(-1) - 1  # each row's own token index
    after_first_chunk = real & (position >= chunk_size)
    if not after_first_chunk.any():
        raise ValueError(f"distillation needs samples longer than one chunk ({chunk_size} tokens)")
    first = min(int(after_first_chunk.float().argmax(-1).min()), L - max(keep, 1))
    max_positions = getattr(teacher.config, "max_position_embeddings", None)
    if max_positions is not None and int(real.sum(-1).max()) > max_positions:
        raise ValueError(f"distillation samples of {int(real.sum(-1).max())} tokens exceed the teacher's "
                         f"{max_positions} positions")
    columns = torch.arange(first, L, device=input_ids.device)
    out = student(input_ids=input_ids, attention_mask=mask, logits_to_keep=columns, output_hidden_states=hidden,
                  **student_kwargs)
    with torch.no_grad():
        ref = teacher(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden, logits_to_keep=L - first)
    scored = after_first_chunk if token_mask is None else after_first_chunk & token_mask.bool()
    weight = scored[:, first:].float()
    count = weight.sum().clamp_min(1.0)
    log_student = torch.log_softmax(out.logits.float(), dim=-1)
    log_teacher = torch.log_softmax(ref.logits.float(), dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    kl = (kl * weight).sum() / count
    cosine = torch.zeros((), device=kl.device)
    if hidden:
        pairs = list(zip(out.hidden_states[1:], ref.hidden_states[1:], strict=True))
        for mine, theirs in pairs:
            similarity = F.cosine_similarity(mine[:, first:L].float(), theirs[:, first:L].float(), dim=-1)
            cosine = cosine + ((1 - similarity) * weight).sum() / count
        cosine = cosine / len(pairs)
    return out, kl, cosine


def window_targets(input_ids: torch.Tensor, attention_mask, spans, chunk_size: int, size: int) -> list[tuple]:
    """(row, chunk, window) targets of the window choice (`global_write="window"`): for each answer of each row, the
    window of ``size`` tokens that ends with the answer's last token where the answer first occurs before the
    question, in the row's own chunk numbering (rows are left-padded; each is chunked from its first real token).
    Answers found nowhere earlier, or too close to their chunk's start for a whole window, give no target.

    >>> window_targets(torch.tensor([[0, 7, 8, 9, 5, 6, 7, 8, 9, 4, 7, 8, 9]]), None, [[(10, 13)]], 4, 2)
    [(0, 0, 2)]
    >>> window_targets(torch.tensor([[0, 0, 5, 7, 8, 9, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]]),
    ...                [[(6, 9)]], 2, 2)
    [(0, 1, 0)]
    """
    targets = []
    for row, row_spans in enumerate(spans):
        ids = input_ids[row].tolist()
        pad = 0 if attention_mask is None else int((attention_mask[row] == 0).sum())
        for start, end in row_spans:
            answer = ids[start:end]
            for at in range(pad, start - len(answer) + 1):
                if ids[at : at + len(answer)] == answer:
                    chunk, offset = divmod(at + len(answer) - 1 - pad, chunk_size)
                    if offset >= size - 1:
                        targets.append((row, chunk, offset - (size - 1)))
                    break
    return targets


def _comet_backbone(model):
    """The `CometModel` inside a CoMeT model, PEFT- or DistributedDataParallel-wrapped or not."""
    model = getattr(model, "module", model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


def comet_config_of(model) -> object:
    """The `CometConfig` of a CoMeT model, PEFT- or DistributedDataParallel-wrapped or not."""
    model = getattr(model, "module", model)  # DDP keeps the model as `.module`
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "comet":
        config = model.get_base_model().config
    return config


def build_recall_data(config: CometTrainingConfig, tokenizer, chunk_size: int):
    """(train dataset, collator, curriculum) of a recall task."""
    filler = FillerStream.from_texts(iter_texts(config), tokenizer, max_tokens=config.filler_tokens)
    if config.repeat_filler_fraction:
        filler = MixedFiller(filler, RepeatedFiller.from_tokenizer(tokenizer), config.repeat_filler_fraction)
    builder = RecallSampleBuilder(
        tokenizer,
        filler,
        chunk_size=chunk_size,
        task=config.task,
        num_chunks=config.recall_chunk_range,
        lead_chunks=config.recall_lead_range,
        key_digits=config.key_digits,
        num_keys=config.num_keys,
        num_queries=config.num_queries,
        boundary_fraction=config.boundary_fraction,
        lm_fraction=config.lm_fraction,
        lm_loss_weight=config.lm_loss_weight,
    )
    curriculum = RecallCurriculum(
        config.curriculum_distance_list,
        mode=config.curriculum,
        stage_steps=config.curriculum_stage_steps,
        threshold=config.curriculum_threshold,
        window=config.curriculum_window,
        min_distance=config.min_distance,
    )
    data = recall_dataset(builder, curriculum, config.recall_rows, seed=config.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return data, RecallCollator(pad_token_id=pad if pad is not None else 0), curriculum


class TimeBudget(TrainerCallback):
    """Ends training, with a checkpoint, once `minutes` of wall-clock time have passed since `train()` began."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.monotonic() - self.start >= self.seconds:
            print(f"time budget of {self.seconds / 60:g} min spent at step {state.global_step}: saving and stopping")
            control.should_training_stop = True
            control.should_save = True
        return control


class CometTrainer(Trainer):
    """`Trainer` that runs CoMeT's own forward and trains the memory at a higher learning rate.

    Args (besides `Trainer`'s):
        curriculum: a `RecallCurriculum` fed with each batch's answer accuracy; its stage is saved in checkpoints.
        temp_budget_choices: temporary-memory budgets, one sampled per batch (reproducibly from the step).
    """

    def __init__(
        self,
        *args,
        curriculum: RecallCurriculum | None = None,
        temp_budget_choices=(),
        teacher=None,
        distill_weight: float = 0.0,
        distill_hidden_weight: float = 0.0,
        window_select_weight: float = 0.0,
        **kwargs,
    ):
        if curriculum is not None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), curriculum]
        super().__init__(*args, **kwargs)
        self.curriculum = curriculum
        self.temp_budget_choices = list(temp_budget_choices)
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.distill_hidden_weight = distill_hidden_weight
        self.window_select_weight = window_select_weight
        if teacher is not None:
            teacher.to(self.args.device)
        # The loss is normalised per batch by CoMeT's forward; let Trainer average over accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            memory, other = [], []
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    (memory if MEMORY_PREFIX in name else other).append(param)
            lr = self.args.learning_rate
            groups = [
                {"params": other, "lr": lr, "weight_decay": self.args.weight_decay},
                {"params": memory, "lr": lr * self.args.memory_lr_multiplier, "weight_decay": 0.0},
            ]
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def _temp_budget(self, input_ids: torch.Tensor) -> int | None:
        if not self.temp_budget_choices:
            return None
        rng = random.Random(f"{self.args.seed}/{self.state.global_step}/{int(input_ids.sum())}")
        return rng.choice(self.temp_budget_choices)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spans = inputs.pop("answer_spans", None)
        tail = inputs.pop("answer_tail", 0)
        distill_mask = inputs.pop("distill_mask", None)
        kwargs = {}
        if "label_weights" in inputs:
            kwargs["label_weights"] = inputs["label_weights"]
        if model.training and (budget := self._temp_budget(inputs["input_ids"])) is not None:
            kwargs["temp_budget"] = budget
            self._metrics["temp_budget"].append(budget)
        config = comet_config_of(model)
        chunk_size = config.chunk_size
        backbone = None
        if self.window_select_weight and model.training and spans and any(spans):
            backbone = _comet_backbone(model)
            backbone.record_window_scores, backbone.window_scores = True, []
        if self.teacher is not None and model.training and inputs["input_ids"].shape[1] > chunk_size:
            outputs, kl, cosine = distillation_losses(
                model, self.teacher, inputs, chunk_size, self.distill_hidden_weight > 0, keep=int(tail),
                token_mask=distill_mask, labels=inputs["labels"], **kwargs
            )
            loss = outputs.loss + self.distill_weight * kl + self.distill_hidden_weight * cosine
            self._metrics["distill_kl"].append(float(kl.detach()))
            if self.distill_hidden_weight > 0:
                self._metrics["distill_hidden"].append(float(cosine.detach()))
            answer_logits = outputs.logits[:, outputs.logits.shape[1] - max(int(tail), 1) :]
        else:
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                labels=inputs["labels"],
                logits_to_keep=max(int(tail), 1),
                **kwargs,
            )
            loss, answer_logits = outputs.loss, outputs.logits
        if backbone is not None:
            scores, backbone.record_window_scores, backbone.window_scores = backbone.window_scores, False, []
            loss = loss + self.window_select_weight * self._window_select_loss(scores, inputs, spans, config)
        if spans and any(spans):
            token_acc, exact = answer_accuracy(answer_logits.detach(), inputs["input_ids"], spans, int(tail))
            prefix = "" if model.training else "eval_"
            self._metrics[prefix + "answer_token_accuracy"].append(token_acc)
            self._metrics[prefix + "answer_exact"].append(exact)
            if model.training and self.curriculum is not None:
                self.curriculum.record(exact)
        return (loss, outputs) if return_outputs else loss

    def _window_select_loss(self, scores: list[torch.Tensor], inputs, spans, config) -> torch.Tensor:
        """Cross-entropy of every layer's window choice against `window_targets` (0 when there is none)."""
        layers = config.base_config.num_hidden_layers
        folds = len(scores) // layers
        targets = [t for t in window_targets(inputs["input_ids"], inputs.get("attention_mask"), spans,
                                             config.chunk_size, config.global_mem_size) if t[1] < folds]
        if not targets:
            return scores[0].new_zeros(()) if scores else torch.zeros(())
        logits, labels = [], []
        for row, chunk, window in targets:
            for layer in range(layers):
                index = layer * folds + chunk if config.layer_major else chunk * layers + layer
                logits.append(scores[index][row].float())
                labels.append(window)
        logits = torch.stack(logits)
        labels = torch.tensor(labels, device=logits.device)
        select = F.cross_entropy(logits, labels)
        self._metrics["window_select_ce"].append(float(select.detach()))
        self._metrics["window_select_accuracy"].append(float((logits.argmax(-1) == labels).float().mean()))
        return select

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        is_eval = any(key.startswith("eval_") for key in logs)
        for key in [k for k in self._metrics if k.startswith("eval_") == is_eval]:
            values = self._metrics.pop(key)
            logs[key] = round(sum(values) / len(values), 4)
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a PEFT checkpoint with its memory keys mapped to this model's layout (checkpoints written before
        `CometModel` keep the memory at the top level); refuse one whose weights do not all fit."""
        model = model if model is not None else self.model
        adapter = Path(resume_from_checkpoint) / "adapter_model.safetensors"
        if not (hasattr(model, "peft_config") and adapter.is_file()):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from convert.trained_weights import remap_memory_keys

        state = remap_memory_keys(load_file(adapter), model)
        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise KeyError(f"{adapter} holds weights this model does not have: {result.unexpected_keys[:5]}")

    def _load_callback_state(self) -> None:
        super()._load_callback_state()
        stored = self.state.stateful_callbacks.get(type(self.curriculum).__name__) if self.curriculum else None
        if stored:
            self.curriculum.load_state(stored[0] if isinstance(stored, list) else stored)


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` whose writing finished (Trainer writes ``trainer_state.json`` last), or None."""
    if not output_dir.is_dir():
        return None
    done = []
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            done.append((int(folder.name.rsplit("-", 1)[1]), folder))
        except (OSError, ValueError):
            continue
    return str(max(done)[1]) if done else None


def resolve_resume(config: CometTrainingConfig) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite an earlier run's checkpoints.

    `--resume_from_checkpoint latest` (or `true`) takes the newest checkpoint in `output_dir` (a fresh run if
    there is none); any other value must be a checkpoint folder.
    """
    out = Path(config.output_dir)
    existing = last_complete_checkpoint(out)
    wanted = config.resume_from_checkpoint
    if wanted is None or str(wanted).lower() in ("", "false", "none"):
        if existing is not None:
            raise FileExistsError(
                f"{out} already holds checkpoints of an earlier run (newest: {Path(existing).name}); pass "
                "--resume_from_checkpoint latest to continue it, or choose another --output_dir"
            )
        return None
    if str(wanted).lower() in ("latest", "true", "last"):
        return existing
    path = Path(wanted)
    if not (path.is_dir() and (path / "trainer_state.json").is_file()):
        raise FileNotFoundError(f"--resume_from_checkpoint {wanted}: not a checkpoint folder (no trainer_state.json)")
    return str(path)


def parse_config(argv: list[str] | None) -> CometTrainingConfig:
    from trl import TrlParser

    args = list(argv) if argv is not None else sys.argv[1:]
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")):  # `python -m training.comet_trainer recipe.yaml`
        args = ["--config", args[0]]
    (config,) = TrlParser([CometTrainingConfig]).parse_args_and_config(args)
    return config


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(argv)
    resume = resolve_resume(config)
    set_seed(config.seed)  # fresh memory and LoRA weights are drawn when the model is built
    model, tokenizer = build_model(config)
    comet_config = comet_config_of(model)
    curriculum = None
    eval_data = None
    if config.task == "lm":
        with config.main_process_first(desc="tokenising and packing"):  # rank 0 fills the datasets cache first
            train_data, eval_data = lm_datasets(config, tokenizer)
        collator = default_data_collator
        if config.label_names is None:  # the forward also takes `label_weights`, which these rows do not have
            config.label_names = ["labels"]
    else:
        train_data, collator, curriculum = build_recall_data(config, tokenizer, comet_config.chunk_size)
        config.remove_unused_columns = False  # the rows are built on access from an index column
    trainer_cls = CometTrainer
    if config.pipeline_parallel > 1:  # the layer wavefront over P ranks per sample (DESIGN §1)
        from .pipeline_trainer import PipelineTrainer as trainer_cls
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        curriculum=curriculum,
        temp_budget_choices=config.temp_budget_list,
        callbacks=[TimeBudget(config.max_train_minutes)] if config.max_train_minutes else None,
        **(
            {"teacher": build_teacher(config), "distill_weight": config.distill_weight,
             "distill_hidden_weight": config.distill_hidden_weight}
            if config.distilling else {}
        ),
        window_select_weight=config.window_select_weight,
    )
    # The loss before training is evaluated by `train()` itself, once the model is wrapped for DDP, FSDP or DeepSpeed:
    # `evaluate()` before `train()` makes accelerate mark the bare model as prepared, so that DDP would not wrap it
    # (the processes would train apart), and FSDP2 refuses to shard a model without its optimizer.
    config.eval_on_start = config.eval_on_start or (eval_data is not None and resume is None)
    if resume:
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    first = [e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0]
    before = first[0] if first and resume is None else {}
    after = trainer.evaluate() if eval_data is not None else {}
    trainer.save_model(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    from convert.trained_weights import save_trained_weights

    save_trained_weights(trainer.model, Path(config.output_dir) / "comet_trained.safetensors")
    summary = {"eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss")}
    for key in list(summary):
        if summary[key] is not None:
            summary[key.replace("loss", "perplexity")] = math.exp(summary[key])
    print(summary)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank is done: leave the process group together, so that no communication thread is still running when
        # the interpreter exits (a torchrun rank was once aborted at exit with "terminate called without an active
        # exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)


__all__ = [
    "CometTrainer",
    "TimeBudget",
    "build_model",
    "build_teacher",
    "freeze_memory_modules",
    "distillation_losses",
    "window_targets",
    "build_recall_data",
    "load_texts",
    "main",
    "pack_samples",
    "resolve_resume",
]
