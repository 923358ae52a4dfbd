"""Fine-tune RAM: ``L = NLL(answer) + lambda * L_con`` on NQ-style question answering data.

Usage::

    python -m training.ram_trainer --train_file data.jsonl --output_dir outputs/ram --max_steps 200
    python -m training.ram_trainer --config ram.yaml
    python -m training.ram_trainer ... --resume_from_checkpoint latest   # continue a killed run exactly

A run never overwrites the checkpoints of an earlier one (see `training.comet_trainer.resolve_resume`), and a
model path runs its own modelling code only with `--trust_remote_code`.

The model's own forward runs (we subclass `Trainer`, not TRL's `SFTTrainer`, whose fused LM head would skip the
encoder and the contrastive term).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, set_seed

from modeling_comet.modeling_ram import RamForCausalLM
from training.ram_config import RamTrainingConfig

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


class RamTrainer(Trainer):
    """`Trainer` whose loss is the RAM model's own `NLL + lambda * L_con`; logs both terms."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_terms = defaultdict(list)

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


def build_model(config: RamTrainingConfig):
    """The RAM model to train, with the parameters `config.finetuning` asks for trainable."""
    path = config.model_name_or_path
    if path is None:
        from convert.smollm2 import smollm2_path

        path = str(smollm2_path())
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
    from peft import LoraConfig, get_peft_model

    new_modules = [f"encoder_layers.{index}" for index in range(len(model.encoder_layers))] + ["alignment"]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=config.lora_target_modules,
        modules_to_save=new_modules,
        lora_dropout=0.0,
    )
    return get_peft_model(model, lora)


def parse_config(argv: list[str] | None = None) -> RamTrainingConfig:
    """Parse the command line, or a single YAML/JSON file given as `--config file`."""
    parser = HfArgumentParser(RamTrainingConfig)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--config":
        path = Path(argv[1])
        if path.suffix in (".yaml", ".yml"):
            return parser.parse_yaml_file(path)[0]
        return parser.parse_json_file(path)[0]
    return parser.parse_args_into_dataclasses(argv)[0]


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
    tokenizer_path = config.model_name_or_path or model.config.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=config.trust_remote_code)
    segment_size = model.config.segment_size
    dataset = load_dataset("json", data_files=config.train_file, split="train")
    dataset = dataset.map(
        prepare_ram_example,
        fn_kwargs={"tokenizer": tokenizer, "config": config, "segment_size": segment_size},
        remove_columns=dataset.column_names,
    )
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = RamTrainer(
        model=model, args=config, train_dataset=dataset, data_collator=RamDataCollator(pad_token_id=pad_token_id)
    )
    if resume:
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)


if __name__ == "__main__":
    from evaluation.common import run_cli

    run_cli(main)


__all__ = [
    "RamDataCollator",
    "RamTrainer",
    "answer_segment_labels",
    "apply_finetuning",
    "build_model",
    "context_text",
    "main",
    "parse_config",
    "prepare_ram_example",
]
