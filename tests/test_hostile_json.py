"""Hostile JSON in every reader: one PolyakError naming the file, never a traceback.

Every JSON that polyak reads from a file (a safetensors header, a sharded index, an
``.npz``'s ``__polyak__.json``, a ``.keras`` archive's ``config.json`` and
``metadata.json``, an averager's metadata record) goes through one parser with limits
(``polyak._json``). Each reader gets each payload: nesting far beyond Python's recursion
limit, a 5,000-digit integer, ``NaN``, ``Infinity``, ``1e400``, a lone surrogate, and a
document of the wrong type. On 0.1 these escaped as RecursionError, ValueError,
OverflowError, AttributeError or TypeError.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import polyak
from _formats_samples import SAMPLES, available, sample_state
from _hostile import leftovers, one_line_error, run_cli
from polyak.cli import main as cli_main

DEEP = 200_000

#: name -> a JSON value, as text. Each is placed where a reader reads it (see READERS).
PAYLOADS: dict[str, str] = {
    "deep-nesting": "[" * DEEP + "]" * DEEP,
    "5000-digit-int": "7" * 5000,
    "nan": "NaN",
    "infinity": "-Infinity",
    "1e400": "1e400",
    "lone-surrogate": '"a\\ud800"',
}
#: Payloads that replace the whole document.
WRONG_TYPES: dict[str, str] = {"list": "[1, 2]", "string": '"x"'}

F32_PAIR = np.array([1.0, 2.0], np.float32).tobytes()


def _safetensors(folder: Path, text: str) -> Path:
    raw = text.encode()
    path = folder / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + F32_PAIR)
    return path


def _safetensors_header(folder: Path, payload: str) -> Path:
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": @@}'.replace("@@", payload)
    return _safetensors(folder, '{"__metadata__": {"k": "v"}, "w": @@}'.replace("@@", entry))


def _index(folder: Path, payload: str, *, whole: bool = False) -> Path:
    polyak.save({"w": np.ones(2, np.float32)}, folder / "s.safetensors")
    path = folder / "m.safetensors.index.json"
    body = payload if whole else '{"weight_map": {"w": "s.safetensors"}, "metadata": {"total_size": @@}}'.replace("@@", payload)
    path.write_text(body, encoding="utf-8")
    return path


def _npz(folder: Path, meta: str) -> Path:
    path = folder / "m.npz"
    np.savez(path, w=np.ones(2, np.float32))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("__polyak__.json", meta)
    return path


def _npz_meta(folder: Path, payload: str, *, whole: bool = False) -> Path:
    return _npz(folder, payload if whole else '{"dtypes": {}, "metadata": {"k": @@}}'.replace("@@", payload))


def _keras(folder: Path, config: str | None = None, metadata: str | None = None) -> Path:
    sample = SAMPLES["keras"]
    if not available(sample):
        pytest.skip("needs h5py")
    good, _ = sample.make(folder, sample_state(0))
    path = folder / "m.keras"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
        for zi in zin.infolist():
            data = zin.read(zi)
            if zi.filename == "config.json" and config is not None:
                data = config.encode()
            if zi.filename == "metadata.json" and metadata is not None:
                data = metadata.encode()
            zout.writestr(zi.filename, data)
    good.unlink()
    return path


def _keras_config(folder: Path, payload: str, *, whole: bool = False) -> Path:
    return _keras(folder, config=payload if whole else '{"class_name": "Sequential", "config": {"layers": @@}}'.replace("@@", payload))


def _keras_metadata(folder: Path, payload: str, *, whole: bool = False) -> Path:
    return _keras(folder, metadata=payload if whole else '{"keras_version": @@}'.replace("@@", payload))


READERS: dict[str, Callable[..., Path]] = {
    "safetensors-header": lambda folder, payload, whole=False: (
        _safetensors(folder, payload) if whole else _safetensors_header(folder, payload)
    ),
    "safetensors-index": _index,
    "npz-__polyak__.json": _npz_meta,
    "keras-config.json": _keras_config,
    "keras-metadata.json": _keras_metadata,
}


def _refused(path: Path) -> polyak.PolyakError:
    with pytest.raises(polyak.FormatError, match=r"corrupted|not a JSON object|nested deeper") as info:
        polyak.inspect(path)
    assert str(path) in str(info.value)
    with pytest.raises(polyak.FormatError, match=r"corrupted|not a JSON object|nested deeper"):
        polyak.open_source(path)
    return info.value


EXPECTED: dict[str, str] = {
    "deep-nesting": r"nested deeper than (Python can parse|200 levels)",
    "5000-digit-int": r"a 5000-digit number",
    "nan": r"(-Infinity|NaN), which is not a number in JSON",
    "infinity": r"-Infinity, which is not a number in JSON",
    "1e400": r"the number 1e400, which overflows a float",
    "lone-surrogate": r"not valid Unicode \(a lone surrogate\)",
}


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("reader", list(READERS))
def test_hostile_json_refused_by_every_reader(tmp_path: Path, reader: str, payload: str) -> None:
    path = READERS[reader](tmp_path, PAYLOADS[payload])
    error = _refused(path)
    assert __import__("re").search(EXPECTED[payload], str(error)), error
    if payload in ("deep-nesting", "5000-digit-int"):
        assert isinstance(error, polyak.UnsafeFileError)


@pytest.mark.parametrize("kind", list(WRONG_TYPES))
@pytest.mark.parametrize("reader", list(READERS))
def test_json_of_the_wrong_type_refused_by_every_reader(tmp_path: Path, reader: str, kind: str) -> None:
    path = READERS[reader](tmp_path, WRONG_TYPES[kind], whole=True)
    if reader.startswith("safetensors"):
        # These sniffers already want a "{": refused before the reader; the reader itself
        # (opened directly) refuses too.
        with pytest.raises(polyak.FormatError, match=r"not a valid safetensors(-index)? file") as info:
            polyak.inspect(path)
        assert str(path) in str(info.value)
        from polyak.formats.safetensors import SafetensorsIndexSource, SafetensorsSource

        opener = SafetensorsIndexSource if reader.endswith("index") else SafetensorsSource
        with pytest.raises(polyak.FormatError, match=rf"{path.name}: corrupted .*: a {kind}, not a JSON object"):
            opener(path)
        return
    error = _refused(path)
    assert f"a {kind}, not a JSON object" in str(error)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ('{"dtypes": [1], "metadata": {}}', r"'dtypes' must map names to strings"),
        ('{"dtypes": {}, "metadata": "x"}', r"'metadata' must map names to strings"),
        ('{"dtypes": {"w": "object"}, "metadata": {}}', r"dtype 'object' for 'w', which is not a numeric dtype"),
        ('{"dtypes": {"w": "no-such-type"}, "metadata": {}}', r"dtype 'no-such-type' for 'w'"),
    ],
    ids=["dtypes-list", "metadata-string", "dtype-object", "dtype-unknown"],
)
def test_npz_record_fields_are_type_checked(tmp_path: Path, meta: str, match: str) -> None:
    path = _npz(tmp_path, meta)
    with pytest.raises(polyak.FormatError, match=match):
        polyak.open_source(path)


@pytest.mark.parametrize("payload", ["nan", "1e400", "deep-nesting"])
def test_index_total_size_via_cli_one_line(tmp_path: Path, payload: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's cases: an index with total_size NaN, 1e400, or nested 100k deep."""
    path = _index(tmp_path, PAYLOADS[payload])
    assert cli_main(["inspect", str(path)]) == 2
    assert str(path) in one_line_error(capsys.readouterr().err)
    out = tmp_path / "avg.safetensors"
    assert cli_main(["average", str(path), str(path.with_name("s.safetensors")), "-o", str(out), "-q"]) == 2
    assert str(path) in one_line_error(capsys.readouterr().err)
    assert not out.exists() and leftovers(tmp_path) == []


