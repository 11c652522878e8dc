"""The command line: answers, bad input and exit codes (scripted models, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmflow import cli


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"\x00\x01binary", "looks binary")],
)
def test_unusable_files_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                               message: str) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    code, _, err = run(capsys, "run", "--context", str(path), "--query", "q")
    assert code == 3 and message in err


def test_missing_file_and_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "run", "--context", str(tmp_path / "nope.txt"), "--query", "q")
    assert code == 3 and "no such file" in err
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    code, _, err = run(capsys, "run", "--context", str(doc), "--query", "q", "--root", "nosuch:model")
    assert code == 2 and "unknown provider" in err


def test_non_utf8_is_decoded_with_a_warning(tmp_path: Path) -> None:
    from rlmflow import load_context_files

    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    loaded = load_context_files([path, path])
    assert isinstance(loaded.context, dict) and list(loaded.context) == ["latin1.txt", "latin1.txt#2"]
    assert "not valid UTF-8" in loaded.warnings[0] and "\ufffd" in loaded.context["latin1.txt"]
