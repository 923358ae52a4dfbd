"""Training configuration of CoMeT: `transformers.TrainingArguments` plus model, memory, data and tuning fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

FINETUNING_MODES = ("lora", "full", "memory")


@dataclass
class CometTrainingConfig(TrainingArguments):
    r"""
    Arguments of [`CometTrainer`] and of `python -m training.comet_trainer`.

    Besides every `TrainingArguments` field:

    Args:
        model_name_or_path (`str`, *optional*):
            A base causal LM (CoMeT is built on it with `CometForCausalLM.from_base`) or a saved CoMeT model.
            Defaults to the embedded SmolLM2-135M-Instruct.
        chunk_size (`int`, *optional*, defaults to 256), global_mem_size (`int`, *optional*, defaults to 8),
        temp_beacon_stride (`int`, *optional*, defaults to 16), temp_mem_budget (`int`, *optional*, defaults to 64):
            Memory fields of a new CoMeT model (ignored when loading a saved one).
        train_files (`str`, *optional*):
            Comma-separated local text files to train on. Without it, the standard library's pydoc prose.
        dataset_name (`str`, *optional*), dataset_split (`str`, *optional*, defaults to `"train"`),
        text_field (`str`, *optional*, defaults to `"text"`):
            A `datasets` source instead of local files.
        sample_tokens (`int`, *optional*, defaults to 1536):
            Tokens per training sample. Use several chunks and more than the temporary memory's window, so that
            the global memory has to carry information (see DESIGN "What a first training run taught us").
        eval_samples (`int`, *optional*, defaults to 4):
            Samples held out for evaluation.
        finetuning (`str`, *optional*, defaults to `"lora"`):
            `"lora"`: LoRA on the attention projections plus every memory parameter (`modules_to_save`);
            `"full"`: every parameter; `"memory"`: memory parameters only, base frozen.
        lora_r (`int`, *optional*, defaults to 8), lora_alpha (`int`, *optional*, defaults to 16):
            LoRA rank and scaling.
        lora_target_modules (`str`, *optional*, defaults to `"q_proj,k_proj,v_proj,o_proj"`):
            Comma-separated module names LoRA adapts.
        memory_lr_multiplier (`float`, *optional*, defaults to 5.0):
            Learning rate of the memory parameters relative to `learning_rate` (the authors train them ~5x faster).
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "base causal LM or saved CoMeT model"})
    chunk_size: int = field(default=256, metadata={"help": "text tokens per chunk (new models)"})
    global_mem_size: int = field(default=8, metadata={"help": "global memory slots (new models)"})
    temp_beacon_stride: int = field(default=16, metadata={"help": "a beacon every N tokens, -1 disables (new models)"})
    temp_mem_budget: int = field(default=64, metadata={"help": "temporary memory entries kept (new models)"})
    train_files: str | None = field(default=None, metadata={"help": "comma-separated local text files"})
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets source (name or path)"})
    dataset_split: str = field(default="train", metadata={"help": "split of dataset_name"})
    text_field: str = field(default="text", metadata={"help": "text column of dataset_name"})
    sample_tokens: int = field(default=1536, metadata={"help": "tokens per training sample"})
    eval_samples: int = field(default=4, metadata={"help": "samples held out for evaluation"})
    finetuning: str = field(default="lora", metadata={"help": f"one of {FINETUNING_MODES}"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "LoRA targets"})
    memory_lr_multiplier: float = field(default=5.0, metadata={"help": "memory lr / base lr"})

    def __post_init__(self):
        super().__post_init__()
        if self.finetuning not in FINETUNING_MODES:
            raise ValueError(f"finetuning must be one of {FINETUNING_MODES}, got {self.finetuning!r}")
        if self.sample_tokens < 2:
            raise ValueError(f"sample_tokens must be at least 2, got {self.sample_tokens}")
        if self.memory_lr_multiplier <= 0:
            raise ValueError(f"memory_lr_multiplier must be positive, got {self.memory_lr_multiplier}")


__all__ = ["FINETUNING_MODES", "CometTrainingConfig"]
