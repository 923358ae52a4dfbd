"""CoMeT training under torchrun with two CPU processes (gloo): the same entry point as on GPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_convert import save_tiny_base


def test_torchrun_two_processes_trains_and_saves(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{3 + (i * 7) % 90}" for i in range(4000)))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
        "-m", "training.comet_trainer",
        "--model_name_or_path", str(base), "--train_files", str(corpus), "--output_dir", str(out),
        "--chunk_size", "16", "--global_mem_size", "4", "--temp_beacon_stride", "4", "--temp_mem_budget", "8",
        "--sample_tokens", "64", "--max_steps", "4", "--per_device_train_batch_size", "2", "--use_cpu",
        "--report_to", "none", "--save_strategy", "no", "--eval_samples", "2", "--learning_rate", "1e-3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("{'eval_loss_before'")]
    assert summary, result.stdout[-2000:]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert "comet_memory" in saved["modules_to_save"]
    assert (out / "adapter_model.safetensors").is_file()
