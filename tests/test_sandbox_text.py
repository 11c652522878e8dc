"""sanitize_text: what model code prints reaches the root model and terminals without escapes."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from rlmflow._text import sanitize_text

_LEFT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def test_plain_text_tabs_and_newlines_are_kept() -> None:
    assert sanitize_text("a\tb\nc — ünïcode") == "a\tb\nc — ünïcode"
    assert sanitize_text("line\r\nnext") == "line\nnext"


def test_escape_sequences_are_removed() -> None:
    assert sanitize_text("\x1b[31mred\x1b[0m") == "red"
    assert sanitize_text("\x1b[2J\x1b[Hclear") == "clear"
    assert sanitize_text("\x1b]0;owned title\x07after") == "after"
    assert sanitize_text("\x1b]52;c;ZWNobyBoaQ==\x1b\\clip") == "clip"
    assert sanitize_text("\x9b31mC1 csi") == "C1 csi"
    assert sanitize_text("\x1bPdcs payload\x1b\\x") == "x"
    assert sanitize_text("\x1bcreset") == "reset"


def test_lone_controls_are_shown_escaped() -> None:
    assert sanitize_text("over\rwrite") == "over\\x0dwrite"
    assert sanitize_text("bell\x07 nul\x00 bs\x08 del\x7f") == "bell\\x07 nul\\x00 bs\\x08 del\\x7f"
    assert sanitize_text("trailing esc \x1b") == "trailing esc \\x1b"
    assert sanitize_text("rtl \u202egnp.exe") == "rtl \\u202egnp.exe"


@given(st.text())
def test_no_control_character_survives_and_it_is_idempotent(text: str) -> None:
    clean = sanitize_text(text)
    assert _LEFT.search(clean) is None
    assert sanitize_text(clean) == clean
