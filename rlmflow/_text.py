"""Text that came from untrusted code, made safe for a model's prompt and for a terminal.

Cell output, errors and answers are written by model code (or by a document that injected it).
Terminal escape sequences in them can rewrite what a person sees (clear the screen, move the
cursor, set the window title, hide text, OSC 52 to the clipboard) and confuse the root model.
"""

from __future__ import annotations

import re

__all__ = ["cap_text", "safe_text", "sanitize_text", "traceback_summary"]

# Complete escape sequences are removed: CSI (ESC [ ... final byte), OSC / DCS / SOS / PM / APC
# strings up to their terminator (BEL or ESC \) or the end of the text, and two-byte ESC forms.
# The 8-bit C1 introducers (U+009B CSI, U+009D OSC, ...) are handled the same way.
_ESCAPE_SEQUENCE = re.compile(
    r"""
    (?: \x1b\[ | \x9b ) [0-?]* [ -/]* [@-~]                   # CSI ... final
  | (?: \x1b[\]PX^_] | [\x90\x98\x9d\x9e\x9f] ) .*? (?: \x07 | \x1b\\ | \x9c | \Z )   # OSC/DCS/SOS/PM/APC
  | \x1b [ -/]* [0-~]                                          # other ESC sequences (ESC c, ESC ( B, ...)
    """,
    re.VERBOSE | re.DOTALL,
)

# Whatever control character is left is shown, not obeyed: C0 except tab and newline, DEL, C1,
# and the Unicode bidirectional overrides that reorder what a reader sees ("Trojan Source").
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def sanitize_text(text: str) -> str:
    """Remove terminal escape sequences from ``text`` and escape every other control character.

    Newlines and tabs are kept; ``\\r\\n`` becomes ``\\n``; a lone carriage return, backspace,
    BEL, NUL, DEL, C1 controls and bidi overrides become visible escapes such as ``\\x0d``.
    Pure and idempotent on its own output; safe for prompts, logs and terminals.
    """
    if text.isprintable() or not _needs_work(text):
        return text
    text = text.replace("\r\n", "\n")
    text = _ESCAPE_SEQUENCE.sub("", text)
    return _CONTROL.sub(_escape, text)


def _needs_work(text: str) -> bool:
    # isprintable() is False for "\n" and "\t" alone, the common case: check cheaply.
    return _CONTROL.search(text) is not None


def traceback_summary(error: str) -> str:
    """The last line of a traceback (``"KeyError: 'x'"``), the part that names what went wrong; "" if none.

    Found from the end, so a huge error costs no more than its last line.
    """
    text = error.rstrip()
    return text[text.rfind("\n") + 1:].strip()


def cap_text(text: str, limit: int, *, total: int | None = None) -> str:
    """Head and tail of ``text`` within ``limit`` characters, saying how much was left out."""
    total = len(text) if total is None else total
    if len(text) <= limit and total <= len(text):
        return text
    half = max(1, limit // 2)
    head, tail = text[:half], text[-half:] if len(text) > half else ""
    omitted = max(0, total - len(head) - len(tail))
    return f"{head}\n[... output cut: {omitted:,} of {total:,} characters not shown ...]\n{tail}"


def safe_text(text: str, limit: int, *, total: int | None = None) -> str:
    """Sandbox text as a model or a person may read it: cut to ``limit``, then sanitised.

    Cut first, so that the work is bounded by ``limit`` whatever the sandbox sent; cut again if
    escaping control characters made it longer.
    """
    return cap_text(sanitize_text(cap_text(text, limit, total=total)), limit)
