"""CoMeT's model files check the transformers floor on import, as RAM's do: a checkpoint carries
`requirements.py`, and loading it by remote code under an older transformers stops with the version to install."""

import os
import subprocess
import sys
import textwrap

from modeling_comet.requirements import MIN_TRANSFORMERS_VERSION
from tests.test_comet_model import BLOCK_THIS_PACKAGE, tiny_comet


def test_comet_checkpoint_code_stops_on_an_older_transformers_with_the_version_to_install(tmp_path):
    folder = tmp_path / "comet"
    tiny_comet().save_pretrained(folder)
    code = {path.name for path in folder.glob("*.py")}
    assert code == {"configuration_comet.py", "modeling_comet.py", "pipeline_comet.py", "position_layout.py",
                    "requirements.py"}
    script = BLOCK_THIS_PACKAGE + textwrap.dedent(
        f"""
        import transformers
        transformers.__version__ = "5.1.0"  # what an older installation reports
        from transformers import AutoConfig, AutoModelForCausalLM
        for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
            try:
                load({str(folder)!r}, trust_remote_code=True)
            except ImportError as error:
                print("IMPORT-ERROR", error)
            else:
                print("LOADED")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    expected = (f"IMPORT-ERROR This model's code needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers "
                f"5.1.0 is installed. Upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'")  # fmt: skip
    assert result.stdout.splitlines() == [expected, expected], result.stdout + result.stderr[-2000:]
