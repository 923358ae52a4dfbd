"""Training configuration of CoMeT: `transformers.TrainingArguments` plus model, memory, data and tuning fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .recall_data import CURRICULUM_MODES, RECALL_TASKS

FINETUNING_MODES = ("lora", "full", "memory")
TASKS = ("lm", *RECALL_TASKS)


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
        global_write (`str`, *optional*, defaults to `"readout"`):
            How a new model writes its global memory (`CometConfig.global_write`): `"readout"` (the paper's design) or
            `"window"` (a soft choice of `global_mem_size` consecutive token states per chunk and layer).
        temp_write (`str`, *optional*, defaults to `"beacon"`):
            What a new model's temporary memory keeps (`CometConfig.temp_write`): `"beacon"` (beacon outputs) or
            `"tail"` (the input states of each chunk's last tokens, so a new window keeps its immediate context).
        fold_delay (`int`, *optional*, defaults to 0):
            Tokens of the next chunk a new model reads beside a full chunk before it folds (`CometConfig.fold_delay`).
        window_select_weight (`float`, *optional*, defaults to 0.0):
            `global_write="window"` with recall tasks: adds this weight × the cross-entropy of every layer's window
            choice, in the chunk that holds each asked fact, against the window that ends with the fact's answer
            (the place of a planted fact is known when the sample is built; RAM's contrastive term supervises which
            segments to keep the same way). The trainer logs `window_select_ce` and `window_select_accuracy`.
        train_files (`str`, *optional*):
            Comma-separated local files to train on: plain text (one document per file), or `.json`/`.jsonl`,
            `.csv`, `.parquet`, `.arrow` (one document per row, column `text_field`). Without it (and without
            `dataset_name`), the standard library's pydoc prose.
        dataset_name (`str`, *optional*), dataset_config (`str`, *optional*), dataset_split (`str`, *optional*,
        defaults to `"train"`), text_field (`str`, *optional*, defaults to `"text"`):
            A `datasets.load_dataset` source (Hub name or local folder), its configuration name (e.g.
            `"wikitext-103-raw-v1"`), split and text column, instead of local files.
        streaming (`bool`, *optional*, defaults to `False`):
            Read the source as a `datasets.IterableDataset`, tokenised and packed as training consumes it, so a
            corpus larger than memory trains. Needs `max_steps` (a stream has no length). The first
            `eval_samples` packed rows are held out, and the rest shuffled in a buffer of `shuffle_buffer_size`.
        shuffle_buffer_size (`int`, *optional*, defaults to 1000):
            Rows in the shuffle buffer of a streamed source (0: stream order).
        pack_batch_size (`int`, *optional*, defaults to 1000):
            Texts tokenised and packed together by one batched `map`; the tokens left over at the end of each
            such batch (fewer than `sample_tokens`) are dropped.
        dataset_num_proc (`int`, *optional*):
            Processes for tokenising and packing a non-streamed source.
        filler_tokens (`int`, *optional*, defaults to 1000000):
            Recall tasks: tokens of filler prose read from the source (a `dataset_name` source is streamed and
            read only this far).
        sample_tokens (`int`, *optional*, defaults to 1536):
            Tokens per training sample. Use several chunks and more than the temporary memory's window, so that
            the global memory has to carry information (see DESIGN "What a first training run taught us").
        eval_samples (`int`, *optional*, defaults to 4):
            Samples held out for evaluation.
        finetuning (`str`, *optional*, defaults to `"lora"`):
            `"lora"`: LoRA on the attention projections plus every memory parameter (`modules_to_save`);
            `"full"`: every parameter; `"memory"`: memory parameters only, base frozen.
        freeze_memory_modules (`str`, *optional*):
            Comma-separated names of memory modules to keep frozen whatever `finetuning` says, e.g.
            `"temp_norm,temp_adapter"` (the temporary memory's path) or `"gate"`; an unknown name is an error.
        lora_r (`int`, *optional*, defaults to 8), lora_alpha (`int`, *optional*, defaults to 16):
            LoRA rank and scaling.
        lora_target_modules (`str`, *optional*, defaults to `"q_proj,k_proj,v_proj,o_proj"`):
            Comma-separated module names LoRA adapts.
        memory_lr_multiplier (`float`, *optional*, defaults to 5.0):
            Learning rate of the memory parameters relative to `learning_rate` (the authors train them ~5x faster).
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow `model_name_or_path` to run code from its folder or repo. Off by default: a CoMeT checkpoint loads
            with this package's own classes, and the embedded default needs no remote code.
        task (`str`, *optional*, defaults to `"lm"`):
            `"lm"`: language modelling over packed samples. `"passkey"`, `"associative"` or `"mixed"`: recall samples
            (`training.recall_data`): facts planted in prose at a controlled distance in chunks, asked at the end.
        recall_chunks (`str`, *optional*, defaults to `"6,8"`):
            Length of a recall sample in chunks, `"min,max"` (at least `max distance + 1`).
        recall_lead_chunks (`str`, *optional*, defaults to `"0"`):
            Filler chunks before the farthest asked fact, `"min,max"` sampled per sample (`RecallSampleBuilder.lead_chunks`):
            so that facts are also written over a memory that already holds filler, as deep in a long document.
        repeat_filler_fraction (`float`, *optional*, defaults to 0.0):
            Share of recall samples whose filler is a few short sentences repeated (`training.recall_data.RepeatedFiller`,
            like the classic passkey prompt's filler but other sentences) instead of prose from the source.
        curriculum (`str`, *optional*, defaults to `"schedule"`):
            How the fact→question distance grows: `"schedule"` (a stage every `curriculum_stage_steps` steps),
            `"accuracy"` (a stage once answer exact-match reaches `curriculum_threshold` over `curriculum_window`
            batches) or `"none"` (the last stage from the start).
        curriculum_distances (`str`, *optional*, defaults to `"1,2,4,8"`):
            Largest distance, in chunks, of each stage; distances are drawn from `min_distance` up to it.
        curriculum_stage_steps (`int`, *optional*, defaults to 200), curriculum_threshold (`float`, *optional*,
        defaults to 0.9), curriculum_window (`int`, *optional*, defaults to 20), min_distance (`int`, *optional*,
        defaults to 0):
            See `curriculum`.
        num_keys (`int`, *optional*, defaults to 4), num_queries (`int`, *optional*, defaults to 2),
        key_digits (`int`, *optional*, defaults to 5):
            Facts planted and asked in associative samples; digits per key.
        boundary_fraction (`float`, *optional*, defaults to 0.25):
            Share of recall samples whose question ends exactly on a chunk boundary (the answer then starts a
            fresh window and must come from memory, as at inference when a prompt fills its last window).
        lm_fraction (`float`, *optional*, defaults to 0.0):
            Share of plain language-modelling samples mixed into recall training.
        lm_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the language-modelling loss on a recall sample's text, relative to 1 for its answers.
        temp_budget_choices (`str`, *optional*):
            Comma-separated temporary-memory budgets to sample one of per batch (e.g. `"0,16,32,64"`), so the
            global memory must carry what lies beyond the temporary window. Unset: the configured budget.
        recall_rows (`int`, *optional*, defaults to 100000):
            Rows of the (lazily built) recall dataset; one epoch is this many samples.
        init_trained_weights (`str`, *optional*):
            A trained-weights file (`convert.trained_weights`, e.g. `checkpoints/smollm2-comet-recall.safetensors`)
            to start from: its memory is loaded, and its LoRA factors initialise the adapter when the run trains
            LoRA of the same rank and alpha (so an export holds the whole change from the base) or are merged into
            the base otherwise. A run can so continue from shipped weights when its checkpoints (and optimizer
            state) are gone.
        max_train_minutes (`float`, *optional*):
            Wall-clock budget of one `train()` call: once spent, the run saves a checkpoint and ends as if
            `max_steps` had been reached (a lent GPU's minutes, a job's time limit). Unset: no budget.
        distill_weight (`float`, *optional*, defaults to 0.0), distill_hidden_weight (`float`, *optional*, defaults
        to 0.0), distill_teacher (`str`, *optional*):
            Context distillation: a frozen full-attention teacher (`distill_teacher`, by default the base model the
            CoMeT model is built on) reads each training sample whole, and every text token after the first chunk is
            pulled towards it: `distill_weight` × KL(teacher ‖ student) of the next-token distributions, plus
            `distill_hidden_weight` × the mean cosine distance of the per-layer hidden states. What the student
            lacks there is exactly what earlier chunks contributed, so every such token teaches the memory, not only
            the answer tokens. Samples must fit the teacher's positions. 0: off.
        pipeline_parallel (`int`, *optional*, defaults to 1):
            Layer-wavefront pipeline parallelism (DESIGN §1, `training.pipeline_trainer`): P ranks split each
            sample's chunks into P contiguous blocks and pass every layer's memory from rank to rank. Launch P × D
            processes (`torchrun`/`accelerate launch`): D data-parallel pipelines of P consecutive ranks. Samples need
            at least P chunks. Process groups use `ddp_timeout`, so a dead rank raises instead of hanging. 1: off.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "base causal LM or saved CoMeT model"})
    chunk_size: int = field(default=256, metadata={"help": "text tokens per chunk (new models)"})
    global_mem_size: int = field(default=8, metadata={"help": "global memory slots (new models)"})
    temp_beacon_stride: int = field(default=16, metadata={"help": "a beacon every N tokens, -1 disables (new models)"})
    temp_mem_budget: int = field(default=64, metadata={"help": "temporary memory entries kept (new models)"})
    global_write: str = field(default="readout", metadata={"help": "readout or window (new models)"})
    temp_write: str = field(default="beacon", metadata={"help": "beacon or tail (new models)"})
    fold_delay: int = field(default=0, metadata={"help": "tokens of the next chunk read before a chunk folds (new models)"})
    window_select_weight: float = field(default=0.0, metadata={"help": "supervision of the window choice"})
    train_files: str | None = field(default=None, metadata={"help": "comma-separated local text files"})
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets source (name or path)"})
    dataset_config: str | None = field(default=None, metadata={"help": "configuration name of dataset_name"})
    dataset_split: str = field(default="train", metadata={"help": "split of dataset_name"})
    text_field: str = field(default="text", metadata={"help": "text column of dataset_name or json/csv files"})
    streaming: bool = field(default=False, metadata={"help": "stream the source (needs max_steps)"})
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "shuffle buffer of a streamed source"})
    pack_batch_size: int = field(default=1000, metadata={"help": "texts tokenised and packed per map batch"})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "processes for packing (not streaming)"})
    filler_tokens: int = field(default=1_000_000, metadata={"help": "recall filler tokens read from the source"})
    sample_tokens: int = field(default=1536, metadata={"help": "tokens per training sample"})
    eval_samples: int = field(default=4, metadata={"help": "samples held out for evaluation"})
    finetuning: str = field(default="lora", metadata={"help": f"one of {FINETUNING_MODES}"})
    freeze_memory_modules: str | None = field(default=None, metadata={"help": "memory modules kept frozen"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "LoRA targets"})
    memory_lr_multiplier: float = field(default=5.0, metadata={"help": "memory lr / base lr"})
    trust_remote_code: bool = field(default=False, metadata={"help": "let model_name_or_path run its own code"})
    task: str = field(default="lm", metadata={"help": f"one of {TASKS}"})
    recall_chunks: str = field(default="6,8", metadata={"help": "recall sample length in chunks: min,max"})
    recall_lead_chunks: str = field(default="0", metadata={"help": "filler chunks before the farthest fact: min,max"})
    repeat_filler_fraction: float = field(default=0.0, metadata={"help": "share of samples with repeated filler"})
    curriculum: str = field(default="schedule", metadata={"help": f"one of {CURRICULUM_MODES}"})
    curriculum_distances: str = field(default="1,2,4,8", metadata={"help": "largest distance (chunks) per stage"})
    curriculum_stage_steps: int = field(default=200, metadata={"help": "steps per stage (schedule)"})
    curriculum_threshold: float = field(default=0.9, metadata={"help": "exact-match accuracy to move up (accuracy)"})
    curriculum_window: int = field(default=20, metadata={"help": "batches averaged for the accuracy curriculum"})
    min_distance: int = field(default=0, metadata={"help": "smallest fact-to-question distance in chunks"})
    num_keys: int = field(default=4, metadata={"help": "facts per associative sample"})
    num_queries: int = field(default=2, metadata={"help": "facts asked per associative sample"})
    key_digits: int = field(default=5, metadata={"help": "digits per key"})
    boundary_fraction: float = field(default=0.25, metadata={"help": "share of prompts ending on a chunk boundary"})
    lm_fraction: float = field(default=0.0, metadata={"help": "share of plain LM samples among recall samples"})
    lm_loss_weight: float = field(default=0.0, metadata={"help": "weight of the LM loss on recall text"})
    temp_budget_choices: str | None = field(default=None, metadata={"help": "temp budgets sampled per batch"})
    recall_rows: int = field(default=100_000, metadata={"help": "rows of the recall dataset"})
    init_trained_weights: str | None = field(default=None, metadata={"help": "trained-weights file to start from"})
    max_train_minutes: float | None = field(default=None, metadata={"help": "stop and save after this many minutes"})
    distill_weight: float = field(default=0.0, metadata={"help": "weight of KL(teacher || student) after chunk 0"})
    distill_hidden_weight: float = field(default=0.0, metadata={"help": "weight of the hidden-state cosine distance"})
    distill_teacher: str | None = field(default=None, metadata={"help": "full-attention teacher (default: the base)"})
    pipeline_parallel: int = field(default=1, metadata={"help": "ranks per layer-wavefront pipeline (P of P x D)"})

    def __post_init__(self):
        super().__post_init__()
        if self.finetuning not in FINETUNING_MODES:
            raise ValueError(f"finetuning must be one of {FINETUNING_MODES}, got {self.finetuning!r}")
        if self.sample_tokens < 2:
            raise ValueError(f"sample_tokens must be at least 2, got {self.sample_tokens}")
        if self.memory_lr_multiplier <= 0:
            raise ValueError(f"memory_lr_multiplier must be positive, got {self.memory_lr_multiplier}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.curriculum not in CURRICULUM_MODES:
            raise ValueError(f"curriculum must be one of {CURRICULUM_MODES}, got {self.curriculum!r}")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        if self.pipeline_parallel < 1:
            raise ValueError(f"pipeline_parallel must be at least 1 (1 disables it), got {self.pipeline_parallel}")
        if self.pipeline_parallel > 1 and (self.deepspeed or self.fsdp):
            raise ValueError("pipeline_parallel > 1 does not combine with DeepSpeed or FSDP: every pipeline rank holds "
                             "the whole model; data parallelism across pipelines is built in")
        if self.window_select_weight < 0:
            raise ValueError(f"window_select_weight must be non-negative, got {self.window_select_weight}")
        if self.window_select_weight and self.task == "lm":
            raise ValueError("window_select_weight needs a recall task (--task passkey|associative|mixed): "
                             "plain language modelling has no planted facts to look for")
        if self.window_select_weight and self.pipeline_parallel > 1:
            raise ValueError("window_select_weight is not supported with pipeline_parallel > 1 (each rank sees only "
                             "its own chunks' window choices)")
        if self.distill_weight < 0 or self.distill_hidden_weight < 0:
            raise ValueError("distill_weight and distill_hidden_weight must be non-negative")
        if self.distilling and self.pipeline_parallel > 1:
            raise ValueError("context distillation (distill_weight, distill_hidden_weight) needs the whole sample on "
                             "one rank; it does not combine with pipeline_parallel > 1")
        if self.streaming and self.task == "lm" and self.max_steps <= 0:
            raise ValueError(
                "--streaming reads the corpus as a stream, which has no length, so the number of training steps "
                "cannot be derived from num_train_epochs: set --max_steps (a positive number of optimizer steps)"
            )
        for name in ("pack_batch_size", "filler_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.repeat_filler_fraction <= 1.0:
            raise ValueError(f"repeat_filler_fraction must lie in [0, 1], got {self.repeat_filler_fraction}")
        if self.shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be non-negative, got {self.shuffle_buffer_size}")
        self.recall_chunk_range  # noqa: B018  (validates)
        self.recall_lead_range  # noqa: B018
        self.curriculum_distance_list  # noqa: B018
        self.temp_budget_list  # noqa: B018

    @property
    def distilling(self) -> bool:
        return self.distill_weight > 0 or self.distill_hidden_weight > 0

    @staticmethod
    def _int_list(name: str, text: str) -> list[int]:
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None

    def _int_range(self, name: str, low: int) -> tuple[int, int]:
        """The field ``name`` as ``(min, max)`` with ``low <= min <= max`` (one value: both)."""
        text = getattr(self, name)
        values = self._int_list(name, text)
        if len(values) == 1:
            values *= 2
        if len(values) != 2 or not low <= values[0] <= values[1]:
            raise ValueError(f"{name} must be 'min,max' with {low} <= min <= max, got {text!r}")
        return values[0], values[1]

    @property
    def recall_chunk_range(self) -> tuple[int, int]:
        return self._int_range("recall_chunks", 1)

    @property
    def recall_lead_range(self) -> tuple[int, int]:
        return self._int_range("recall_lead_chunks", 0)

    @property
    def curriculum_distance_list(self) -> list[int]:
        return self._int_list("curriculum_distances", self.curriculum_distances)

    @property
    def temp_budget_list(self) -> list[int]:
        values = self._int_list("temp_budget_choices", self.temp_budget_choices or "")
        if any(v < 0 for v in values):
            raise ValueError(f"temp_budget_choices must be non-negative, got {self.temp_budget_choices!r}")
        return values


__all__ = ["FINETUNING_MODES", "TASKS", "CometTrainingConfig"]
