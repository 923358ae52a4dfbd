"""Configuration of CoMeT (Collaborative Memory Transformer) models."""

from __future__ import annotations

from .requirements import MIN_TRANSFORMERS_VERSION  # noqa: F401  (importing it checks the installed transformers)

# isort: split

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .pipeline_comet import COMET_TEXT_GENERATION_TASK, CometTextGenerationPipeline
from .position_layout import POSITION_LAYOUTS

# What a saved CoMeT config declares so that `pipeline("comet-text-generation", model=path_or_repo,
# trust_remote_code=True)` finds the long-prompt pipeline class in the checkpoint's own `pipeline_comet.py`.
COMET_CUSTOM_PIPELINES = {
    COMET_TEXT_GENERATION_TASK: {
        "impl": f"pipeline_comet.{CometTextGenerationPipeline.__name__}",
        "pt": ["AutoModelForCausalLM"],
        "tf": [],
        "type": "text",
    }
}

GLOBAL_WRITES = ("readout", "window")
TEMP_WRITES = ("beacon", "tail")

# Decoder-only bases whose decoder layers share the Llama calling convention
# (hidden_states, attention_mask, position_ids, position_embeddings, cache) and whose
# backbone exposes embed_tokens / layers / norm / rotary_emb.
SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported_base(base_config: PreTrainedConfig, method: str = "CoMeT") -> None:
    """Raise a ``ValueError`` naming the supported architectures if ``base_config`` is not one."""
    model_type = getattr(base_config, "model_type", None)
    if model_type not in SUPPORTED_BASE_MODEL_TYPES:
        raise ValueError(
            f"Unsupported base architecture {model_type!r}: {method} supports decoder-only bases with the Llama "
            f"layer convention, namely {', '.join(SUPPORTED_BASE_MODEL_TYPES)}."
        )


