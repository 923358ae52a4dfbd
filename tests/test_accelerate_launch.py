"""The data-parallel recipes (`training/recipes/accelerate_*.yaml`) under `accelerate launch`, on CPU with gloo.

Each run trains a tiny CoMeT (LoRA + memory) for two steps through the real entry point with two processes and
one sample per process, and must end with exactly the weights of one process training on both samples as one
batch: the gradients were averaged across the processes (the processes took different samples, so a run
without the all-reduce ends elsewhere). A child script around `training.comet_trainer.main` writes, per rank,
what that rank saw.

accelerate 1.15 turns FSDP off when `use_cpu` is set (FSDP is only enabled for GPU-like distributed types), so
the FSDP run sets the distributed type back to FSDP in its processes, and gathers the sharded state dict that
`get_model_state_dict(cpu_offload=True)` leaves sharded on CPU; the recipe itself is used unchanged otherwise.
DeepSpeed ZeRO-2 runs on its CPU accelerator (gloo) where `deepspeed` is installed (`pip install -e .[deepspeed]`;
it installs without compiling); without it that test is skipped and only the recipe's schema is checked.
"""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_lm_data import VOCAB, documents, tiny_base  # noqa: F401  (tiny_base is a fixture)

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "training" / "recipes"

# Runs `training.comet_trainer.main(argv)` and writes rank<N>.json into OUT: world size, the model class each
# training step ran, the batches it took, the run's summary and the step losses.
CHILD = """
import json, os, sys
FSDP_ON_CPU = os.environ.get("TEST_FSDP_ON_CPU") == "1"
if FSDP_ON_CPU:
    import accelerate
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    state.AcceleratorState.__init__ = init_fsdp_on_cpu
    get_state_dict = accelerate.Accelerator.get_state_dict

    def gathered_state_dict(self, model, unwrap=True):
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in get_state_dict(self, model, unwrap).items()}

    accelerate.Accelerator.get_state_dict = gathered_state_dict

if os.environ.get("TEST_DEEPSPEED_NO_SHM") == "1":  # all-reduce through gloo, not a C++ op built on first use
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (`deepspeed.comm.torch` is torch)

import training.comet_trainer as ct

trainers, batches, kinds, units = [], [], [], set()
init_trainer, compute_loss = ct.CometTrainer.__init__, ct.CometTrainer.compute_loss

def init_and_keep(self, *args, **kwargs):
    init_trainer(self, *args, **kwargs)
    trainers.append(self)

def loss_and_record(self, model, inputs, *args, **kwargs):
    if model.training:
        batches.append(inputs["input_ids"].tolist())
        kinds.append(type(model).__name__)
        units.update(type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP"))
    return compute_loss(self, model, inputs, *args, **kwargs)

ct.CometTrainer.__init__, ct.CometTrainer.compute_loss = init_and_keep, loss_and_record
summary = ct.main(sys.argv[2:])
trainer = trainers[0]
info = {
    "rank": trainer.args.process_index, "world": trainer.args.world_size, "fsdp": bool(trainer.is_fsdp_enabled),
    "kinds": kinds, "batches": batches, "summary": summary, "fsdp_units": sorted(units),
    "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
}
with open(os.path.join(sys.argv[1], f"rank{info['rank']}.json"), "w") as f:
    json.dump(info, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("accelerate") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(300, seed=6)))
    return path


def train_argv(base: Path, corpus: Path, out: Path, batch_size: int, streaming: bool = False) -> list[str]:
    stream = ["--streaming", "--shuffle_buffer_size", "0"] if streaming else []
    return [*stream,
        "--model_name_or_path", str(base), "--train_files", str(corpus), "--output_dir", str(out),
        "--chunk_size", "8", "--global_mem_size", "2", "--temp_beacon_stride", "4", "--temp_mem_budget", "4",
        "--sample_tokens", "24", "--eval_samples", "2", "--per_device_train_batch_size", str(batch_size),
        "--max_steps", "2", "--learning_rate", "1e-2", "--optim", "sgd", "--logging_steps", "1", "--seed", "0",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--dataloader_num_workers", "0",
    ]  # fmt: skip


def run_reference(base: Path, corpus: Path, folder: Path, streaming: bool):
    """One process, both samples of each step in one batch: what the data-parallel runs must reproduce."""
    from training.comet_trainer import main

    summary = main(train_argv(base, corpus, folder / "run", batch_size=2, streaming=streaming))
    return summary, load_file(folder / "run" / "comet_trained.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_base, corpus, tmp_path_factory):  # noqa: F811
    return run_reference(tiny_base, corpus, tmp_path_factory.mktemp("reference"), streaming=False)


@pytest.fixture(scope="module")
def reference_stream(tiny_base, corpus, tmp_path_factory):  # noqa: F811
    return run_reference(tiny_base, corpus, tmp_path_factory.mktemp("reference_stream"), streaming=True)


def cpu_copy(recipe: str, folder: Path) -> Path:
    """The recipe with `use_cpu: true` (the only change), as a test on CPU runs it."""
    config = yaml.safe_load((RECIPES / recipe).read_text())
    assert config["use_cpu"] is False and config["num_processes"] == 2
    config["use_cpu"] = True
    path = folder / recipe
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config_file: Path, argv: list[str], folder: Path, env_extra: dict | None = None) -> list[dict]:
    child = folder / "child.py"
    child.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "--main_process_port", str(free_port()), str(child), str(folder), *argv,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = sorted((json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], result.stderr[-2000:]
    return ranks


def check_data_parallel_run(ranks: list[dict], out: Path, reference) -> None:
    ref_summary, ref_weights = reference
    assert all(r["world"] == 2 for r in ranks)
    # Both ranks trained every step, on one sample each, and not the same ones.
    assert [len(r["batches"]) for r in ranks] == [2, 2]
    assert all(len(batch) == 1 for r in ranks for batch in r["batches"])
    assert ranks[0]["batches"] != ranks[1]["batches"]
    for r in ranks:
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 2
        assert math.isfinite(r["summary"]["eval_loss_before"]) and math.isfinite(r["summary"]["eval_loss_after"])
    weights = load_file(out / "comet_trained.safetensors")
    assert set(weights) == set(ref_weights)
    lora_b = [k for k in weights if "lora_B" in k]
    assert lora_b and all(weights[k].abs().max() > 0 for k in lora_b)  # LoRA B starts at zero: it trained
    for key, value in weights.items():  # averaged gradients: the single-process run on the global batch
        torch.testing.assert_close(value, ref_weights[key], rtol=1e-5, atol=1e-6, msg=key)
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("comet_memory" in k for k in adapter)


def test_ddp_recipe_averages_gradients_over_two_cpu_processes_on_a_stream(
    tiny_base, corpus, reference_stream, tmp_path  # noqa: F811
):
    """DDP on a streamed corpus: rows 0-1 are held out, then steps take rows 2-3 and 4-5, one per rank."""
    from tests.test_lm_data import expected_rows

    out = tmp_path / "run"
    argv = train_argv(tiny_base, corpus, out, 1, streaming=True)
    ranks = launch(cpu_copy("accelerate_ddp.yaml", tmp_path), argv, tmp_path)
    assert all(set(r["kinds"]) == {"DistributedDataParallel"} for r in ranks)
    rows = expected_rows([json.loads(line)["text"] for line in corpus.read_text().splitlines()], 24, 1000)
    assert ranks[0]["batches"] == [[rows[2]], [rows[4]]] and ranks[1]["batches"] == [[rows[3]], [rows[5]]]
    check_data_parallel_run(ranks, out, reference_stream)


def test_fsdp_recipe_shards_and_matches_one_process(tiny_base, corpus, reference, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    ranks = launch(
        cpu_copy("accelerate_fsdp.yaml", tmp_path), train_argv(tiny_base, corpus, out, 1), tmp_path,
        env_extra={"TEST_FSDP_ON_CPU": "1"},
    )  # fmt: skip
    assert all(r["fsdp"] and set(r["kinds"]) == {"FSDPPeftModelForCausalLM"} for r in ranks)  # FSDP2 fully_shard
    # every decoder layer is its own unit, found through the model's `_no_split_modules` (the recipe names none)
    assert all("FSDPLlamaDecoderLayer" in r["fsdp_units"] for r in ranks), ranks[0]["fsdp_units"]
    check_data_parallel_run(ranks, out, reference)


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (`pip install -e .[deepspeed]`); the recipe's schema is tested below",
)
def test_deepspeed_zero2_recipe_matches_one_process(tiny_base, corpus, reference, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    ranks = launch(
        cpu_copy("accelerate_deepspeed_zero2.yaml", tmp_path), train_argv(tiny_base, corpus, out, 1), tmp_path,
        env_extra={"TEST_DEEPSPEED_NO_SHM": "1"},
    )  # fmt: skip
    assert all(set(r["kinds"]) == {"DeepSpeedEngine"} for r in ranks)
    check_data_parallel_run(ranks, out, reference)


@pytest.mark.parametrize(
    ("recipe", "kind"),
    [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp.yaml", "FSDP"),
     ("accelerate_deepspeed_zero2.yaml", "DEEPSPEED")],
)  # fmt: skip
def test_recipes_parse_and_document_their_launch_command(recipe, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(RECIPES / recipe))  # refuses unknown keys
    assert config.distributed_type.value == kind and config.num_processes == 2 and not config.use_cpu
    text = (RECIPES / recipe).read_text()
    assert f"accelerate launch --config_file training/recipes/{recipe}" in text
    assert "-m training.comet_trainer --config training/recipes/" in text
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
