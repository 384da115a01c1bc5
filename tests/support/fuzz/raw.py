"""Raw bytes for the fuzz suite: arbitrary bytes, wire-format field soup, nesting
around the parsers' limits and past them, and hand-picked malformed messages."""

from __future__ import annotations

from hypothesis import strategies as st

from support.fuzz.wire import delimited, key, nested, nested_values, varint

SPECIAL_NUMBERS = [0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 2**29 - 1, 2**29, 2**32, 2**61]
numbers = st.one_of(st.integers(1, 9), st.sampled_from(SPECIAL_NUMBERS))
varint_values = st.one_of(
    st.integers(0, 300),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]),
    st.integers(-(2**63), 2**64 - 1),
)


@st.composite
def wire_field(draw: st.DrawFn, inner: st.SearchStrategy[bytes] | None = None) -> bytes:
    """One field of any wire type, well-formed or not."""
    number = draw(numbers)
    wire_type = draw(st.integers(0, 7))
    if wire_type == 0:
        return key(number, 0) + varint(draw(varint_values))
    if wire_type in (1, 5):
        return key(number, wire_type) + draw(st.binary(max_size=10))
    if wire_type == 2:
        body = (
            draw(inner)
            if inner is not None and draw(st.booleans())
            else draw(st.binary(max_size=40))
        )
        lie = draw(st.sampled_from([0, 0, 0, 1, -1, 7, 2**31, 2**62]))
        return key(number, 2) + varint(max(len(body) + lie, 0)) + body
    if wire_type == 3 and inner is not None:  # a group, ended or not
        return key(number, 3) + draw(inner) + draw(st.sampled_from([key(number, 4), b""]))
    return key(number, wire_type) + draw(st.binary(max_size=4))


field_soup = st.recursive(
    st.lists(wire_field(), max_size=6).map(b"".join),
    lambda inner: st.lists(wire_field(inner), min_size=1, max_size=4).map(b"".join),
    max_leaves=12,
)
# Around the parsers' limits (protobuf's 100, our splicer's 64) and far past them.
depths = st.integers(1, 120) | st.sampled_from(
    [31, 32, 33, 49, 50, 51, 63, 64, 65, 99, 100, 101, 3000]
)
raw_bytes = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=1, max_size=3000),
    field_soup,
    field_soup.map(lambda b: b + delimited(15, bytes(70_000))),  # past INLINE_LIMIT
    depths.map(nested),
    depths.map(lambda d: key(3, 3) * d + key(3, 4) * d),  # unknown groups in groups
    depths.map(nested_values),
    depths.map(lambda d: nested_values(d) + delimited(15, bytes(70_000))),
    st.sampled_from(
        [
            b"",
            b"\xff" * 11,  # an overlong key
            b"\x08" + b"\xff" * 10 + b"\x01",  # an overlong value
            b"\x0a" + varint(2**63) + b"x",  # a length past the end
            b"\x12\xff\xff\xff\xff\x0f",  # a 4 GiB length, no body
            b"\x0f",  # wire type 7
            b"\x0c",  # an end group with no start
            b"\x0b" * 200,  # groups never ended
            b"\x00",  # field number 0
            bytes(range(256)),
        ]
    ),
)
