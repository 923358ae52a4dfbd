"""Fine-tune RAM with TRL: ``L = NLL(answer) + lambda * L_con`` on NQ-style question answering data.

Usage::

    python -m training.ram_trainer --config training/recipes/ram_smollm2.yaml [--max_steps 200 ...]
    python -m training.ram_trainer --train_file data.jsonl --output_dir outputs/ram --max_steps 200
    python -m training.ram_trainer ... --resume_from_checkpoint latest   # continue a killed run exactly

The recipe and flags are read by TRL's `TrlParser` into a [`RamTrainingConfig`] (an `SFTConfig`). Training runs on
TRL's `SFTTrainer` with prompt-completion data: each example becomes ``prompt = context + question`` and
``completion = " " + answer`` (TRL tokenizes both, appends EOS and masks the prompt out of the labels:
completion-only loss). [`RamSFTCollator`] splits every tokenized prompt back into the context (what RAM compresses)
and the question (what the decoder reads after it, and the encoder's query), labels the context's segments for the
contrastive term, and [`RamSFTTrainer`] runs RAM's own forward: SFTTrainer's default loss goes through a fused LM
head on the plain decoder, which would skip the encoder and the contrastive term.

A run never overwrites the checkpoints of an earlier one (see `training.comet_trainer.resolve_resume`), and a
model path runs its own modelling code only with `--trust_remote_code`. [`RamTrainer`] is the same loss on a plain
`transformers.Trainer` for data already tokenized into RAM columns (`prepare_ram_example`, the benchmarks).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed
from trl import SFTTrainer, TrlParser

from modeling_comet.modeling_ram import RamForCausalLM
from training.ram_config import RamTrainingConfig

ENCODER_LORA_PROJECTIONS = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
RAM_FIELDS = ("encoder_layers", "segment_size", "keep_ratio", "position_layout", "contrastive_temperature",
              "contrastive_weight")


def context_text(example: dict) -> str:
    """The passages of an NQ-style example, in order, as one text."""
    passages = []
    for ctx in example["ctxs"]:
        title = (ctx.get("title") or "").strip()
        passages.append(f"{title}\n{ctx['text']}" if title else ctx["text"])
    return "\n\n".join(passages)


def answer_segment_labels(segment_texts: list[str], answers: list[str]) -> list[int]:
    """1 for segments whose text contains an answer string (case-insensitive), else 0.

    >>> answer_segment_labels(["the capital is Paris.", "it rains"], ["paris"])
    [1, 0]
    """
    needles = [answer.lower().strip() for answer in answers if answer.strip()]
    return [int(any(needle in text.lower() for needle in needles)) for text in segment_texts]


def prepare_ram_example(example: dict, tokenizer, config: RamTrainingConfig, segment_size: int) -> dict:
    """Tokenize one NQ-style example into RAM columns.

    Positives are the example's `positive_segments` when given, else the segments containing an answer string.
    """
    if not example.get("answers"):
        raise ValueError(f"example without answers: {example.get('question')!r}")
    context_ids = tokenizer(context_text(example), add_special_tokens=False)["input_ids"][: config.max_context_tokens]
    question_ids = tokenizer(config.question_template.format(question=example["question"]), add_special_tokens=False)[
        "input_ids"
    ]
    answer_ids = tokenizer(" " + example["answers"][0].strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    segments = [context_ids[start : start + segment_size] for start in range(0, len(context_ids), segment_size)]
    if example.get("positive_segments") is not None:
        positives = set(example["positive_segments"])
        segment_labels = [int(index in positives) for index in range(len(segments))]
    else:
        segment_labels = answer_segment_labels(tokenizer.batch_decode(segments), example["answers"])
    return {
        "context_ids": context_ids,
        "question_ids": question_ids,
        "answer_ids": answer_ids,
        "segment_labels": segment_labels,
    }


@dataclass
class RamDataCollator:
    """Right-pad the RAM columns of a batch; masks mark real tokens, segment labels pad with -100.

    >>> collator = RamDataCollator(pad_token_id=0)
    >>> batch = collator([
    ...     {"context_ids": [5, 6, 7], "question_ids": [8], "answer_ids": [9, 2], "segment_labels": [1, 0]},
    ...     {"context_ids": [5], "question_ids": [8, 8], "answer_ids": [2], "segment_labels": [0]},
    ... ])
    >>> batch["context_ids"]
    tensor([[5, 6, 7],
            [5, 0, 0]])
    >>> batch["context_attention_mask"]
    tensor([[1, 1, 1],
            [1, 0, 0]])
    >>> batch["segment_labels"]
    tensor([[   1,    0],
            [   0, -100]])
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for column in ("context", "question", "answer"):
            ids, mask = _pad([feature[f"{column}_ids"] for feature in features], self.pad_token_id)
            batch[f"{column}_ids"], batch[f"{column}_attention_mask"] = ids, mask
        if "segment_labels" in features[0]:
            batch["segment_labels"], _ = _pad([feature["segment_labels"] for feature in features], -100)
        return batch


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(row) for row in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return ids, mask


