"""The embedded default CoMeT model: SmolLM2-135M-Instruct with the memory configuration of our first runs.

    python -m convert.comet_default        # prints the folder, building it on first use

Memory: chunk 256, 8 global slots, a beacon every 16 tokens, temporary budget 64 (four chunks).
The folder is cached under ``$COMET_CACHE`` (default ``~/.cache/comet``); weights trained later can
replace it by writing a checkpoint there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .smollm2 import cache_root, smollm2_path

DEFAULT_MEMORY = dict(chunk_size=256, global_mem_size=8, temp_beacon_stride=16, temp_mem_budget=64)


def comet_default_path(force: bool = False) -> Path:
    """Folder of the default CoMeT model, loadable with ``from_pretrained(..., trust_remote_code=True)``."""
    target = cache_root() / "smollm2-comet"
    if (target / "config.json").is_file() and not force:
        return target
    from .to_comet import convert

    return convert(smollm2_path(), target, **DEFAULT_MEMORY)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    print(comet_default_path(force=parser.parse_args(argv).force))


if __name__ == "__main__":
    main()
