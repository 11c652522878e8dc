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


class FrameError(Exception):
    """A frame that is oversized or does not decode to a map with an ``op``."""


def encode(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def check_length(length: int, max_frame: int) -> None:
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {max_frame}")


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError(f"undecodable frame ({type(exc).__name__}: {exc})") from None
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