@strict
class CometConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CometModel`] / [`CometForCausalLM`]: a pretrained decoder (the *base*) plus the CoMeT memory.
    `base_config` is required; build from a pretrained model with `CometForCausalLM.from_base(base, **memory_fields)`.

    The input is read in chunks of `chunk_size` text tokens. Chunk τ>0 is laid out as
    `[global_mem_size global slots][temporary slots][text][beacons][global_mem_size readouts]`;
    before each decoder layer the slots are overwritten with that layer's memory built from chunk τ−1.

    Args:
        base_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the base model (one of `llama`, `mistral`, `qwen2`, `qwen3`).
        chunk_size (`int`, *optional*, defaults to 256):
            Number of text tokens per chunk. Also the size of the live window while generating.
        global_mem_size (`int`, *optional*, defaults to 8):
            Number of global memory slots, and of readout tokens that update them. `0` ablates the global memory
            (temporary memory only).
        temp_beacon_stride (`int`, *optional*, defaults to 16):
            A beacon token follows every `temp_beacon_stride` text tokens; each beacon's output joins the
            temporary memory. Must divide `chunk_size`. `-1` disables the temporary memory.
        temp_mem_budget (`int`, *optional*, defaults to 64):
            Number of newest beacon outputs the FIFO temporary memory keeps (ignored when disabled).
        adapter_rank (`int`, *optional*, defaults to 8):
            Rank of the residual low-rank adapters applied to the global and temporary memories.
        position_layout (`str`, *optional*, defaults to `"default"`):
            Position ids of beacons and readouts: `"default"` appends them after the chunk's text with
            consecutive ids; `"epl"` puts each at the centre of the text it summarises (Enhanced Position
            Layout). Text tokens always take consecutive ids after the memory slots.
        global_write (`str`, *optional*, defaults to `"readout"`):
            How each layer writes its global-memory candidate after a chunk. `"readout"`: the layer's outputs at the
            `global_mem_size` readout tokens (DESIGN §1, the paper's design). `"window"`: the layer's *input* states of
            `global_mem_size` consecutive text tokens of the chunk, one soft choice of window per layer (a learned
            query scores each window by its last token, softmax over windows): the slots then hold token states in
            their own order, the form a pretrained decoder's layers already read (the candidate then takes the usual
            norm, gate and adapter). Needs `chunk_size >= global_mem_size`.
        temp_write (`str`, *optional*, defaults to `"beacon"`):
            What each chunk adds to the temporary memory (`beacons_per_chunk` entries per layer). `"beacon"`: the
            layer's outputs at the beacon tokens, each a summary of `temp_beacon_stride` tokens (DESIGN §1).
            `"tail"`: the layer's *input* states of the chunk's last `beacons_per_chunk` text tokens, kept in order.
            The newest entries sit right before the next window's text, so its first tokens see the previous
            chunk's last tokens as token states at their usual distances: a window opened mid-sentence (or
            mid-answer) keeps its immediate context.
        fold_delay (`int`, *optional*, defaults to 0):
            How many tokens of the next chunk are read beside a full chunk before it folds into memory (0 ≤
            `fold_delay` < `chunk_size`). The first `fold_delay` tokens of every chunk after the first then see the
            whole previous chunk as text, not only what its fold kept: an answer that starts right after a chunk
            boundary still sees its question. They are read again in the new window once the chunk has folded, so the
            memory and every later token are exactly as with 0; the cost is `fold_delay` extra tokens per chunk. No
            parameter depends on it: a setting for reading, like `chunk_size`.
        gate_bias_init (`float`, *optional*, defaults to 0.0):
            Initial bias of the global-memory gate (0 gives an even mix of old state and new readouts).
        special_init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the noise added to the mean token embedding when initialising the beacon
            and readout embeddings.
        layer_major (`bool`, *optional*, defaults to `False`):
            Execution order of the training forward: chunk-major (each chunk through all layers, constant
            memory) or layer-major (every chunk through layer l before layer l+1, what the pipeline-parallel
            trainer uses). Both give the same logits.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether a forward pass in inference mode (no labels, not training) returns a `CometCache` to continue
            from, as transformers models do. Training and scoring use the cache-free chunked path.
    """

    model_type = "comet"
    MEMORY_FIELDS = (
        "chunk_size",
        "global_mem_size",
        "temp_beacon_stride",
        "temp_mem_budget",
        "adapter_rank",
        "position_layout",
    )
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    base_config: dict | PreTrainedConfig | None = None
    chunk_size: int = 256
    global_mem_size: int = 8
    temp_beacon_stride: int = 16
    temp_mem_budget: int = 64
    adapter_rank: int = 8
    position_layout: str = "default"
    global_write: str = "readout"
    temp_write: str = "beacon"
    fold_delay: int = 0
    gate_bias_init: float = 0.0
    special_init_std: float = 0.02
    layer_major: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False

    # There is no meaningful default base: transformers must not build a default CometConfig() to diff against.
    has_no_defaults_at_init = True

    def __post_init__(self, **kwargs):
        if self.base_config is None:
            raise ValueError(
                "CometConfig needs base_config: the configuration of the pretrained base model (llama, mistral, qwen2, "
                "qwen3). Build a model with CometForCausalLM.from_base(base_model_or_path, **memory_fields)."
            )
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.base_config, "tie_word_embeddings", False))
        if not getattr(self, "custom_pipelines", None):
            self.custom_pipelines = COMET_CUSTOM_PIPELINES
        self.check_memory_fields()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> CometConfig:
        # A saved CoMeT configuration names every memory field: one without them is not a CoMeT checkpoint, and
        # filling in defaults would silently build a model the weights were not trained for.
        missing = [name for name in cls.MEMORY_FIELDS if name not in config_dict and name not in kwargs]
        if missing:
            raise ValueError(
                f"This configuration (model_type {config_dict.get('model_type')!r}) lacks the CoMeT memory field(s) "
                f"{missing}: it is not a CoMeT checkpoint. Build one from a base model with "
                "CometForCausalLM.from_base(base_model_or_path, **memory_fields)."
            )
        return super().from_dict(config_dict, **kwargs)

    def check_memory_fields(self):
        """Check every memory field in one place; raise a ValueError naming the bad values."""
        check_supported_base(self.base_config)
        errors = []
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            errors.append(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if not isinstance(self.global_mem_size, int) or self.global_mem_size < 0:
            errors.append(f"global_mem_size must be a non-negative integer, got {self.global_mem_size!r}")
        elif self.global_mem_size == 0 and self.temp_beacon_stride == -1:
            errors.append("global_mem_size is 0 and temp_beacon_stride is -1: the model would have no memory at all")
        if self.temp_beacon_stride != -1:
            if not isinstance(self.temp_beacon_stride, int) or self.temp_beacon_stride < 1:
                errors.append(f"temp_beacon_stride must be a positive integer or -1, got {self.temp_beacon_stride!r}")
            elif isinstance(self.chunk_size, int) and self.chunk_size % self.temp_beacon_stride:
                errors.append(
                    f"temp_beacon_stride ({self.temp_beacon_stride}) must divide chunk_size ({self.chunk_size})"
                )
            if not isinstance(self.temp_mem_budget, int) or self.temp_mem_budget < 1:
                errors.append(f"temp_mem_budget must be a positive integer, got {self.temp_mem_budget!r}")
        if not isinstance(self.adapter_rank, int) or self.adapter_rank < 1:
            errors.append(f"adapter_rank must be a positive integer, got {self.adapter_rank!r}")
        if self.position_layout not in POSITION_LAYOUTS:
            errors.append(f"position_layout must be one of {POSITION_LAYOUTS}, got {self.position_layout!r}")
        if self.global_write not in GLOBAL_WRITES:
            errors.append(f"global_write must be one of {GLOBAL_WRITES}, got {self.global_write!r}")
        elif (
            self.global_write == "window"
            and isinstance(self.chunk_size, int)
            and self.chunk_size < self.global_mem_size
        ):
            errors.append(
                f"global_write='window' needs chunk_size ({self.chunk_size}) >= global_mem_size "
                f"({self.global_mem_size}): the window is global_mem_size tokens of one chunk"
            )
        if not isinstance(self.fold_delay, int) or isinstance(self.fold_delay, bool) or self.fold_delay < 0:
            errors.append(f"fold_delay must be a non-negative integer, got {self.fold_delay!r}")
        elif isinstance(self.chunk_size, int) and self.fold_delay >= self.chunk_size:
            errors.append(
                f"fold_delay ({self.fold_delay}) must be smaller than chunk_size ({self.chunk_size}): the "
                "delayed tokens are the first ones of the next chunk"
            )
        if self.temp_write not in TEMP_WRITES:
            errors.append(f"temp_write must be one of {TEMP_WRITES}, got {self.temp_write!r}")
        elif self.temp_write == "tail" and isinstance(self.temp_beacon_stride, int) and self.temp_beacon_stride < 1:
            errors.append("temp_write='tail' needs the temporary memory (temp_beacon_stride >= 1)")
        if errors:
            raise ValueError("Invalid CoMeT configuration: " + "; ".join(errors))

    @property
    def use_temp_memory(self) -> bool:
        return self.temp_beacon_stride != -1

    @property
    def beacons_per_chunk(self) -> int:
        return self.chunk_size // self.temp_beacon_stride if self.use_temp_memory else 0

    @property
    def keeps_text_states(self) -> bool:
        """Whether a fold reads the chunk's per-layer input states (window write or tail temporary memory), so that
        the cache keeps the live window's."""
        return self.global_write == "window" or self.temp_write == "tail"

    @property
    def window_text(self) -> int:
        """Text tokens a live window holds: the chunk plus the `fold_delay` tokens read beside it before it folds."""
        return self.chunk_size + self.fold_delay

    @property
    def temp_slots(self) -> int:
        return self.temp_mem_budget if self.use_temp_memory else 0

    @property
    def memory_slots(self) -> int:
        """Largest number of memory slots in front of a chunk's text."""
        return self.global_mem_size + self.temp_slots

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        return self.base_config


def _from_base(name: str) -> property:
    """The base configuration's ``name`` seen from the top level (``config.hidden_size`` as generic code expects);
    setting it sets the base's (``resize_token_embeddings`` updates ``vocab_size`` this way)."""

    def get(self):
        return getattr(self.base_config, name)

    def set(self, value):
        setattr(self.base_config, name, value)

    return property(get, set, doc=f"The base model's `{name}` (stored in `base_config`).")


# The base's sizes, at the top level as on every transformers configuration (DeepSpeed's "auto" values, PEFT and
# other generic code read `config.hidden_size`). Not fields: they are saved once, in `base_config`.
for _name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
    setattr(CometConfig, _name, _from_base(_name))
del _name


__all__ = [
    "COMET_CUSTOM_PIPELINES",
    "GLOBAL_WRITES",
    "TEMP_WRITES",
    "CometConfig",
    "SUPPORTED_BASE_MODEL_TYPES",
    "check_supported_base",
]