def prompt_completion_example(example: dict, tokenizer, config: RamTrainingConfig) -> dict:
    """One NQ-style example as a TRL prompt-completion row, plus what RAM needs to split and label it.

    `prompt` is the context (cut to `max_context_tokens` tokens) followed by the question template, `completion` the
    first answer after a space. `context` (the context text alone), `answers` and `positive_segments` ride along for
    [`RamSFTCollator`].
    """
    if not example.get("answers"):
        raise ValueError(f"example without answers: {example.get('question')!r}")
    context = context_text(example)
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if len(context_ids) > config.max_context_tokens:
        context = tokenizer.decode(context_ids[: config.max_context_tokens])
    return {
        "prompt": context + config.question_template.format(question=example["question"]),
        "completion": " " + example["answers"][0].strip(),
        "context": context,
        "answers": list(example["answers"]),
        "positive_segments": example.get("positive_segments"),
    }


def _common_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


@dataclass
class RamSFTCollator:
    """Turn SFTTrainer's tokenized prompt-completion examples into RAM batches.

    The prompt is the part of `input_ids` whose `labels` are -100 (completion-only loss), the answer the rest. The
    context is the longest common prefix of the prompt and the context tokenized alone (the same tokenizer call TRL
    makes, so special tokens agree; a token merged across the boundary goes to the question); the question is the
    rest of the prompt. Segments are labelled positive from `positive_segments` when given, else when their text
    contains an answer. The batch is padded by [`RamDataCollator`].
    """

    tokenizer: object
    segment_size: int
    pad_token_id: int = 0

    def split(self, example: dict) -> dict:
        ids = list(example["input_ids"])
        if "labels" in example:
            labels = list(example["labels"])
        elif "completion_mask" in example:  # TRL before 1.10 leaves the masking to the collator
            labels = [token if keep else -100 for token, keep in zip(ids, example["completion_mask"], strict=True)]
        else:
            raise ValueError("expected TRL-prepared examples with labels or a completion_mask (prompt-completion data)")
        answer_start = next((index for index, label in enumerate(labels) if label != -100), None)
        if not answer_start or any(label == -100 for label in labels[answer_start:]):
            raise ValueError(
                "expected labels masking exactly the prompt (-100) and keeping the completion: train with "
                "completion_only_loss=True on prompt-completion data"
            )
        prompt = ids[:answer_start]
        context_alone = self.tokenizer(example["context"])["input_ids"]
        split = _common_prefix_length(context_alone, prompt)
        context, question = prompt[:split], prompt[split:]
        if not question:
            raise ValueError(f"the prompt has no question after its context: {example['prompt'][-80:]!r}")
        segments = [context[start : start + self.segment_size] for start in range(0, len(context), self.segment_size)]
        if example.get("positive_segments") is not None:
            positives = set(example["positive_segments"])
            segment_labels = [int(index in positives) for index in range(len(segments))]
        else:
            segment_labels = answer_segment_labels(self.tokenizer.batch_decode(segments), example["answers"])
        return {"context_ids": context, "question_ids": question, "answer_ids": ids[answer_start:],
                "segment_labels": segment_labels}

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return RamDataCollator(self.pad_token_id)([self.split(example) for example in examples])


