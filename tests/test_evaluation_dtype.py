"""``--dtype auto``: bfloat16 where the device computes it natively, else float32; every result records the
resolved dtype, and a partial result of another dtype is never resumed under this one."""

import json

import pytest
import torch

from evaluation import common, forgetting_curve, passkey, scrolls
from tests.test_evaluation_resume import FIXTURES, model_folder  # noqa: F401  (fixture)


# ----------------------------------------------------------------------------------------------- resolution
def test_cpu_flags_are_read_from_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\nflags : x\n")
    assert common.cpu_flags(cpuinfo) == {"fpu", "sse", "avx512f", "avx512_bf16", "amx_tile"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "bf16" in common.cpu_flags(arm)
    assert common.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("machine", "flags", "native"),
    [
        ("x86_64", {"avx512f", "avx512_bf16"}, True),  # Cooper Lake, Zen 4, Sapphire Rapids
        ("x86_64", {"avx512f", "amx_bf16"}, True),
        ("x86_64", {"avx512f", "avx512bw", "avx2"}, False),  # bf16 only emulated: slower than fp32
        ("x86_64", {"bf16"}, False),  # an Arm flag name means nothing on x86
        ("aarch64", {"fp", "asimd", "bf16"}, True),  # Graviton 3, Neoverse V1
        ("aarch64", {"fp", "asimd"}, False),
    ],
)
def test_native_bf16_cpu_detection(monkeypatch, machine, flags, native):
    monkeypatch.setattr(common.platform, "machine", lambda: machine)
    assert common.cpu_has_native_bf16(frozenset(flags)) is native


def test_auto_resolves_by_device_support(monkeypatch):
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda flags=None: True)
    assert common.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda flags=None: False)
    assert common.resolve_dtype("auto", "cpu") == "float32"
    assert common.resolve_dtype("auto", "meta") == "float32"  # devices that are not probed keep fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.resolve_dtype("auto", "cuda:0") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert common.resolve_dtype("auto", "cuda") == "bfloat16"  # asked without emulation
    for explicit in ("float32", "bfloat16", "float16"):
        assert common.resolve_dtype(explicit, "cpu") == explicit
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'; choose from auto, float32"):
        common.resolve_dtype("fp8")


def test_cli_default_is_auto():
    for module in (forgetting_curve, passkey, scrolls):
        args = ["--model", "m", "--output-dir", "o", *(["--max-length", "8"] if module is forgetting_curve else [])]
        assert module.build_parser().parse_args(args).dtype == "auto"


def test_auto_loads_the_weights_in_the_resolved_dtype(model_folder, monkeypatch):  # noqa: F811
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda flags=None: True)
    model, _ = common.load_model_and_tokenizer(str(model_folder), dtype="auto")
    assert model.anchor.dtype == torch.bfloat16
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda flags=None: False)
    model, _ = common.load_model_and_tokenizer(str(model_folder), dtype="auto")
    assert model.anchor.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- recorded and resumed
def fc_args(tmp_path, model_folder, *extra):  # noqa: F811
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog while a cat sleeps in the sun. " * 20)
    return ["--model", str(model_folder), "--output-dir", str(tmp_path / "out"), "--text-files", str(text),
            "--no-progress", "--max-length", "24", "--num-points", "2", "--samples", "1", "--train-length", "64",
            *extra]  # fmt: skip


def test_forgetting_curve_records_the_resolved_dtype_and_refuses_to_mix(tmp_path, model_folder, monkeypatch):  # noqa: F811
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda flags=None: True)
    result = forgetting_curve.main(fc_args(tmp_path, model_folder))
    path = tmp_path / "out" / "forgetting_curve.json"
    saved = json.loads(path.read_text())
    assert result["dtype"] == saved["dtype"] == "bfloat16"

    partial = {**saved, "complete": False, "per_length": saved["per_length"][:1]}
    path.write_text(json.dumps(partial))
    with pytest.raises(FileExistsError, match="dtype: 'bfloat16' there, 'float32' now"):
        forgetting_curve.main(fc_args(tmp_path, model_folder, "--dtype", "float32"))
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda flags=None: False)
    with pytest.raises(FileExistsError, match="dtype: 'bfloat16' there, 'float32' now"):
        forgetting_curve.main(fc_args(tmp_path, model_folder))  # auto on a machine without bf16: float32
    resumed = forgetting_curve.main(fc_args(tmp_path, model_folder, "--dtype", "bfloat16"))
    assert resumed["complete"] and resumed["dtype"] == "bfloat16"


def test_a_partial_result_from_before_dtype_was_recorded_resumes_with_a_warning(tmp_path, model_folder, capsys):  # noqa: F811
    forgetting_curve.main(fc_args(tmp_path, model_folder, "--dtype", "float32"))
    path = tmp_path / "out" / "forgetting_curve.json"
    saved = json.loads(path.read_text())
    legacy = {key: value for key, value in saved.items() if key != "dtype"}
    path.write_text(json.dumps({**legacy, "complete": False, "per_length": saved["per_length"][:1]}))
    capsys.readouterr()
    resumed = forgetting_curve.main(fc_args(tmp_path, model_folder, "--dtype", "float32"))
    assert "written before dtype was recorded; resuming it as dtype 'float32'" in capsys.readouterr().err
    assert resumed["dtype"] == "float32" and resumed["per_length"] == saved["per_length"]


def test_passkey_and_scrolls_record_the_resolved_dtype(tmp_path, model_folder, monkeypatch):  # noqa: F811
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda flags=None: False)
    out = tmp_path / "passkey"
    result = passkey.main(["--model", str(model_folder), "--output-dir", str(out), "--lengths", "300",
                           "--num-depths", "1", "--no-progress"])  # fmt: skip
    assert result["dtype"] == json.loads((out / "passkey.json").read_text())["dtype"] == "float32"
    with pytest.raises(FileExistsError, match="complete result"):
        passkey.main(["--model", str(model_folder), "--output-dir", str(out), "--lengths", "300",
                      "--num-depths", "1", "--no-progress", "--dtype", "bfloat16"])  # fmt: skip

    out = tmp_path / "scrolls"
    result = scrolls.main(["--model", str(model_folder), "--output-dir", str(out), "--no-progress", "--tasks",
                           "contract_nli", "--data-files", f"contract_nli={FIXTURES / 'contract_nli.jsonl'}",
                           "--dtype", "bfloat16"])  # fmt: skip
    assert result["dtype"] == json.loads((out / "scrolls.json").read_text())["dtype"] == "bfloat16"
