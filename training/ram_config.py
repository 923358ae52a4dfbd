"""Training configuration of RAM: TRL's `SFTConfig` plus the model, data and tuning fields.

`python -m training.ram_trainer --config training/recipes/ram_smollm2.yaml` reads it with TRL's `TrlParser` (a YAML
recipe, overridden by command-line flags).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from modeling_comet.position_layout import POSITION_LAYOUTS

FINETUNING_MODES = ("lora", "full", "encoder")


@dataclass
class RamTrainingConfig(SFTConfig):
    r"""
    Arguments of [`RamSFTTrainer`] / [`RamTrainer`] and of `python -m training.ram_trainer`.

    Every `SFTConfig` (and so `TrainingArguments`) field, with these defaults changed for RAM: `completion_only_loss`
    is `True` (the loss is taken on the answer only), `max_length` is `None` (contexts are cut by
    `max_context_tokens` instead, never the answer), and `gradient_checkpointing`, `bf16`, `learning_rate` and
    `logging_steps` keep the `TrainingArguments` defaults (off, off, `5e-5`, `500`) rather than TRL's. Besides:

    Args:
        model_name_or_path (`str`, *optional*):
            A base causal LM (RAM is built on it with `RamForCausalLM.from_base`) or a saved RAM model.
            Defaults to the embedded SmolLM2-135M-Instruct.
        train_file (`str`, *optional*):
            NQ-style JSONL: `question` (str), `answers` (list of str), `ctxs` (list of `{"title", "text"}`), and
            optionally `positive_segments` (segment indices relevant to the question).
        encoder_layers (`int`, *optional*, defaults to 8):
            Base layers copied into the RAM encoder (new models only).
        segment_size (`int`, *optional*, defaults to 32):
            Segment width in tokens (new models only).
        keep_ratio (`float`, *optional*, defaults to 0.25):
            Fraction of segments kept as tokens.
        position_layout (`str`, *optional*, defaults to `"default"`):
            `"default"` or `"epl"` decoder positions.
        contrastive_temperature (`float`, *optional*, defaults to 0.05):
            `tau` of the contrastive loss.
        contrastive_weight (`float`, *optional*, defaults to 1.0):
            `lambda` in `NLL + lambda * L_con`.
        max_context_tokens (`int`, *optional*, defaults to 4096):
            Contexts are cut to this many tokens.
        question_template (`str`, *optional*, defaults to `"\n\nQuestion: {question}\nAnswer:"`):
            Text the decoder reads after the context; `{question}` is replaced.
        finetuning (`str`, *optional*, defaults to `"lora"`):
            `"lora"`: LoRA on the decoder's attention projections, encoder and alignment fully trained (saved through
            `modules_to_save`); `"full"`: every parameter; `"encoder"`: encoder and alignment only, decoder frozen.
        lora_r (`int`, *optional*, defaults to 8), lora_alpha (`int`, *optional*, defaults to 16):
            LoRA rank and scaling.
        lora_target_modules (`str`, *optional*):
            Regular expression of the decoder modules LoRA adapts (full-match on module names).
        encoder_lora (`bool`, *optional*, defaults to `False`):
            With `finetuning="lora"`, put LoRA on the encoder layers' attention and MLP projections too instead of
            training them fully: the trained weights are then LoRA factors plus the alignment (a few MB, not the
            encoder's copy of the base layers).
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow `model_name_or_path` to run modelling code from its folder or repo. Off by default: a RAM checkpoint
            loads with this package's own classes, and the embedded default needs no remote code.
        resume_from_checkpoint (`str`, *optional*):
            `latest` continues from the newest checkpoint in `output_dir`, a path from that checkpoint. Without it a
            run refuses an `output_dir` that already holds checkpoints, rather than overwriting them.
        contrastive_only (`bool`, *optional*, defaults to `False`):
            Train the encoder's relevance alone: the decoder is skipped and the loss is `lambda * L_con` (a cheap
            warm-up, or all a tight compute budget allows).
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "base causal LM or saved RAM model"})
    train_file: str | None = field(default=None, metadata={"help": "NQ-style JSONL (question, answers, ctxs)"})
    encoder_layers: int = field(default=8, metadata={"help": "base layers copied into the RAM encoder"})
    segment_size: int = field(default=32, metadata={"help": "segment width in tokens"})
    keep_ratio: float = field(default=0.25, metadata={"help": "fraction of segments kept as tokens"})
    position_layout: str = field(default="default", metadata={"help": f"one of {POSITION_LAYOUTS}"})
    contrastive_temperature: float = field(default=0.05, metadata={"help": "tau of the contrastive loss"})
    contrastive_weight: float = field(default=1.0, metadata={"help": "lambda of the contrastive loss"})
    max_context_tokens: int = field(default=4096, metadata={"help": "contexts are cut to this many tokens"})
    question_template: str = field(
        default="\n\nQuestion: {question}\nAnswer:", metadata={"help": "decoder text after the context"}
    )
    finetuning: str = field(default="lora", metadata={"help": f"one of {FINETUNING_MODES}"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_target_modules: str = field(
        default=r"decoder\..*\.(q_proj|k_proj|v_proj|o_proj)",
        metadata={"help": "regex (full match) of decoder modules adapted by LoRA"},
    )
    encoder_lora: bool = field(default=False, metadata={"help": "LoRA on the encoder layers instead of full training"})
    trust_remote_code: bool = field(default=False, metadata={"help": "let model_name_or_path run its own code"})
    contrastive_only: bool = field(default=False, metadata={"help": "skip the decoder, train relevance only"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "RAM batches carry custom columns"})
    # SFTConfig fields whose TRL defaults do not suit RAM
    completion_only_loss: bool | None = field(default=True, metadata={"help": "loss on the answer (completion) only"})
    max_length: int | None = field(default=None, metadata={"help": "TRL truncation; RAM uses max_context_tokens"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "deprecated alias of activation_checkpointing"})
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision"})
    learning_rate: float = field(default=5e-5, metadata={"help": "initial AdamW learning rate"})
    logging_steps: float = field(default=500, metadata={"help": "log every N steps"})

    def __post_init__(self):
        super().__post_init__()
        errors = []
        if self.finetuning not in FINETUNING_MODES:
            errors.append(f"finetuning must be one of {FINETUNING_MODES}, got {self.finetuning!r}")
        if self.position_layout not in POSITION_LAYOUTS:
            errors.append(f"position_layout must be one of {POSITION_LAYOUTS}, got {self.position_layout!r}")
        if "{question}" not in self.question_template:
            errors.append(f"question_template must contain '{{question}}', got {self.question_template!r}")
        if self.max_context_tokens < 1:
            errors.append(f"max_context_tokens must be positive, got {self.max_context_tokens}")
        if self.completion_only_loss is False:
            errors.append("completion_only_loss must stay True: RAM's NLL is over the answer only")
        if self.packing or self.padding_free:
            errors.append("packing and padding_free are not supported: each RAM example is compressed on its own")
        if errors:
            raise ValueError("Invalid RAM training configuration: " + "; ".join(errors))


__all__ = ["FINETUNING_MODES", "RamTrainingConfig"]
