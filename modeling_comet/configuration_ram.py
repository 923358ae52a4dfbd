"""Configuration of RAM (Read As HuMan) context-compression models."""

from __future__ import annotations

from .requirements import MIN_TRANSFORMERS_VERSION  # noqa: F401  (importing it checks the installed transformers)

# isort: split

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_comet import check_supported_base
from .pipeline_ram import RAM_TASK, RamQuestionAnsweringPipeline
from .position_layout import POSITION_LAYOUTS

# What a saved RAM config declares so that `pipeline(RAM_TASK, model=repo_id, trust_remote_code=True)` finds the
# pipeline class in the checkpoint's own `pipeline_ram.py` (shipped with the model files).
RAM_CUSTOM_PIPELINES = {
    RAM_TASK: {
        "impl": f"pipeline_ram.{RamQuestionAnsweringPipeline.__name__}",
        "pt": ["AutoModelForCausalLM"],
        "tf": [],
        "type": "text",
    }
}


@strict
class RamConfig(PreTrainedConfig):
    r"""
    Configuration of a [`RamForCausalLM`]: a pretrained decoder (the *base*) plus a RAM encoder that decides which
    context segments the decoder reads in full and which it only skims as one summary vector.

    The context is cut into segments of `segment_size` tokens; the query and every segment are encoded in parallel
    by a copy of the base's first `encoder_layers` layers. The `floor(keep_ratio * N)` segments whose mean-pooled
    encoding is closest (cosine) to the query's are kept as tokens; each other segment becomes one query-weighted
    summary vector mapped into the decoder's embedding space.

    Args:
        base_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the base model (one of `llama`, `mistral`, `qwen2`, `qwen3`).
        encoder_layers (`int`, *optional*, defaults to 8):
            Number of the base's first decoder layers copied into the (trainable) encoder. At most the base's
            `num_hidden_layers`.
        segment_size (`int`, *optional*, defaults to 32):
            Width in tokens of a context segment (the last segment of a context may be shorter).
        keep_ratio (`float`, *optional*, defaults to 0.25):
            Fraction of segments kept as tokens, in (0, 1]: `floor(keep_ratio * N)` of `N` segments are kept
            (0.25 is the "4x" setting, 0.125 the "8x" one). With 1.0 the decoder sees the uncompressed prompt.
        position_layout (`str`, *optional*, defaults to `"default"`):
            Position ids of the decoder input. `"default"`: consecutive ids over what the decoder sees (the
            authors' choice). `"epl"`: kept tokens keep their ids in the uncompressed context, a summary vector takes
            the centre of the segment it replaces, and the question continues after the context's last id.
        contrastive_temperature (`float`, *optional*, defaults to 0.05):
            Temperature `tau` of the multi-positive contrastive loss over query-segment cosine scores.
        contrastive_weight (`float`, *optional*, defaults to 1.0):
            Weight `lambda` of the contrastive loss in `L = NLL(answer) + lambda * L_con`.
    """

    model_type = "ram"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    base_config: dict | PreTrainedConfig | None = None
    encoder_layers: int = 8
    segment_size: int = 32
    keep_ratio: float | int = 0.25
    position_layout: str = "default"
    contrastive_temperature: float | int = 0.05
    contrastive_weight: float | int = 1.0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.base_config, "tie_word_embeddings", False))
        if not getattr(self, "custom_pipelines", None):
            self.custom_pipelines = RAM_CUSTOM_PIPELINES
        self.check_ram_fields()

    def check_ram_fields(self):
        """Check every RAM field in one place; raise a ValueError naming the bad values."""
        check_supported_base(self.base_config, method="RAM")
        errors = []
        base_layers = self.base_config.num_hidden_layers
        if not isinstance(self.encoder_layers, int) or not 1 <= self.encoder_layers <= base_layers:
            errors.append(f"encoder_layers must be an integer in [1, {base_layers}], got {self.encoder_layers!r}")
        if not isinstance(self.segment_size, int) or self.segment_size < 1:
            errors.append(f"segment_size must be a positive integer, got {self.segment_size!r}")
        if not 0 < self.keep_ratio <= 1:
            errors.append(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.position_layout not in POSITION_LAYOUTS:
            errors.append(f"position_layout must be one of {POSITION_LAYOUTS}, got {self.position_layout!r}")
        if not self.contrastive_temperature > 0:
            errors.append(f"contrastive_temperature must be > 0, got {self.contrastive_temperature!r}")
        if not self.contrastive_weight >= 0:
            errors.append(f"contrastive_weight must be >= 0, got {self.contrastive_weight!r}")
        if errors:
            raise ValueError("Invalid RAM configuration: " + "; ".join(errors))

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        return self.base_config


RamConfig.register_for_auto_class()

__all__ = ["RAM_CUSTOM_PIPELINES", "RamConfig"]
