"""The JSON policyd writes for itself reads back as the value it was made of, whatever the value holds:
what orjson refuses (integers past 64 bits, lone surrogates) is still written, by the standard library."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from policyd import compact_json

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_what_is_written_reads_back_as_the_same_value_by_either_reader(value) -> None:
    text = compact_json.dumps(value)
    assert compact_json.loads(text) == value
    assert json.loads(text) == value  # plain JSON: any reader reads it


def test_values_orjson_refuses_are_written_by_the_standard_library() -> None:
    for value in ({"n": 2**64}, {"s": "lone \ud800 surrogate"}, [-(2**70)]):
        text = compact_json.dumps(value)
        assert json.loads(text) == value and compact_json.loads(text) == value
    assert compact_json.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'  # compact, UTF-8 as it is


def test_integers_past_64_bits_read_back_exact_never_as_floats() -> None:
    for n in (2**63, -(2**63) - 1, 2**64, 10**30):
        value = compact_json.loads(compact_json.dumps({"amount_nanos": n}))["amount_nanos"]
        assert value == n and isinstance(value, int)
    assert compact_json.loads(b'{"a": 1}') == {"a": 1}


def test_json_orjson_did_not_write_reads_as_the_standard_library_reads_it() -> None:
    """Spaces, escapes, floats and repeated keys: what comes back unlike the text is read again by the
    standard library, so the value is the same whichever reader's fast path took it."""
    for text in ('{"a": 1, "b": [2, 3]}', '{"s":"caf\\u00e9"}', '{"n":18446744073709551616,"f":1.5}',
                 '{"a":1,"a":2}', '[-9223372036854775809]', '{"big": 123456789012345678901234567890}',
                 '{"s":"lone \\udc00"}', '  [1]  '):
        value = compact_json.loads(text)
        assert value == json.loads(text)
        assert repr(value) == repr(json.loads(text))  # an integer stays an integer, never a float


@given(values)
def test_reads_text_the_standard_library_wrote_as_it_reads_it(value) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert compact_json.loads(text) == value
        assert compact_json.loads(text.encode("utf-8", "surrogatepass")) == value
