"""Fine-tune a CoMeT model with the language-modelling loss over long samples.

    python -m training.comet_trainer --output_dir runs/comet --max_steps 200 --sample_tokens 1536

The trainer is a `transformers.Trainer` that calls the CoMeT model's own chunked forward (TRL's
SFTTrainer would patch the forward with a fused LM head and the memory would get no gradient), with
the memory parameters in their own optimizer group at `memory_lr_multiplier` times the learning rate.
Gradients flow through the memories across every chunk of a sample (full BPTT).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, default_data_collator

from modeling_comet import CometForCausalLM

from .comet_config import CometTrainingConfig

MEMORY_PREFIX = "comet_memory."


def load_texts(config: CometTrainingConfig) -> list[str]:
    """Training text: local files, a `datasets` source, or the standard library's prose (always present)."""
    if config.train_files:
        paths = [Path(p) for p in config.train_files.split(",")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"training files not found: {missing}")
        return [p.read_text() for p in paths]
    if config.dataset_name:
        from datasets import load_dataset

        data = load_dataset(config.dataset_name, split=config.dataset_split)
        if config.text_field not in data.column_names:
            raise ValueError(f"dataset has no column {config.text_field!r}; columns: {data.column_names}")
        return list(data[config.text_field])
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def pack_samples(texts: list[str], tokenizer, sample_tokens: int) -> Dataset:
    """Concatenate the tokenised texts and cut them into samples of exactly `sample_tokens` tokens."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if eos is not None:
            stream.append(eos)
    n = len(stream) // sample_tokens
    if n == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one sample of {sample_tokens}")
    rows = [stream[i * sample_tokens : (i + 1) * sample_tokens] for i in range(n)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def build_model(config: CometTrainingConfig):
    from convert.smollm2 import smollm2_path

    source = config.model_name_or_path or str(smollm2_path())
    loaded = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=torch.float32)
    if isinstance(loaded, CometForCausalLM) or getattr(loaded.config, "model_type", None) == "comet":
        model = loaded
    else:
        model = CometForCausalLM.from_base(
            loaded,
            chunk_size=config.chunk_size,
            global_mem_size=config.global_mem_size,
            temp_beacon_stride=config.temp_beacon_stride,
            temp_mem_budget=config.temp_mem_budget,
        )
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
    elif config.finetuning == "memory":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(MEMORY_PREFIX)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    return model, tokenizer


class CometTrainer(Trainer):
    """`Trainer` that runs CoMeT's own forward and trains the memory at a higher learning rate."""

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"], logits_to_keep=1)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(CometTrainingConfig)
    args = argv if argv is not None else sys.argv[1:]
    if len(args) == 1 and args[0].endswith((".yaml", ".yml", ".json")):
        (config,) = parser.parse_yaml_file(args[0]) if args[0].endswith(("yaml", "yml")) else parser.parse_json_file(args[0])
    else:
        (config,) = parser.parse_args_into_dataclasses(args)
    model, tokenizer = build_model(config)
    data = pack_samples(load_texts(config), tokenizer, config.sample_tokens).shuffle(seed=config.seed)
    n_eval = min(config.eval_samples, len(data) - 1)
    eval_data, train_data = data.select(range(n_eval)), data.select(range(n_eval, len(data)))
    trainer = CometTrainer(
        model=model,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data if n_eval else None,
        data_collator=default_data_collator,
    )
    before = trainer.evaluate() if n_eval else {}
    trainer.train()
    after = trainer.evaluate() if n_eval else {}
    trainer.save_model(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    if config.finetuning == "memory":  # the only new weights: a few MB that convert.to_comet can load
        from convert.to_comet import save_memory_weights

        save_memory_weights(trainer.model, Path(config.output_dir) / "comet_memory.safetensors")
    summary = {"eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss")}
    for key in list(summary):
        if summary[key] is not None:
            summary[key.replace("loss", "perplexity")] = math.exp(summary[key])
    print(summary)
    return summary


if __name__ == "__main__":
    main()


__all__ = ["CometTrainer", "build_model", "load_texts", "main", "pack_samples"]
