"""Puts the `tests/` folder of the installed transformers release on the path as the package `transformers_tests`.

`make test-transformers` (scripts/transformers_conformance.sh) prepares it: it copies the `tests/` folder of a
transformers checkout (`TRANSFORMERS_SRC`) or of the release's tagged source archive into
`$TRANSFORMERS_TESTS_ROOT/transformers_tests`, and runs pytest on this folder. The relative imports inside
transformers' tests (`from .generation.test_utils import ...`) work under that name, and it cannot clash with this
repository's own `tests` package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests_transformers.refused import REFUSED

ROOT = os.environ.get("TRANSFORMERS_TESTS_ROOT")
if not ROOT or not (Path(ROOT) / "transformers_tests" / "test_modeling_common.py").is_file():
    raise pytest.UsageError(
        "TRANSFORMERS_TESTS_ROOT must name a folder holding transformers_tests/ (the tests/ folder of the installed "
        "transformers release); run `make test-transformers`, which prepares it."
    )
sys.path.insert(0, ROOT)

# Markers transformers' own conftest registers; registered here so that they are known, not silently typos.
MARKERS = ("generate", "torch_compile_test", "torch_export_test", "flash_attn_test", "flash_attn_3_test",
           "flash_attn_4_test", "training_ci", "is_training_test", "is_pipeline_test", "is_staging_test",
           "accelerate_tests", "bitsandbytes", "not_device_test", "tensor_parallel_ci")  # fmt: skip


def pytest_configure(config):
    for marker in MARKERS:
        config.addinivalue_line("markers", f"{marker}: transformers test marker")


def pytest_collection_modifyitems(config, items):
    """A test CoMeT refuses by design must fail (strict xfail): if it passes, the list is out of date."""
    for item in items:
        reason = REFUSED.get(item.originalname if hasattr(item, "originalname") else item.name)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"refused by design: {reason}"))


from tests.conftest import single_thread  # noqa: E402, F401  (the same one-thread fixture as the main suite)
