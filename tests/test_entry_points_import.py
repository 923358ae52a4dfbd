"""Every command-line module of the package imports: a refactor that removes a name another CLI imports (as once
happened to `benchmarks.ram_synthetic`) fails here instead of on a user's first run."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for package in ("benchmarks", "convert", "evaluation", "scripts", "training")
    for path in (ROOT / package).glob("*.py")
    if 'if __name__ == "__main__"' in path.read_text()
)


def test_the_command_line_modules_are_found():
    assert {"benchmarks.ram_synthetic", "evaluation.passkey", "training.comet_trainer"} <= set(CLI_MODULES)


@pytest.mark.parametrize("module", CLI_MODULES)
def test_command_line_module_imports(module):
    loaded = importlib.import_module(module)
    assert callable(getattr(loaded, "main", None)), f"{module} has no main()"