def test_deep_keras_config_via_real_subprocess(tmp_path: Path) -> None:
    """`polyak inspect` on a .keras whose config.json is nested 200k deep: exit 2, one line."""
    path = _keras_config(tmp_path, PAYLOADS["deep-nesting"])
    proc = run_cli(["inspect", str(path)])
    assert proc.returncode == 2, proc.stderr
    assert "config.json is nested deeper than Python can parse" in one_line_error(proc.stderr)


@pytest.mark.parametrize("payload", ["deep-nesting", "5000-digit-int", "lone-surrogate", "list"])
def test_averager_record_refused(tmp_path: Path, payload: str) -> None:
    """An EMA/SWA file's metadata record (``polyak_averager``) is read with the same limits."""
    torch = pytest.importorskip("torch")
    from polyak.torch import EMA

    model = torch.nn.Linear(2, 1)
    good = tmp_path / "ema.safetensors"
    EMA(model, decay=0.9).save(good)
    text = WRONG_TYPES[payload] if payload in WRONG_TYPES else '{"kind": "ema", "config": @@}'.replace("@@", PAYLOADS[payload])
    bad = tmp_path / "bad.safetensors"
    state = polyak.average([good])
    polyak.save(state, bad, metadata={"polyak_averager": text})
    with pytest.raises(polyak.FormatError, match=r"bad\.safetensors: (corrupted|the) 'polyak_averager' metadata") as info:
        EMA.load(bad, model)
    if payload == "list":
        assert "a list, not a JSON object" in str(info.value)


