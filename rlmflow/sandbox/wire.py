"""Framing between host and worker: a 4-byte big-endian length, then one msgpack map.

Imported by both sides, so this module uses only the standard library and msgpack (the worker
loads it by path, outside the ``rlmflow`` package). msgpack, never pickle: a frame from the
worker must not be able to run code in the host.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 256 * 1024 * 1024


# What one frame from the worker may make the host allocate. A frame's bytes are capped before
# they are read; these cap what they decode into (8 MB of one-byte empty maps would otherwise
# become 8 million dicts, over a gigabyte).
MAX_ITEMS = 200_000
"""Arrays, maps and their elements summed over one decoded document."""
MAX_CONTAINER_LEN = 100_000
"""Elements of one array or entries of one map."""


MAX_TEXT_CHARS = 200_000
MAX_ESTABLISHED_CHARS = 2_000  # the note on what a cell set: a few short lines
"""The longest error or ``FINAL`` answer one cell reports: the worker cuts there, and the host cuts
again when the result arrives, before it does any work on the text."""
CUT_NOTE_ROOM = 128
"""Characters a cut's note may add: text within ``limit + CUT_NOTE_ROOM`` is never cut again."""


class FrameError(Exception):
    """A frame that is oversized or does not decode to a map with an ``op``."""


def pack(value: Any) -> bytes:
    try:
        body: bytes = msgpack.packb(value, use_bin_type=True)
    except UnicodeEncodeError:  # a lone surrogate (a model's answer may hold one) goes as "?"
        body = msgpack.packb(value, use_bin_type=True, unicode_errors="replace")
    return body


def encode(message: dict[str, Any]) -> bytes:
    body = pack(message)
    return HEADER.pack(len(body)) + body


def check_length(length: int, max_frame: int) -> None:
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {max_frame}")


def cut_text(text: str, limit: int) -> str:
    """Head and tail of ``text`` within ``limit`` characters and a note of its true length.

    Idempotent: a text already cut (``limit`` plus the note) is returned as it is.
    """
    if len(text) <= limit + CUT_NOTE_ROOM:
        return text
    half = max(1, limit // 2)
    omitted = len(text) - 2 * half
    return f"{text[:half]}\n[... {omitted:,} of {len(text):,} characters omitted ...]\n{text[-half:]}"


def decode(body: bytes) -> dict[str, Any]:
    """A frame from the trusted side (the host's frames, read by the worker)."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise FrameError("frame is not a map with an 'op'")
    return message


def unpack_untrusted(
    body: bytes | bytearray,
    *,
    max_items: int = MAX_ITEMS,
    max_len: int = MAX_CONTAINER_LEN,
    max_str: int | None = None,
) -> Any:
    """Decode bytes from the worker with every allocation bounded; ``FrameError`` past a bound.

    Binaries are bounded by ``len(body)`` (already capped), strings by ``max_str`` bytes too when
    given (refused before they are decoded); arrays and maps by ``max_len`` each and, with their
    elements, by ``max_items`` in total. Map keys must be strings; extension types are refused.
    """
    count = 0

    def counted(container: Any) -> Any:
        nonlocal count
        count += 1 + len(container)
        if count > max_items:
            raise FrameError(f"frame decodes to more than {max_items:,} items")
        return container

    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            list_hook=counted,
            object_hook=counted,
            max_array_len=max_len,
            max_map_len=max_len,
            max_str_len=len(body) if max_str is None else min(max_str, len(body)),
            max_bin_len=len(body),
            max_ext_len=0,
        )
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame ({type(exc).__name__}: {exc})") from None


def decode_untrusted(body: bytes | bytearray, *, max_str: int | None = None) -> dict[str, Any]:
    """A frame from the worker: :func:`unpack_untrusted`, then it must be a map with an ``op``."""
    message = unpack_untrusted(body, max_str=max_str)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise FrameError("frame is not a map with an 'op'")
    return message


def read_frame_blocking(sock: Any, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any] | None:
    """Read one frame from a blocking socket; ``None`` at end of stream."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    check_length(length, max_frame)
    body = _recv_exactly(sock, length)
    if body is None:
        raise FrameError("stream ended inside a frame")
    return decode(body)


def _recv_exactly(sock: Any, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            if chunks:
                raise FrameError("stream ended inside a frame")
            return None
        chunks += chunk
    return bytes(chunks)
