"""polyak._json, the one parser of JSON from files polyak did not write: every refusal with
its class and its message in full, and the limits at their edges."""

from __future__ import annotations

import re

import pytest

from polyak import FormatError, UnsafeFileError
from polyak._json import MAX_DEPTH, MAX_NUMBER_CHARS, json_object, parse_json


def _exact(text: str) -> str:
    return f"^{re.escape(text)}$"


@pytest.mark.parametrize(
    ("data", "error", "why"),
    [
        (b"\xff{}", FormatError, " (not UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
        ("{", FormatError, " (not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ('{"a": NaN}', FormatError, ": it holds NaN, which is not a number in JSON"),
        ('{"a": [Infinity]}', FormatError, ": it holds Infinity, which is not a number in JSON"),
        ('{"a": -Infinity}', FormatError, ": it holds -Infinity, which is not a number in JSON"),
        ('{"a": 1e400}', FormatError, ": it holds the number 1e400, which overflows a float"),
        ('{"a": -1e400}', FormatError, ": it holds the number -1e400, which overflows a float"),
        ('{"a": ' + "9" * (MAX_NUMBER_CHARS + 1) + "}", UnsafeFileError, f": it holds a {MAX_NUMBER_CHARS + 1}-digit number"),
        ('{"a": 1.' + "5" * MAX_NUMBER_CHARS + "}", UnsafeFileError, f": it holds a {MAX_NUMBER_CHARS + 2}-character number"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), UnsafeFileError, f": it holds nesting deeper than {MAX_DEPTH} levels"),
        ('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), UnsafeFileError,
         f": it holds nesting deeper than {MAX_DEPTH} levels"),
        ('{"ok": 1, "\\ud800": 1}', FormatError, ": it holds the key '\\ud800', which is not valid Unicode (a lone surrogate)"),
        ('{"a": ["x", "a\\udfffb"]}', FormatError,
         ": it holds the string 'a\\udfffb', which is not valid Unicode (a lone surrogate)"),
        ('["' + "é" * 50 + '\\ud800"]', FormatError,
         ": it holds the string '" + "é" * 40 + "', which is not valid Unicode (a lone surrogate)"),
        ("[" * 100_000 + "]" * 100_000, UnsafeFileError, "RECURSION"),
    ],
    ids=["utf8", "syntax", "nan", "inf", "-inf", "overflow", "-overflow", "digits", "chars", "deep-list", "deep-dict",
         "key", "string", "long-string", "recursion"],
)
def test_every_refusal_names_the_file_what_and_why(data: str | bytes, error: type, why: str) -> None:
    if why == "RECURSION":
        message = "f.json: the index is nested deeper than Python can parse; the file is corrupt or hostile"
    else:
        message = "f.json: corrupted index" + why
    with pytest.raises(error, match=_exact(message)) as info:
        parse_json(data, "f.json", "index")
    assert type(info.value) is error  # UnsafeFileError is no FormatError here, nor the other way round


def test_what_is_accepted_up_to_the_limits() -> None:
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "f", "x") is not None
    deep = '{"a":' * (MAX_DEPTH - 1) + "[]" + "}" * (MAX_DEPTH - 1)
    assert parse_json(deep, "f", "x") is not None
    number = "9" * MAX_NUMBER_CHARS
    assert parse_json(f"[{number}, 1.{'5' * (MAX_NUMBER_CHARS - 2)}, -2, 0.5, 1e308]", "f", "x")[0] == int(number)
    assert parse_json(b'{"\xc3\xa9t\xc3\xa9": ["\xe5\xb1\x82", true, null]}', "f", "x") == {"été": ["层", True, None]}
    assert parse_json(memoryview(b'{"a": 1}'), "f", "x") == {"a": 1}
    assert parse_json('["\\ud83d\\ude42"]', "f", "x") == ["🙂"]  # a surrogate pair is a character
    with pytest.raises(UnsafeFileError, match="nesting deeper than 3 levels"):
        parse_json("[[[[]]]]", "f", "x", max_depth=3)
    assert parse_json("[[[]]]", "f", "x", max_depth=3) == [[[]]]


@pytest.mark.parametrize(("text", "kind"), [("[1]", "list"), ('"s"', "string"), ("1", "number"), ("1.5", "number"),
                                            ("true", "boolean"), ("null", "null")])
def test_json_object_says_what_it_got(text: str, kind: str) -> None:
    with pytest.raises(FormatError, match=_exact(f"m.npz: corrupted __polyak__.json: a {kind}, not a JSON object")):
        json_object(text, "m.npz", "__polyak__.json")
    assert json_object(b'{"k": [1]}', "m.npz", "x") == {"k": [1]}
    with pytest.raises(UnsafeFileError, match="nesting deeper than 2 levels"):
        json_object('{"a": [[1]]}', "m.npz", "x", max_depth=2)


def test_objects_and_lists_are_allowed_exactly_max_depth_deep() -> None:
    assert parse_json('{"a": {"b": {}}}', "f", "x", max_depth=3) == {"a": {"b": {}}}
    with pytest.raises(UnsafeFileError, match=_exact("f: corrupted x: it holds nesting deeper than 3 levels")):
        parse_json('{"a": {"b": {"c": {}}}}', "f", "x", max_depth=3)
    with pytest.raises(UnsafeFileError, match=_exact("f: corrupted x: it holds nesting deeper than 3 levels")):
        parse_json('[{"a": [[]]}]', "f", "x", max_depth=3)


def test_any_other_refusal_of_the_json_parser_is_one_format_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import polyak._json

    def loads(*args: object, **kwargs: object) -> object:
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    monkeypatch.setattr(polyak._json.json, "loads", loads)  # what a future json module might raise
    with pytest.raises(FormatError, match=_exact("f: corrupted x (Exceeds the limit (4300 digits) for integer "
                                                 "string conversion)")):
        parse_json("[1]", "f", "x")
