"""Top-level fields of a JSON object read chunk by chunk, without holding it (policyd.json_fields)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.json_fields import ObjectFields

# strings with what a reader could trip on: quotes, backslashes, brackets, colons, non-ASCII
_TEXT = st.text(alphabet=st.sampled_from(list('ab"\\{}[]:, \u00e9\u4e16\n')), max_size=12)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), _TEXT)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_TEXT, inner, max_size=4)), max_leaves=12)
_KEYS = ["usage", "model", "output", "data", "id", 'q"uote', "x\\y"]


def _fed(raw: bytes, cuts: list[int], keep: frozenset[str], keep_items: frozenset[str] = frozenset(),
         value_bytes_max: int = 64 * 1024) -> ObjectFields:
    """Top-level names in keep and keep_items; ("inner", name) is kept for each too."""
    fields = ObjectFields([(k,) for k in keep] + [("inner", k) for k in keep], [(k,) for k in keep_items],
                          value_bytes_max)
    at = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(raw))) + [len(raw)]:
        fields.feed(raw[at:cut])
        at = cut
    fields.end()
    return fields


@settings(max_examples=400, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6),
       inner=st.one_of(st.none(), st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4)),
       cuts=st.lists(st.integers(1, 4000), max_size=12), spaced=st.booleans())
def test_kept_fields_are_the_objects_own_however_the_bytes_are_cut(obj: dict, inner: dict | None, cuts: list[int],
                                                                   spaced: bool) -> None:
    if inner is not None:
        obj["inner"] = inner
    raw = json.dumps(obj, ensure_ascii=False, indent=1 if spaced else None).encode()
    keep = frozenset({"usage", "model", 'q"uote', "x\\y"})
    fields = _fed(raw, cuts, keep, frozenset({"output"}))
    assert not fields.broken
    expected = {(k,): v for k, v in obj.items() if k in keep}
    expected.update({("inner", k): v for k, v in (inner or {}).items() if k in keep})
    assert fields.values == expected
    for name, value in obj.items():
        if isinstance(value, list):
            assert fields.counts.get((name,), 0) == sum(isinstance(item, (dict, list)) for item in value)
    if isinstance(obj.get("output"), list):
        assert fields.items.get(("output",), []) == [item for item in obj["output"] if isinstance(item, (dict, list, str))]


def test_every_cut_of_escapes_and_multibyte_text() -> None:
    obj = {"id": 'a\\"b\\\\', "usage": {"t": 'x\\"}]\\\\', "n": 3}, "n": -1.5e3, "model": "\u00e9\u4e16\\u0041",
           "data": [{"k": "\\"}], "inner": {"usage": True, "z": None}}
    raw = json.dumps(obj, ensure_ascii=False).encode()
    for cut in range(1, len(raw)):
        for second in (cut + 1, cut + 2):
            fields = _fed(raw, [cut, second], frozenset({"usage", "model", "n"}))
            assert fields.values == {("usage",): obj["usage"], ("model",): obj["model"], ("n",): -1500.0,
                                     ("inner", "usage"): True}, (cut, second)
            assert fields.counts == {("data",): 1}


def test_large_values_pass_unkept_and_the_rest_is_still_read() -> None:
    obj = {"data": [{"b64_json": "A" * 300_000} for _ in range(3)], "output": [{"type": "message", "text": "z" * 100_000},
                                                                              {"type": "web_search_call"}],
           "big": {"blob": "b" * 100_000}, "usage": {"prompt_tokens": 5}, "service_tier": None}
    raw = json.dumps(obj).encode()
    fields = _fed(raw, list(range(65536, len(raw), 65536)), frozenset({"usage", "big", "service_tier"}),
                  frozenset({"output"}))
    assert fields.values == {("usage",): {"prompt_tokens": 5}, ("service_tier",): None}
    # an item too large to keep leaves its type (what a reply's calls are counted by)
    assert fields.items == {("output",): [{"type": "message"}, {"type": "web_search_call"}]}
    assert fields.as_object() == {"data": [None] * 3, "output": [{"type": "message"}, {"type": "web_search_call"}],
                                  "usage": {"prompt_tokens": 5}, "service_tier": None}


def test_a_nested_usage_is_found_past_a_large_sibling() -> None:
    """A Responses API stream's response.completed event: the whole response, a generated image in it."""
    event = {"type": "response.completed", "response": {
        "output": [{"type": "image_generation_call", "result": "iVBOR" * 400_000}, {"type": "web_search_call"}],
        "usage": {"input_tokens": 12, "output_tokens": 1056}, "service_tier": "default"}}
    raw = json.dumps(event).encode()
    fields = ObjectFields([("type",), ("response", "usage"), ("response", "service_tier")], [("response", "output")])
    for at in range(0, len(raw), 16384):
        fields.feed(raw[at:at + 16384])
    fields.end()
    assert fields.as_object() == {"type": "response.completed", "response": {
        "output": [{"type": "image_generation_call"}, {"type": "web_search_call"}],
        "usage": {"input_tokens": 12, "output_tokens": 1056}, "service_tier": "default"}}


def test_what_is_not_one_object_is_broken() -> None:
    for raw in (b"[1, 2]", b'{"usage": {"a": 1}', b'{"a": "open', b'{"a": 1}}', b'{"a" 1}', b'{"a": }', b"{} x",
                b'{"a": [1, 2}', b'{"a": [1 : 2]}', b"12"):
        assert _fed(raw, [], frozenset({"usage"})).broken, raw