class RamLossMixin:
    """A trainer's loss as the RAM model's own `NLL + lambda * L_con`; logs both terms and the kept fraction."""

    def __init__(self, *args, **kwargs):
        self._loss_terms = defaultdict(list)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, relevance_only=self.args.contrastive_only)
        self._record_loss_terms(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _record_loss_terms(self, outputs):
        for name in ("nll_loss", "contrastive_loss"):
            value = getattr(outputs, name)
            if value is not None:
                self._loss_terms[name].append(value.detach().float().item())
        if outputs.kept_segments is not None and outputs.segment_mask is not None:
            kept_fraction = outputs.kept_segments.sum() / outputs.segment_mask.sum().clamp(min=1)
            self._loss_terms["kept_fraction"].append(kept_fraction.item())

    def log(self, logs: dict, *args, **kwargs):
        prefix = "eval_" if any(key.startswith("eval_") for key in logs) else ""
        for name, values in self._loss_terms.items():
            logs[prefix + name] = sum(values) / len(values)
        self._loss_terms.clear()
        super().log(logs, *args, **kwargs)


class RamTrainer(RamLossMixin, Trainer):
    """`Trainer` on data already tokenized into RAM columns (`prepare_ram_example` + [`RamDataCollator`])."""


class RamSFTTrainer(RamLossMixin, SFTTrainer):
    """TRL's `SFTTrainer` on prompt-completion data (`prompt_completion_example`) running RAM's own forward.

    TRL prepares the data (tokenization, EOS, completion-only labels); [`RamSFTCollator`] (the default collator here)
    splits each prompt into context and question; the loss is RAM's `NLL(answer) + lambda * L_con`.
    """

    def __init__(self, model, args: RamTrainingConfig, train_dataset, processing_class, data_collator=None, **kwargs):
        if data_collator is None:
            pad_token_id = processing_class.pad_token_id if processing_class.pad_token_id is not None else 0
            segment_size = _unwrap(model).config.segment_size
            data_collator = RamSFTCollator(processing_class, segment_size, pad_token_id)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         data_collator=data_collator, **kwargs)


def _unwrap(model) -> RamForCausalLM:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_path(config: RamTrainingConfig) -> str:
    """`config.model_name_or_path`, or the embedded SmolLM2-135M-Instruct's folder when it is None."""
    if config.model_name_or_path is not None:
        return config.model_name_or_path
    from convert.smollm2 import smollm2_path

    return str(smollm2_path())


def build_model(config: RamTrainingConfig):
    """The RAM model to train, with the parameters `config.finetuning` asks for trainable."""
    path = model_path(config)
    ram_fields = {name: getattr(config, name) for name in RAM_FIELDS}
    trust = config.trust_remote_code
    if AutoConfig.from_pretrained(path, trust_remote_code=trust).model_type == "ram":
        overrides = {name: ram_fields[name] for name in ("keep_ratio", "position_layout", "contrastive_temperature",
                                                          "contrastive_weight")}
        model = RamForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides)
    else:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust)
        model = RamForCausalLM.from_base(base, **ram_fields)
    return apply_finetuning(model, config)


def apply_finetuning(model: RamForCausalLM, config: RamTrainingConfig):
    """Freeze or wrap `model` for `config.finetuning` (`"lora"`, `"full"` or `"encoder"`)."""
    if config.finetuning == "full":
        return model
    if config.finetuning == "encoder":
        for parameter in model.decoder.parameters():
            parameter.requires_grad_(False)
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, config))