def test_hostile_polyak_record_is_shown_as_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ``polyak`` metadata value is only shown: deep or odd JSON there is printed, never parsed into a crash."""
    for k, text in enumerate([PAYLOADS["deep-nesting"], '{"weights": ["a"], "members": 3}', '{"members": [1]}', "[]"]):
        path = tmp_path / f"m{k}.safetensors"
        polyak.save({"w": np.ones(2, np.float32)}, path, metadata={"polyak": text})
        assert cli_main(["inspect", str(path)]) == 0
        table = capsys.readouterr().out
        assert "metadata polyak: " + text[:20] in table
        assert cli_main(["inspect", "--json", str(path)]) == 0
        shown = json.loads(capsys.readouterr().out)["metadata"]["polyak"]
        assert shown == (json.loads(text) if text.startswith("{") else text)  # a record is an object


# --- lone surrogates (not valid Unicode) in names and metadata ------------------------------


# Keras 2 .h5 outputs need a Keras 2 member to copy their layout from (not polyak.save);
# their names come from HDF5 paths, which cannot hold a lone surrogate.
WRITABLE = sorted(n for n, s in SAMPLES.items() if s.writable and n != "keras2-h5")


@pytest.mark.parametrize("where", ["tensor-name", "metadata-value", "metadata-key"])
@pytest.mark.parametrize("name", WRITABLE)
def test_lone_surrogate_refused_before_any_file_is_created(tmp_path: Path, name: str, where: str) -> None:
    sample = SAMPLES[name]
    if not available(sample):
        pytest.skip(f"{name} needs {', '.join(sample.needs)}")
    out = tmp_path / "out" / f"avg{sample.suffix}"
    out.parent.mkdir()
    state = {"a": np.ones(2, np.float32), "b\ud800" if where == "tensor-name" else "b": np.ones(3, np.float32), "c": np.zeros(1, np.float32)}
    metadata = {"k": "v\udfff"} if where == "metadata-value" else {"k\udfff": "v"} if where == "metadata-key" else {}
    with pytest.raises(polyak.FormatError, match=r"cannot store the (tensor name 'b\\ud800'|metadata value of 'k'|metadata key 'k\\udfff'): not valid Unicode \(it holds the lone surrogate U\+D[8F]"):
        polyak.save(state, out, metadata=metadata)
    assert sorted(out.parent.iterdir()) == []
    if where == "tensor-name":
        with pytest.raises(polyak.FormatError, match=r"cannot store the tensor name 'b\\ud800'"):
            polyak.average([state, dict(state)], out=out)
        assert sorted(out.parent.iterdir()) == []


def test_lone_surrogate_name_in_a_pt_member_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: a member whose tensor name holds a lone surrogate: exit 2, one line, no temp."""
    torch = pytest.importorskip("torch")
    members = []
    for i in range(2):
        p = tmp_path / f"m_{i}.pt"
        torch.save({"a\ud800": torch.ones(2) * i, "b": torch.zeros(1)}, p)
        members.append(p)
    out = tmp_path / "x.safetensors"
    assert cli_main(["average", *map(str, members), "-o", str(out), "-q"]) == 2
    assert "lone surrogate U+D800" in one_line_error(capsys.readouterr().err)
    assert not out.exists() and leftovers(tmp_path) == []
    assert cli_main(["inspect", str(members[0])]) == 0  # shown escaped, not a UnicodeEncodeError
    assert "a\\ud800" in capsys.readouterr().out


def test_lone_surrogate_in_a_safetensors_header_refused(tmp_path: Path) -> None:
    path = _safetensors(tmp_path, '{"a\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}')
    with pytest.raises(polyak.FormatError, match=r"m\.safetensors: corrupted safetensors header: it holds the key 'a\\ud800'"):
        polyak.open_source(path)
