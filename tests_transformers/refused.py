"""transformers' generic tests that CoMeT refuses by design, with the reason (shown in the README's Limitations).

`tests/test_transformers_refusals_documented.py` (default suite) checks that the README lists exactly these.
Each runs as a strict xfail in `make test-transformers`: it must fail, so a test that starts passing is reported.
"""

REFUSED: dict[str, str] = {}
