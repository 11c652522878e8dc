"""The code users copy type-checks under ``mypy --strict``: the README's Python, ``examples/``, and
reading a cancelled run's ``.partial``; a root that is no model does not."""

from __future__ import annotations

import re
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[1]

PARTIAL = """\
from rlmflow import RLM, RLMResult, partial_result

async def main(rlm: RLM) -> int:
    try:
        await rlm.run("doc", "q?")
    except BaseException as exc:
        done: RLMResult | None = partial_result(exc)
        return 0 if done is None else len(done.calls)
    return 0
"""

NOT_A_MODEL = """\
from rlmflow import RLM

RLM(root=42)
"""


def test_what_users_copy_type_checks_strictly_and_a_wrong_root_does_not(tmp_path: Path) -> None:
    sources = {f"readme_{i}.py": block for i, block in enumerate(re.findall(
        r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S))}
    assert sources, "the README shows Python"
    sources |= {"partial.py": PARTIAL, "not_a_model.py": NOT_A_MODEL}
    for name, code in sources.items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    files = [str(tmp_path / name) for name in sources] + [str(p) for p in sorted((ROOT / "examples").glob("*.py"))]
    # one mypy run for all (it reads rlmflow and its dependencies once); errors inside them are not ours here
    stdout, stderr, _ = api.run(["--strict", "--follow-imports=silent", "--no-error-summary",
                                 "--cache-dir", str(tmp_path / "cache"), *files])
    errors = [line for line in (stdout + stderr).splitlines() if ": error:" in line]
    wrong_root = [line for line in errors if "not_a_model.py" in line]
    assert wrong_root and "root" in wrong_root[0]
    assert [line for line in errors if "not_a_model.py" not in line] == []


def test_a_root_or_sub_that_is_no_model_is_refused_at_once() -> None:
    import pytest

    from rlmflow import RLM, ConfigurationError

    with pytest.raises(ConfigurationError, match="not int"):
        RLM(root=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not dict"):
        RLM(root="local:qwen2.5-coder-0.5b", sub={"model": "x"})  # type: ignore[arg-type]
