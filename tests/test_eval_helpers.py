"""The sandbox helpers small roots use: grep() and chunks(), in a real worker."""

from __future__ import annotations

from typing import Any

import pytest

from rlmflow import LocalSandbox

pytestmark = pytest.mark.anyio

DOC = "".join(f"line {i}: nothing here\n" for i in range(2000)).replace(
    "line 700: nothing here", "line 700: the key is under the third trapdoor (cost $5)"
)


async def no_host(fn: str, args: dict[str, Any]) -> Any:
    raise AssertionError(f"unexpected host call {fn}")


async def test_grep_and_chunks_in_the_worker() -> None:
    async with LocalSandbox().session(DOC, no_host) as sandbox:
        shown = await sandbox.execute("grep('TRAPDOOR', window=20)")
        assert shown.error is None
        assert "1 match(es)" in shown.output and "@" in shown.output and "third trapdoor" in shown.output
        hits = await sandbox.execute("h = grep('trapdoor', window=10)\nprint(len(h), h.positions, h[0][:40])")
        offset = DOC.find("trapdoor")
        assert hits.output.strip().startswith(f"1 [(None, {offset})]")
        bad_regex = await sandbox.execute("print(len(grep('cost $5)')))")  # not a valid regex: searched literally
        assert bad_regex.error is None and bad_regex.output.strip() == "1"
        none = await sandbox.execute("grep('absent words')")
        assert "no match" in none.output
        capped = await sandbox.execute("g = grep('nothing', window=5, max_hits=3)\nprint(len(g), g.total)")
        assert capped.output.strip() == "3 1999"
        pieces = await sandbox.execute(
            "c = chunks(7)\nprint(len(c), ''.join(c) == context, all(p.endswith('\\n') for p in c))"
        )
        assert pieces.error is None
        count, joined, at_line_ends = pieces.output.split()
        assert int(count) == 7 and joined == "True" and at_line_ends == "True"
        sized = await sandbox.execute(
            "c = chunks(5000)\nprint(len(c), max(map(len, c)) <= 5000, ''.join(c) == context)"
        )
        n, fits, whole = sized.output.split()
        assert int(n) >= len(DOC) // 5000 and fits == "True" and whole == "True"
        summary = await sandbox.execute("chunks(3)")
        assert summary.output.startswith("3 chunk(s)") and len(summary.output) < 1000  # a summary, not the text
        wrong = await sandbox.execute("chunks(0)")
        assert wrong.error is not None and "at least 1" in wrong.error


async def test_helpers_on_a_dict_context() -> None:
    docs = {"a.txt": "alpha beta", "b.txt": "gamma beta delta"}
    async with LocalSandbox().session(docs, no_host) as sandbox:
        found = await sandbox.execute("print(grep('beta', window=0).positions)")
        assert found.output.strip() == "[('a.txt', 6), ('b.txt', 6)]"
        joined = await sandbox.execute("c = chunks(1)\nprint(len(c), \"=== document 'b.txt' ===\" in c[0])")
        assert joined.output.strip() == "1 True"


async def test_established_lists_what_the_last_cell_set() -> None:
    async with LocalSandbox().session(DOC, no_host) as sandbox:
        first = await sandbox.execute("_x = 1")
        assert first.established == ""  # nothing set: private names, the API and helpers are not the model's
        shown = await sandbox.execute("import re\nhits = [m.start() for m in re.finditer('trapdoor', context)]\nn = 3")
        assert shown.established.splitlines() == [f"hits = [{DOC.find('trapdoor')}] (list, 1 items)", "n = 3 (int)"]
        again = (await sandbox.execute("hits.append(5)\ntext = 'x' * 500")).established.splitlines()
        assert again[0].startswith("hits = [") and again[0].endswith("(list, 2 items)")
        assert again[1].startswith("text = 'xxxx") and "..." in again[1] and again[1].endswith("(str, 500 characters)")
        assert (await sandbox.execute("pass")).established == ""


async def test_cell_code_cannot_redefine_what_is_reported_or_run_host_code_unrecorded() -> None:
    async with LocalSandbox().session(DOC, no_host) as sandbox:
        forged = await sandbox.execute(
            "_rlmflow_established = lambda *a, **k: 'FORGED'\nimport helpers_prelude\n"
            "helpers_prelude._established_for = lambda *a: (lambda *b, **c: 'FORGED')\nm = 1"
        )
        assert "FORGED" not in forged.established and "m = 1 (int)" in forged.established
