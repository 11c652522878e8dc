"""Decoding what the worker sends: bounded before allocation, and only FrameError on bad input."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmflow.sandbox import wire

_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
_documents = st.recursive(
    _scalars | st.binary(),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8), inner, max_size=8),
    max_leaves=40,
)


@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_raise_frame_error(body: bytes) -> None:
    try:
        wire.unpack_untrusted(body)
    except wire.FrameError:
        pass


@given(_documents)
def test_documents_within_the_bounds_round_trip(document: Any) -> None:
    assert wire.unpack_untrusted(wire.pack(document)) == document


@settings(max_examples=25)
@given(st.integers(min_value=1, max_value=50), st.sampled_from([b"\x80", b"\x90", b"\xc0"]))
def test_totals_past_the_bound_are_refused(groups: int, item: bytes) -> None:
    # `groups` arrays of 1,000 tiny items each (empty maps, empty arrays, nils), under a bound of 10,000
    inner = b"\xdc" + (1000).to_bytes(2, "big") + item * 1000
    body = b"\xdc" + groups.to_bytes(2, "big") + inner * groups
    # each container counts itself and its elements: the outer array, the inner ones, tiny containers
    total = (1 + groups) + groups * (1 + 1000) + (groups * 1000 if item != b"\xc0" else 0)
    if total <= 10_000:
        assert len(wire.unpack_untrusted(body, max_items=10_000)) == groups
    else:
        with pytest.raises(wire.FrameError, match="more than 10,000 items"):
            wire.unpack_untrusted(body, max_items=10_000)


def test_one_long_array_map_keys_and_extensions_are_refused() -> None:
    with pytest.raises(wire.FrameError):
        wire.unpack_untrusted(b"\xdd" + (200_000).to_bytes(4, "big") + b"\xc0" * 200_000)
    with pytest.raises(wire.FrameError):
        wire.unpack_untrusted(msgpack.packb({1: "int key"}))
    with pytest.raises(wire.FrameError):
        wire.unpack_untrusted(msgpack.packb(msgpack.ExtType(5, b"x")))
    with pytest.raises(wire.FrameError, match="not a map"):
        wire.decode_untrusted(msgpack.packb([1, 2]))
