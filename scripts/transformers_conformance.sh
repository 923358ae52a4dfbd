#!/usr/bin/env bash
# make test-transformers: transformers' own ModelTesterMixin, GenerationTesterMixin and ConfigTester on tiny CoMeT
# models (tests_transformers/), with the mixins taken from the tests/ folder of the installed transformers release.
#
#   TRANSFORMERS_SRC=/path/to/transformers-checkout make test-transformers   # a checkout of the installed version
#   make test-transformers                                                   # else: the tagged source archive
#
# Without TRANSFORMERS_SRC the tagged archive (github.com/huggingface/transformers/archive/refs/tags/vX.Y.Z.tar.gz) is
# downloaded once into $COMET_CACHE/transformers-tests/ (default ~/.cache/comet; TRANSFORMERS_ARCHIVE_URL overrides the
# address, e.g. a mirror). The PyPI sdist will not do: it lacks tests/generation and tests/exporters.
# Extra arguments go to pytest: make test-transformers ARGS="-k generate".
# Tests CoMeT refuses by design (tests_transformers/refused.py, listed in the README) run as strict xfails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
VERSION=$("$PYTHON" -c "import transformers; print(transformers.__version__)")
CACHE=${COMET_CACHE:-$HOME/.cache/comet}/transformers-tests
ROOT=$CACHE/root-$VERSION   # holds transformers_tests/ (a copy of tests/) and utils/ (tests import utils/test_module)

fail() { echo "error: $*" >&2; exit 2; }

if [ -n "${TRANSFORMERS_SRC:-}" ]; then
    SRC=$TRANSFORMERS_SRC
    [ -f "$SRC/tests/test_modeling_common.py" ] || fail "TRANSFORMERS_SRC=$SRC has no tests/test_modeling_common.py"
    [ -f "$SRC/tests/generation/test_utils.py" ] || fail "TRANSFORMERS_SRC=$SRC has no tests/generation/test_utils.py \
(the PyPI sdist lacks it: use a git checkout or the tagged source archive)"
    if [ -f "$SRC/src/transformers/__init__.py" ]; then
        SRC_VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SRC/src/transformers/__init__.py")
        [ "$SRC_VERSION" = "$VERSION" ] || fail "TRANSFORMERS_SRC=$SRC is transformers $SRC_VERSION, but $VERSION is \
installed: check out tag v$VERSION"
    else
        echo "warning: $SRC has no src/transformers/__init__.py, so its version cannot be checked against the installed \
$VERSION" >&2
    fi
else
    SRC=$CACHE/transformers-$VERSION
    if [ ! -f "$SRC/tests/generation/test_utils.py" ]; then
        URL=${TRANSFORMERS_ARCHIVE_URL:-https://github.com/huggingface/transformers/archive/refs/tags/v$VERSION.tar.gz}
        echo "downloading the tests of transformers $VERSION from $URL"
        mkdir -p "$CACHE"
        "$PYTHON" - "$URL" "$CACHE" "$VERSION" <<'EOF'
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

url, cache, version = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
target = cache / f"transformers-{version}"
with tempfile.TemporaryDirectory(dir=cache) as tmp:
    archive = Path(tmp) / "source.tar.gz"
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:
        sys.exit(f"error: cannot download {url} ({error}); pass TRANSFORMERS_SRC=<a checkout of v{version}> instead")
    with tarfile.open(archive) as tar:
        top = f"transformers-{version}/"
        wanted = [m for m in tar.getmembers() if m.name.startswith((top + "tests/", top + "utils/", top + "src/transformers/__init__.py"))]
        tar.extractall(tmp, members=wanted, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    (Path(tmp) / f"transformers-{version}").rename(target)  # whole or not at all
EOF
    fi
fi

# Fresh copy under a package name that cannot clash with this repository's own `tests` package.
rm -rf "$ROOT"
mkdir -p "$ROOT"
cp -r "$SRC/tests" "$ROOT/transformers_tests"
[ -d "$SRC/utils" ] && cp -r "$SRC/utils" "$ROOT/utils"

# transformers' test dependencies the mixins import (its `testing` extra); installed only when missing.
"$PYTHON" -c "import parameterized, httpx, pytest" 2>/dev/null || "$PYTHON" -m pip install -q parameterized httpx pytest

echo "transformers $VERSION mixins from $SRC"
TRANSFORMERS_TESTS_ROOT=$ROOT OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests_transformers -rfEX "$@"