def lora_config(model: RamForCausalLM, config: RamTrainingConfig):
    """The PEFT `LoraConfig` of `--finetuning lora`: LoRA on `lora_target_modules`, the alignment (and, unless
    `encoder_lora`, the encoder layers) trained fully through `modules_to_save`."""
    from peft import LoraConfig

    new_modules = ["alignment"]
    target_modules = config.lora_target_modules
    if config.encoder_lora:
        target_modules = rf"(?:{target_modules})|(?:encoder_layers\.\d+\..*\.{ENCODER_LORA_PROJECTIONS})"
    else:
        new_modules = [f"encoder_layers.{index}" for index in range(len(model.encoder_layers))] + new_modules
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=target_modules,
        modules_to_save=new_modules,
        lora_dropout=0.0,
    )


def parse_config(argv: list[str] | None = None) -> RamTrainingConfig:
    """Parse flags and an optional `--config recipe.yaml` (TRL's `TrlParser`: flags override the recipe)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv) or not Path(argv[index + 1]).is_file():
            raise FileNotFoundError(f"--config needs a YAML recipe file, got {argv[index + 1:index + 2]}")
    return TrlParser(RamTrainingConfig).parse_args_and_config(argv)[0]


def main(argv: list[str] | None = None) -> None:
    from datasets import load_dataset

    from training.comet_trainer import resolve_resume

    config = parse_config(argv)
    if config.train_file is None:
        raise ValueError("--train_file is required (NQ-style JSONL with question, answers, ctxs)")
    if not Path(config.train_file).is_file():
        raise FileNotFoundError(f"--train_file {config.train_file}: no such file")
    resume = resolve_resume(config)  # before the model loads: refuse to overwrite an earlier run's checkpoints
    set_seed(config.seed)  # the new encoder/alignment and LoRA weights are drawn here, before Trainer seeds
    model = build_model(config)
    tokenizer_path = model_path(config)  # a PEFT-wrapped model's config has no name_or_path to fall back on
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=config.trust_remote_code)
    dataset = load_dataset("json", data_files=config.train_file, split="train")
    dataset = dataset.map(
        prompt_completion_example,
        fn_kwargs={"tokenizer": tokenizer, "config": config},
        remove_columns=dataset.column_names,
    )
    trainer = RamSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    if resume:
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    save_ram_checkpoint(trainer, tokenizer, config, argv)


def save_ram_checkpoint(trainer, tokenizer, config: RamTrainingConfig, argv: list[str] | None = None) -> Path:
    """Write `output_dir` as a complete RAM checkpoint that loads (and publishes) on its own.

    With LoRA the adapters (and the encoder/alignment copies PEFT trains) are saved under `output_dir/adapter` and
    merged into the model written at `output_dir`: weights, config, model and pipeline code, tokenizer and a card
    (`convert.cards`) saying how it was trained. `python -m convert.publish OUTPUT_DIR REPO_ID` publishes it.
    """
    from convert.cards import BaseModelInfo, base_model_info, render_card

    output_dir = Path(config.output_dir)
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        trainer.save_model(str(output_dir / "adapter"))
        model = model.merge_and_unload()
    if trainer.is_world_process_zero():
        model.save_pretrained(output_dir, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        base = config.model_name_or_path or getattr(model.config.base_config, "_name_or_path", None)
        command = "python -m training.ram_trainer " + " ".join(sys.argv[1:] if argv is None else argv)
        note = (f"Trained with TRL's SFTTrainer (prompt = context + question, completion = answer, completion-only "
                f"loss) plus RAM's contrastive term (lambda = {model.config.contrastive_weight}), finetuning mode "
                f"`{config.finetuning}`, {trainer.state.global_step} steps.")
        base_info = base_model_info(base, required=False) if base else BaseModelInfo(None)
        card = render_card(model.config, base_info, model_name=output_dir.name, repo_id=str(output_dir),
                           training_note=note, training_command=command, require_hub_metadata=False)
        card.save(output_dir / "README.md")
    return output_dir


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)


__all__ = [
    "RamDataCollator",
    "RamLossMixin",
    "RamSFTCollator",
    "RamSFTTrainer",
    "RamTrainer",
    "answer_segment_labels",
    "apply_finetuning",
    "build_model",
    "context_text",
    "lora_config",
    "main",
    "model_path",
    "parse_config",
    "prepare_ram_example",
    "prompt_completion_example",
    "save_ram_checkpoint",
]
