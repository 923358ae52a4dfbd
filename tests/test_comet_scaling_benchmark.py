"""benchmarks.comet_scaling: ``--dtypes`` parsing and the per-dtype summary (no model runs here)."""

import argparse

import pytest

from benchmarks import comet_scaling


def test_dtypes_option_parses_and_refuses_unknown_or_repeated_names():
    assert comet_scaling.parse_dtypes("float32,bfloat16") == ["float32", "bfloat16"]
    assert comet_scaling.parse_dtypes(" bfloat16 ") == ["bfloat16"]
    for bad in ("float32,fp8", "float32,float32", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="--dtypes takes distinct names from float32"):
            comet_scaling.parse_dtypes(bad)


def point(kind, length, dtype, seconds):
    result = {"model": "tiny", "kind": kind, "length": length, "median_s": seconds, "peak_rss_mib": 400.0,
              "input_rss_mib": 20.0, "ms_per_1k_tokens": 1e6 * seconds / length}  # fmt: skip
    if dtype is not None:
        result["dtype"] = dtype
    return result


def test_summary_reports_each_dtype_and_the_speedup_over_the_first():
    results = [point("comet", 8192, "float32", 1.0), point("comet", 8192, "bfloat16", 0.4),
               point("comet", 32768, "float32", 4.4), point("comet", 32768, "bfloat16", 2.0),
               point("full_attention", 8192, "float32", 0.8)]  # fmt: skip
    summary = comet_scaling.summarise(results, ["float32", "bfloat16"])
    assert summary["float32"]["tiny_time_per_token_ratio"]["ratio"] == pytest.approx(1.1)
    assert summary["bfloat16"]["tiny_time_per_token_ratio"]["ratio"] == pytest.approx(1.25)
    speedups = {(s["kind"], s["length"]): s["speedup"] for s in summary["speedup_over_float32"]}
    assert speedups == {("comet", 8192): pytest.approx(2.5), ("comet", 32768): pytest.approx(2.2)}
    # One dtype: the flat summary the recorded results have; results from before --dtypes count as float32.
    legacy = [point("comet", 8192, None, 1.0), point("comet", 32768, None, 4.4)]
    assert comet_scaling.summarise(legacy)["tiny_time_per_token_ratio"]["ratio"] == pytest.approx(1.1)


def test_memory_fields_option_parses_values_and_refuses_unknown_fields():
    fields = comet_scaling.parse_fields(["global_write=window", "temp_write=tail", "fold_delay=32"])
    assert fields == {"global_write": "window", "temp_write": "tail", "fold_delay": 32}
    for bad in ("chunk=256", "fold_delay", "base_config=x"):
        with pytest.raises(ValueError, match="FIELD=VALUE with a CometConfig field"):
            comet_scaling.parse_fields([bad])
