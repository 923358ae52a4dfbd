"""The README lists exactly the transformers generic tests that `make test-transformers` expects CoMeT to refuse."""

import re
from pathlib import Path

from tests_transformers.refused import REFUSED, readme_block


def test_readme_lists_the_refused_transformers_tests_with_their_reasons():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- refused-tests:start -->\n(.*?)\n<!-- refused-tests:end -->", readme, re.S)
    assert block is not None, "README.md lacks the refused-tests block"
    assert block.group(1) == readme_block()  # regenerate with tests_transformers.refused.readme_block()
    assert set(re.findall(r"`(test_\w+)`", block.group(1))) == set(REFUSED)
    assert all(reason and not reason.endswith(".") for reason in REFUSED.values())
