"""A benchmark rerun never replaces an earlier result: it stops before any work unless --overwrite."""

import importlib

import pytest

# (module, argv builder, the file an earlier run left there)
CASES = [
    ("benchmarks.comet_entrypoints_memory", lambda d: ["--output-dir", str(d)], "comet_entrypoints_memory.json"),
    ("benchmarks.comet_fold_delay", lambda d: ["--output-dir", str(d)], "fold_delay.png"),
    ("benchmarks.comet_lm_loss", lambda d: ["--comet", "x", "--output", str(d / "loss.json")], "loss.json"),
    ("benchmarks.comet_scaling", lambda d: ["--output-dir", str(d)], "comet_scaling.json"),
    ("benchmarks.ram_latency", lambda d: ["--output_dir", str(d)], "ram_latency.json"),
    ("benchmarks.ram_synthetic", lambda d: ["--output_dir", str(d)], "ram_synthetic.md"),
    ("benchmarks.gpu_checks", lambda d: ["--output", str(d / "gpu.json")], "gpu.json"),
    ("benchmarks.pipeline_memory_4b", lambda d: ["--out", str(d / "four_b.json")], "four_b.json"),
    ("benchmarks.pipeline_scaling", lambda d: ["--out", str(d)], "pipeline_scaling.json"),
]


@pytest.mark.parametrize("module, argv, earlier", CASES, ids=[case[0].split(".")[1] for case in CASES])
def test_a_rerun_stops_before_any_work_and_keeps_the_earlier_result(module, argv, earlier, tmp_path, monkeypatch):
    entry = importlib.import_module(module)
    kept = tmp_path / earlier
    kept.write_text("an earlier run's result")

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark started working")

    for name in ("run_worker", "measure", "smollm2_path", "comet_default_path"):  # what each would start with
        if hasattr(entry, name):
            monkeypatch.setattr(entry, name, no_work)
    with pytest.raises((FileExistsError, SystemExit), match="holds an earlier result"):
        entry.main(argv(tmp_path))
    assert kept.read_text() == "an earlier run's result"
    assert "--overwrite" in _help(entry, monkeypatch)


def _help(entry, monkeypatch):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        entry.main(["--help"])
    return out.getvalue()
