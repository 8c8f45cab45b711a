"""The readers' checks of what a file claims, one claim at a time, with each message in full:
safetensors headers and indexes, .npz members, .pt archives. (The hostile and broken-file
matrices in test_hostile_*.py try every format with every kind of damage; here each check
meets the smallest file that it alone must refuse, and the largest one it must accept.)"""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import polyak
from polyak import FormatError, UnsafeFileError
from polyak.formats.safetensors import SafetensorsIndexSource, SafetensorsSource


def _exact(text: str) -> str:
    return f"^{re.escape(text)}$"


def _st(path: Path, header: dict[str, Any] | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(n: int, begin: int = 0, shape: list[int] | None = None) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [n] if shape is None else shape, "data_offsets": [begin, begin + 4 * n]}


def test_a_valid_header_at_the_edges_is_read(tmp_path: Path) -> None:
    p = _st(tmp_path / "ok.safetensors", {
        "__metadata__": {"k": "v"},
        "b": _f32(2, 8), "a": _f32(2, 0), "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [16, 16]},
        "s": {"dtype": "I64", "shape": [], "data_offsets": [16, 24]},
    }, np.arange(4, dtype=np.float32).tobytes() + np.array(7, np.int64).tobytes())
    with polyak.open_source(p) as src:
        assert list(src.infos()) == ["a", "b", "empty", "s"]  # in file order
        assert src.read("a").tolist() == [0.0, 1.0] and src.read("b").tolist() == [2.0, 3.0]
        assert src.read("empty").shape == (0, 3) and int(src.read("s")) == 7
        assert src.metadata() == {"k": "v"}
    assert polyak.inspect(_st(tmp_path / "none.safetensors", {"__metadata__": None, "a": _f32(1)}, bytes(4))).tensors


@pytest.mark.parametrize(
    ("header", "data", "error", "why"),
    [
        (b"", b"", FormatError, "truncated safetensors file (7 bytes; the header length alone takes 8)"),
        ({"a": 1}, b"", FormatError, "corrupted safetensors header (entry 'a' is not an object)"),
        ({"a": {"dtype": "F13", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), FormatError,
         "tensor 'a' has unknown dtype 'F13'"),
        ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4), FormatError,
         "tensor 'a' has unknown dtype ['F32']"),
        ({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), FormatError, "tensor 'a' has unknown dtype None"),
        ({"a": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, bytes(4), FormatError,
         "corrupted safetensors header (bad shape or offsets for 'a')"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), FormatError,
         "corrupted safetensors header (bad shape or offsets for 'a')"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), FormatError,
         "corrupted safetensors header (bad shape or offsets for 'a')"),
        ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, bytes(4), FormatError,
         "corrupted safetensors header (bad shape or offsets for 'a')"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}, bytes(4), FormatError,
         "corrupted safetensors header (bad shape or offsets for 'a')"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, bytes(8), FormatError,
         "corrupted safetensors header (bad shape or offsets for 'a')"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, True]}}, bytes(4), FormatError,
         "corrupted safetensors header (bad shape or offsets for 'a')"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, bytes(4), FormatError,
         "corrupted safetensors header (bad shape or offsets for 'a')"),
        ({"a": _f32(2)}, bytes(7), FormatError,
         "tensor 'a' claims bytes [0, 8) for shape (2,) float32 (8 bytes) in a data section of 7 bytes; "
         "the file is truncated or corrupt"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 4]}}, bytes(8), FormatError,
         "tensor 'a' claims bytes [4, 4) for shape (2,) float32 (8 bytes) in a data section of 8 bytes; "
         "the file is truncated or corrupt"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, bytes(8), FormatError,
         "tensor 'a' claims bytes [-4, 0) for shape (1,) float32 (4 bytes) in a data section of 8 bytes; "
         "the file is truncated or corrupt"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(8), FormatError,
         "tensor 'a' claims bytes [4, 0) for shape (1,) float32 (4 bytes) in a data section of 8 bytes; "
         "the file is truncated or corrupt"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, bytes(16), FormatError,
         "tensor 'a' claims bytes [0, 8) for shape (2, 2) float32 (16 bytes) in a data section of 16 bytes; "
         "the file is truncated or corrupt"),
        ({"a": _f32(2, 0), "b": _f32(2, 4)}, bytes(12), FormatError,
         "corrupt safetensors file: tensors overlap in the data section"),
        ({"__metadata__": {"k": 1}, "a": _f32(1)}, bytes(4), FormatError,
         "corrupted safetensors header (__metadata__ must map strings to strings)"),
        ({"__metadata__": ["k"], "a": _f32(1)}, bytes(4), FormatError,
         "corrupted safetensors header (__metadata__ must map strings to strings)"),
    ],
)
def test_each_header_claim_is_checked(tmp_path: Path, header: Any, data: bytes, error: type, why: str) -> None:
    p = tmp_path / "m.safetensors"
    if header == b"":
        p.write_bytes(bytes(7))
    else:
        _st(p, header, data)
    with pytest.raises(error, match=_exact(f"{p}: {why}")):
        SafetensorsSource(p)  # the reader itself (as an index opens its shards), not the sniffer


def test_the_header_length_is_checked_against_the_limit_and_the_file(tmp_path: Path) -> None:
    from polyak.formats.safetensors import MAX_HEADER_SIZE

    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}")
    with pytest.raises(UnsafeFileError, match=_exact(
            f"{p}: the safetensors header claims {MAX_HEADER_SIZE + 1} bytes, above the {MAX_HEADER_SIZE}-byte "
            "limit; the file is corrupt or hostile")):
        SafetensorsSource(p)
    p.write_bytes(struct.pack("<Q", 3) + b"{}")
    with pytest.raises(FormatError, match=_exact(
            f"{p}: truncated or corrupt safetensors file: the header claims 3 bytes but the file has only 2 after "
            "the length field")):
        SafetensorsSource(p)
    p.write_bytes(struct.pack("<Q", 2) + b"{}")  # the header exactly fills the file: no tensors
    assert SafetensorsSource(p).infos() == {}
    index = _index(tmp_path, {"weight_map": {"a": "short.safetensors"}})
    (tmp_path / "short.safetensors").write_bytes(bytes(7))  # a shard is opened without sniffing
    with pytest.raises(FormatError, match=_exact(f"{index} (shard short.safetensors): truncated safetensors file "
                                                 "(7 bytes; the header length alone takes 8)")):
        polyak.open_source(index)


def test_the_header_length_at_its_edges(tmp_path: Path) -> None:
    from polyak.formats.safetensors import MAX_HEADER_SIZE

    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", MAX_HEADER_SIZE) + b"{}")  # at the limit: then checked against the file
    with pytest.raises(FormatError, match=_exact(
            f"{p}: truncated or corrupt safetensors file: the header claims {MAX_HEADER_SIZE} bytes but the file has "
            "only 2 after the length field")):
        SafetensorsSource(p)
    p.write_bytes(b"\xff" * 8 + b"{}")  # the length is unsigned: 2**64 - 1, not -1
    with pytest.raises(UnsafeFileError, match=_exact(
            f"{p}: the safetensors header claims {2**64 - 1} bytes, above the {MAX_HEADER_SIZE}-byte limit; the file "
            "is corrupt or hostile")):
        SafetensorsSource(p)
    p.write_bytes(bytes(8))  # exactly the length field, claiming an empty header
    with pytest.raises(FormatError, match=f"^{re.escape(str(p))}: corrupted safetensors header \\(not valid JSON: "):
        SafetensorsSource(p)
    folder = tmp_path / "d.safetensors"
    folder.mkdir()
    with pytest.raises(FormatError, match=_exact(f"{folder}: cannot read: Is a directory")):
        SafetensorsSource(folder)


def test_tensors_are_listed_in_file_order(tmp_path: Path) -> None:
    f32 = np.ones(2, np.float32).tobytes()
    # header order a, c; file order c (bytes 0-8), then a (8-16): not the names' order
    p = _st(tmp_path / "m.safetensors", {"a": _f32(2, 8), "c": _f32(2, 0)}, f32 * 2)
    assert list(SafetensorsSource(p).infos()) == ["c", "a"]
    # an empty tensor sorts by where it begins: e (at 8) after y (0-8), though both end at 8
    header = {"e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}, "y": _f32(2, 0), "x": _f32(2, 8)}
    assert list(SafetensorsSource(_st(tmp_path / "n.safetensors", header, f32 * 2)).infos()) == ["y", "e", "x"]


def _index(folder: Path, index: Any, shards: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    for name, state in (shards or {}).items():
        polyak.save(state, folder / name)
    p = folder / "model.safetensors.index.json"
    p.write_text(index if isinstance(index, str) else json.dumps(index))
    return p


@pytest.mark.parametrize(
    ("index", "error", "why"),
    [
        ({"weight_map": ["a"]}, FormatError, "corrupted index: 'weight_map' must map tensor names to shard files"),
        ({"weight_map": {"a": 1}}, FormatError, "corrupted index: 'weight_map' must map tensor names to shard files"),
        ({}, FormatError, "corrupted index: 'weight_map' must map tensor names to shard files"),
        ({"weight_map": {"a": "s1.safetensors"}, "metadata": [1]}, FormatError,
         "corrupted index: 'metadata' must be a JSON object"),
        ({"weight_map": {"a": "../s1.safetensors"}}, UnsafeFileError,
         "shard '../s1.safetensors' points outside the checkpoint folder; refusing it"),
        ({"weight_map": {"a": "/etc/passwd"}}, UnsafeFileError,
         "shard '/etc/passwd' points outside the checkpoint folder; refusing it"),
        ({"weight_map": {"a": "sub/s1.safetensors"}}, UnsafeFileError,
         "shard 'sub/s1.safetensors' points outside the checkpoint folder; refusing it"),
        ({"weight_map": {"a": "s9.safetensors"}}, FormatError, "shard s9.safetensors listed in the index is missing"),
        ({"weight_map": {"a": "s1.safetensors", "zz": "s1.safetensors"}}, FormatError,
         "tensor 'zz' is listed in the index but missing from shard s1.safetensors"),
        ({"weight_map": {"a": "s1.safetensors"}, "metadata": {"total_size": -1}}, FormatError,
         "corrupted index: metadata total_size -1 is not a byte count"),
        ({"weight_map": {"a": "s1.safetensors"}, "metadata": {"total_size": 1.5}}, FormatError,
         "corrupted index: metadata total_size 1.5 is not a byte count"),
        ({"weight_map": {"a": "s1.safetensors"}, "metadata": {"total_size": True}}, FormatError,
         "corrupted index: metadata total_size True is not a byte count"),
        ({"weight_map": {"a": "s1.safetensors"}, "metadata": {"total_size": "8"}}, FormatError,
         "corrupted index: metadata total_size '8' is not a byte count"),
        ({"weight_map": {"a": "s1.safetensors"}, "metadata": {"total_size": 10**6}}, FormatError,
         "the index claims total_size 1000000 bytes but its shards hold only {on_disk}; the index is corrupt or "
         "its shards are truncated"),
    ],
)
def test_each_index_claim_is_checked(tmp_path: Path, index: Any, error: type, why: str) -> None:
    p = _index(tmp_path, index, {"s1.safetensors": {"a": np.ones(2, np.float32)}})
    why = why.format(on_disk=(tmp_path / "s1.safetensors").stat().st_size)
    with pytest.raises(error, match=_exact(f"{p}: {why}")):
        SafetensorsIndexSource(p)


def test_an_index_that_is_not_an_object_or_cannot_be_read_is_named(tmp_path: Path) -> None:
    p = _index(tmp_path, {"weight_map": {"a": "s1.safetensors"}}, {"s1.safetensors": {"a": np.ones(2, np.float32)}})
    p.write_text("[1, 2]")
    with pytest.raises(FormatError, match=_exact("run/model.safetensors.index.json: corrupted index: a list, not a "
                                                 "JSON object")):
        SafetensorsIndexSource(p, label="run/model.safetensors.index.json")
    folder = tmp_path / "x.safetensors.index.json"
    folder.mkdir()
    with pytest.raises(FormatError, match=_exact(f"{folder}: cannot read: Is a directory")):
        SafetensorsIndexSource(folder)


def test_an_index_at_the_edges_is_read(tmp_path: Path) -> None:
    shards = {"s1.safetensors": {"a": np.ones(2, np.float32)}, "s2.safetensors": {"b": np.zeros(3, np.float32)}}
    p = _index(tmp_path, {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}, shards)
    on_disk = (tmp_path / "s1.safetensors").stat().st_size + (tmp_path / "s2.safetensors").stat().st_size
    for total in (None, 0, 20, on_disk, float(on_disk)):
        meta: dict[str, Any] = {"format": "pt", "nested": {"x": 1}}
        if total is not None:
            meta["total_size"] = total
        p.write_text(json.dumps({"metadata": meta, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
        with polyak.open_source(p) as src:
            assert src.read("a").tolist() == [1.0, 1.0] and src.read("b").tolist() == [0.0] * 3
            assert src.metadata()["format"] == "pt" and json.loads(src.metadata()["nested"]) == {"x": 1}
            assert "total_size" not in src.metadata()
    p.write_text(json.dumps({"metadata": None, "weight_map": {"a": "s1.safetensors"}}))
    with polyak.open_source(p) as src:
        assert list(src.infos()) == ["a"]


def test_an_implausibly_large_index_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polyak.formats import safetensors as st

    p = _index(tmp_path, {"weight_map": {"a": "s1.safetensors"}}, {"s1.safetensors": {"a": np.ones(2, np.float32)}})
    size = p.stat().st_size
    monkeypatch.setattr(st, "MAX_INDEX_SIZE", size - 1)
    with pytest.raises(UnsafeFileError, match=_exact(f"{p}: index file of {size} bytes is implausibly large")):
        polyak.open_source(p)
    monkeypatch.setattr(st, "MAX_INDEX_SIZE", size)
    assert polyak.open_source(p).keys() == ["a"]


def _npy(header: str | None = None, data: bytes = bytes(8), *, version: int = 1, pad_to: int = 0) -> bytes:
    text = header if header is not None else "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
    text = text.ljust(pad_to) + "\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1") + data
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(text)) + text.encode("latin1") + data


def _npz(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    return path


@pytest.mark.parametrize(
    ("members", "error", "why"),
    [
        ({"a.npy": _npy(), "notes.txt": b"x"}, FormatError, "unexpected member notes.txt (not a .npy array)"),
        ({"a.npy": b"\x93NUMPX" + bytes(20)}, FormatError, "member a.npy is not a .npy array"),
        ({"a.npy": b"\x93NUM"}, FormatError, "member a.npy is not a .npy array"),
        ({"a.npy": _npy(version=4)}, FormatError, "member a.npy has unsupported .npy version 4"),
        ({"a.npy": _npy(pad_to=100_000, version=2)}, UnsafeFileError,
         "member a.npy claims a 100001-byte .npy header (numpy itself refuses headers above 10000 bytes); "
         "the file is corrupt or hostile"),
        ({"a.npy": _npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }")}, UnsafeFileError,
         "array 'a' holds Python objects (a pickle); polyak never unpickles npz members. Save numeric arrays only."),
        ({"a.npy": _npy("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,), }")}, FormatError,
         "member a.npy has an invalid shape (2,)"),
        ({"a.npy": _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }")}, FormatError,
         "member a.npy has an invalid shape (-2,)"),
        ({"a.npy": _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }")}, FormatError,
         "member a.npy has an invalid shape (True,)"),
        ({"a.npy": _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2.0,), }")}, FormatError,
         "member a.npy has an invalid shape (2.0,)"),
        ({"a.npy": _npy(data=bytes(4))}, FormatError,
         "array 'a' should hold 8 bytes for shape (2,) float32, the archive member holds 4; "
         "the file is truncated or corrupt"),
        ({"a.npy": _npy(), "__polyak__.json": b'{"dtypes": {"a": 1}}'}, FormatError,
         "corrupted __polyak__.json: 'dtypes' must map names to strings"),
        ({"a.npy": _npy(), "__polyak__.json": b'{"metadata": ["x"]}'}, FormatError,
         "corrupted __polyak__.json: 'metadata' must map names to strings"),
        ({"a.npy": _npy(), "__polyak__.json": b'{"dtypes": {"a": "U4"}}'}, FormatError,
         "__polyak__.json records the dtype 'U4' for 'a', which is not a numeric dtype; the file is corrupt"),
        ({"a.npy": _npy(), "__polyak__.json": b'{"dtypes": {"a": "nonsense"}}'}, FormatError,
         "__polyak__.json records the dtype 'nonsense' for 'a', which is not a numeric dtype; the file is corrupt"),
        ({"a.npy": _npy(), "__polyak__.json": b'{"dtypes": {"a": "bfloat16"}}'}, FormatError,
         "dtype record for 'a' does not match the array"),
    ],
)
def test_each_npz_claim_is_checked(tmp_path: Path, members: dict[str, bytes], error: type, why: str) -> None:
    from polyak.formats.npz import NpzSource

    p = _npz(tmp_path / "m.npz", members)
    with pytest.raises(error, match=_exact(f"{p}: {why}")):
        NpzSource(p)  # the reader itself: the sniffer already refuses some of these


def test_a_corrupted_npy_header_is_named(tmp_path: Path) -> None:
    from polyak.formats.npz import NpzSource

    for header in ("not a dict", "{'descr': '<f4'}", "{'descr': 'zz', 'fortran_order': False, 'shape': (2,)}"):
        p = _npz(tmp_path / "m.npz", {"a.npy": _npy(header)})
        with pytest.raises(FormatError, match=f"^{re.escape(str(p))}: member a.npy has a corrupted .npy header \\(.+\\)$"):
            NpzSource(p)


def test_npz_members_at_the_edges_are_read(tmp_path: Path) -> None:
    import ml_dtypes

    from polyak.formats.npz import NpzSource

    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    bf = np.array([1.5, -2.0], ml_dtypes.bfloat16)
    p = _npz(tmp_path / "m.npz", {
        "v2.npy": _npy(data=np.array([1.0, 2.0], np.float32).tobytes(), version=2),
        "v3.npy": _npy(data=np.array([3.0, 4.0], np.float32).tobytes(), version=3),
        "big.npy": _npy(data=np.array([5.0, 6.0], np.float32).tobytes(), pad_to=100_000 - 1, version=2),  # at the limit
        "f.npy": _npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", fortran.tobytes(order="F")),
        "bf.npy": _npy("{'descr': '<u2', 'fortran_order': False, 'shape': (2,), }", bf.view(np.uint16).tobytes()),
        "e.npy": _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 2), }", b""),
        "__polyak__.json": b'{"dtypes": {"bf": "bfloat16"}, "metadata": {"k": "v"}}',
    })
    with NpzSource(p) as src:
        assert src.read("v2").tolist() == [1.0, 2.0] and src.read("v3").tolist() == [3.0, 4.0]
        assert src.read("big").tolist() == [5.0, 6.0]
        np.testing.assert_array_equal(src.read("f"), fortran)
        assert src.read("bf").dtype == ml_dtypes.bfloat16 and src.read("bf").tolist() == [1.5, -2.0]
        assert src.read("e").shape == (0, 2)
        assert src.metadata() == {"k": "v"}


def test_the_npz_metadata_member_has_a_size_limit(tmp_path: Path) -> None:
    from polyak.formats.npz import NpzSource

    at_limit = b'{"metadata": {"k": "v"}}'.ljust(10_000_000)
    assert NpzSource(_npz(tmp_path / "ok.npz", {"a.npy": _npy(), "__polyak__.json": at_limit})).metadata() == {"k": "v"}
    p = _npz(tmp_path / "big.npz", {"a.npy": _npy(), "__polyak__.json": at_limit + b" "})
    with pytest.raises(UnsafeFileError, match=_exact(f"{p}: __polyak__.json is implausibly large")):
        NpzSource(p)


def test_npz_messages_name_the_label_and_the_metadata_member(tmp_path: Path) -> None:
    from polyak.formats.npz import NpzSource, open_npz

    p = _npz(tmp_path / "m.npz", {"a.npy": b"\x93NUMPX" + bytes(20)})
    with pytest.raises(FormatError, match=_exact("run/m.npz: member a.npy is not a .npy array")):
        open_npz(p, label="run/m.npz")
    p = _npz(tmp_path / "m.npz", {"a.npy": _npy(), "__polyak__.json": b"{"})
    with pytest.raises(FormatError, match=f"^{re.escape(str(p))}: corrupted __polyak__.json \\(not valid JSON: "):
        NpzSource(p)
    (tmp_path / "z.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(FormatError, match=_exact(f"{tmp_path / 'z.npz'}: not a readable .npz archive "
                                                 "(File is not a zip file)")):
        NpzSource(tmp_path / "z.npz")


def test_npz_metadata_may_come_first_and_record_integer_dtypes(tmp_path: Path) -> None:
    from polyak.formats.npz import NpzSource

    p = _npz(tmp_path / "m.npz", {
        "__polyak__.json": b'{"dtypes": {"i": "int16", "u": "uint8"}}',
        "i.npy": _npy("{'descr': '<i2', 'fortran_order': False, 'shape': (2,), }", np.array([-3, 7], "<i2").tobytes()),
        "u.npy": _npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }", bytes([1, 255])),
    })
    with NpzSource(p) as src:
        assert sorted(src.infos()) == ["i", "u"]
        assert src.read("i").dtype == np.int16 and src.read("i").tolist() == [-3, 7]
        assert src.read("u").tolist() == [1, 255]


def _member_data_offset(path: Path, member: str) -> int:
    """Where ``member``'s bytes begin (past its local header), as the .keras reader finds them."""
    import zipfile

    from polyak.formats.keras_archive import _data_offset

    with zipfile.ZipFile(path) as zf:
        return _data_offset(path, zf.getinfo(member))


def test_an_npz_that_changes_under_the_reader_is_refused_when_read(tmp_path: Path) -> None:
    from polyak.formats.npz import NpzSource

    n = 50_000  # larger than a file buffer: what the reader cached at open is not what it reads later
    a = _npy(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({n},), }}", np.ones(n, np.float32).tobytes())
    p = _npz(tmp_path / "m.npz", {"a.npy": a, "b.npy": _npy()})
    start = _member_data_offset(p, "a.npy")
    for where, byte, message in [
        (start + len(a) - 1, b"\x7f", "m.npz: cannot read array 'a' (BadZipFile: Bad CRC-32 for file 'a.npy')"),
        (start, b"X", "m.npz: member a.npy is not a .npy array"),  # the .npy magic itself
    ]:
        _npz(p, {"a.npy": a, "b.npy": _npy()})
        with NpzSource(p, label="m.npz") as src:
            with p.open("r+b") as f:
                f.seek(where)
                f.write(byte)
            with pytest.raises(FormatError, match=_exact(message)):
                src.read("a")
            assert src.read("b").tolist() == [0.0, 0.0]


def _check_pt_error(tmp_path: Path, obj: Any, key: str | None, error: type[BaseException], message: str) -> None:
    """``obj`` saved as a .pt file is refused with exactly ``error`` and ``message`` (``P`` = the path)."""
    torch = pytest.importorskip("torch")
    p = tmp_path / "x.pt"
    torch.save(obj, p)
    with pytest.raises(error, match=_exact(message.replace("P: ", f"{p}: ", 1))) as info:
        polyak.open_source(p, key=key)
    assert type(info.value) is error


def test_each_pt_claim_is_checked(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    w = torch.ones(2)
    with warnings.catch_warnings():  # torch's deprecation notice of quantized tensors
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    cases: list[tuple[Any, str | None, type, str]] = [
        ([w], None, FormatError, "P: holds a list, not a state dict; save model.state_dict() (or a dict of tensors)"),
        ({"model": {"w": w}, "epoch": 3}, "nope", polyak.ConfigError,
         "P: no key 'nope' in the checkpoint; the keys at the top level: 'model', 'epoch'"),
        ({"model": {"w": w}, "epoch": 3}, "epoch/x", polyak.ConfigError,
         "P: no key 'epoch/x' in the checkpoint; 'epoch' holds a value of type int, not a dict"),
        ({"a": {"b": {"w": w}}, "c": {}}, "a/zz", polyak.ConfigError,
         "P: no key 'a/zz' in the checkpoint; the keys under 'a': 'b'"),
        ({"a": {}, "w": w}, "a/zz", polyak.ConfigError, "P: no key 'a/zz' in the checkpoint; the keys under 'a': none"),
        ({"a": {"b": {"w": w}}}, "a/b/zz", polyak.ConfigError,
         "P: no key 'a/b/zz' in the checkpoint; the keys under 'a/b': 'w'"),
        ({"a": {"b": 3}, "w": w}, "a/b/c", polyak.ConfigError,
         "P: no key 'a/b/c' in the checkpoint; 'a/b' holds a value of type int, not a dict"),
        ({"model": {"w": w}, "epoch": 3}, "epoch", polyak.ConfigError, "P: the entry 'epoch' holds no tensors"),
        ({"model": {"w": w}, "opt": {"lr": 0.1}}, "opt", polyak.ConfigError, "P: the entry 'opt' holds no tensors"),
        ({"epoch": 3, "lr": 0.1}, None, FormatError, "P: no tensors found (top-level keys: 'epoch', 'lr')"),
        ({"model": {"w": w}, "ema": {"w": w}, "step": 1}, None, polyak.ConfigError,
         "P: the checkpoint holds several state dicts ('model', 'ema'); choose one with --key (key=), e.g. --key model"),
        ({0: w}, None, FormatError, "P: tensor key 0 is of type int, not a name; not a state dict"),
        ({"model": {0: w}, "epoch": 3}, None, FormatError, "P: tensor key 0 is of type int, not a name; not a state dict"),
        ({"model": {("a",): w}}, "model", FormatError, "P: tensor key ('a',) is of type tuple, not a name; not a state dict"),
        ({"w": w.to_sparse()}, None, FormatError,
         "P: tensor 'w' is a sparse tensor (torch.sparse_coo); polyak averages dense tensors. Save it dense: "
         "state[name] = state[name].to_dense()"),
        ({"w": torch.empty(2, device="meta")}, None, FormatError,
         "P: tensor 'w' is on the 'meta' device and holds no data (the model was saved before its weights were "
         "materialised). Materialise it first (e.g. model.to_empty(device='cpu') and load or initialise the "
         "weights), then save again"),
        ({"w": quantized}, None, FormatError,
         "P: tensor 'w' is quantized (torch.quint8); polyak averages floating tensors. Save it dequantized: "
         "state[name] = state[name].dequantize()"),
    ]
    for obj, key, error, message in cases:
        _check_pt_error(tmp_path, obj, key, error, message)


def test_pt_state_dicts_are_found_where_they_are(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    w = torch.arange(2.0)
    for obj, key, found in [
        ({"w": w, "step": 3}, None, None),  # flat: the tensors, other entries ignored
        ({"model": {"w": w, "n": 3}, "epoch": 3}, None, "model"),  # the one nested state dict
        ({"a": {"b": {"w": w}}}, "a/b", "a/b"),
    ]:
        p = tmp_path / "x.pt"
        torch.save(obj, p)
        with polyak.open_source(p, key=key) as src:
            assert src.keys() == ["w"] and src.read("w").tolist() == [0.0, 1.0] and src.extras()["key"] == found


def test_a_pt_zip_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from polyak.formats.torch_pt import load_state

    p = tmp_path / "x.pt"
    p.write_bytes(b"PK\x03\x04" + bytes(40) + b"PK\x05\x06" + bytes(18))  # a zip whose directory is nonsense
    with pytest.raises(FormatError, match=f"^{re.escape(str(p))}: not a readable PyTorch checkpoint \\(RuntimeError: "
                                          ".*archive does not contain any files\\)$"):  # torch's words, any version
        load_state(p, str(p))


def test_h5_string_list_attributes_in_every_way_keras_stores_them(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    from polyak.formats._h5 import has_attr_list, read_attr_list

    names = ["dense", "dénse_1", "层"]
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.attrs["fixed"] = np.asarray([n.encode("utf-8") for n in names])  # Keras 2: fixed-length UTF-8 bytes
        f.attrs["vlen"] = np.array(names, dtype=h5py.string_dtype())  # variable-length str
        f.attrs["split0"] = np.asarray([n.encode("utf-8") for n in names[:2]])  # above 64 KiB: numbered chunks
        f.attrs["split1"] = np.asarray([names[2].encode("utf-8")])
        f.attrs["empty"] = np.zeros(0)  # an empty list: a float64 array of length 0
        f.attrs["one"] = np.bytes_(b"dense")
        assert [read_attr_list(f, a) for a in ("fixed", "vlen", "split", "empty", "one", "missing")] == [
            names, names, names, [], ["dense"], None]
        assert has_attr_list(f, "split") and has_attr_list(f, "fixed") and not has_attr_list(f, "missing")


_PICKLE_REFUSAL = (
    "P: refused to load: the file contains Python objects that only an unsafe pickle load could build{what}. "
    "polyak loads .pt files with torch.load(weights_only=True) and never falls back to running code from a file. "
    "If you trust this file, convert it once: state = torch.load(path, weights_only=False); then save the tensors "
    "with safetensors.torch.save_file(state['model'], 'model.safetensors') or torch.save(state['model'], 'model.pt')."
)


def test_a_pt_with_python_objects_is_refused_naming_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import fractions

    torch = pytest.importorskip("torch")
    obj = {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}  # as fairseq checkpoints hold
    _check_pt_error(tmp_path, obj, None, UnsafeFileError, _PICKLE_REFUSAL.format(what=" (it references argparse.Namespace)"))
    _check_pt_error(tmp_path, {**obj, "best": fractions.Fraction(1, 3)}, None, UnsafeFileError,
                    _PICKLE_REFUSAL.format(what=" (it references argparse.Namespace, fractions.Fraction)"))

    def broken(path: str) -> list[str]:
        raise RuntimeError("cannot list")

    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", broken)
    _check_pt_error(tmp_path, obj, None, UnsafeFileError, _PICKLE_REFUSAL.format(what=""))
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")  # torch < 2.5 has none
    _check_pt_error(tmp_path, obj, None, UnsafeFileError, _PICKLE_REFUSAL.format(what=""))


def test_pt_files_are_loaded_safely_onto_the_cpu_and_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch before 2.6 defaults to weights_only=False and loads tensors onto the device they
    # were saved from: polyak must say what it wants on every torch it accepts
    torch = pytest.importorskip("torch")
    from polyak.formats.torch_pt import load_state

    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert load_state(tmp_path / name, name)["w"].tolist() == [1.0, 1.0]
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True},  # mapped: read as averaged
                     {"map_location": "cpu", "weights_only": True, "mmap": False}]  # a legacy file cannot be


def test_a_pt_zip_with_a_broken_directory_is_named(tmp_path: Path) -> None:
    import zipfile

    pytest.importorskip("torch")
    from polyak.formats.torch_pt import load_state

    p = tmp_path / "x.pt"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
    raw = p.read_bytes()
    at = raw.rindex(b"PK\x01\x02")
    p.write_bytes(raw[:at] + b"PK\x01\x09" + raw[at + 4:])  # the end record is fine, the directory is not
    with pytest.raises(FormatError, match=_exact(f"{p}: not a readable PyTorch checkpoint (BadZipFile: Bad magic "
                                                 "number for central directory)")):
        load_state(p, str(p))


def test_keras_archive_members_are_read_up_to_their_limit_exactly(tmp_path: Path) -> None:
    import zipfile

    from polyak.formats.keras_archive import read_member

    with zipfile.ZipFile(tmp_path / "m.keras", "w") as zf:
        zf.writestr("at.json", b"x" * 16)
        zf.writestr("over.json", b"x" * 17)
    with zipfile.ZipFile(tmp_path / "m.keras") as zf:
        assert read_member(zf, "at.json", "m.keras", limit=16) == b"x" * 16
        with pytest.raises(UnsafeFileError, match=_exact("m.keras: member over.json is larger than 16 bytes; "
                                                         "refusing it")):
            read_member(zf, "over.json", "m.keras", limit=16)


def _keras_file(tmp_path: Path, *, extra: bytes = b"") -> Path:
    """A .keras archive as keras.saving writes it (members stored), ``extra`` in the weights' header."""
    pytest.importorskip("h5py")
    from _formats_samples import _keras_archive

    return _keras_archive(tmp_path, {"dense": np.arange(3, dtype=np.float32)}, extra=extra)[0]


def test_keras_archive_weights_behind_a_large_extra_field_are_found(tmp_path: Path) -> None:
    # the header's name and extra lengths are unsigned 16-bit fields: 40000 is a valid extra length
    extra = struct.pack("<HH", 0xCAFE, 39_996) + bytes(39_996)
    with polyak.open_source(_keras_file(tmp_path, extra=extra)) as src:
        assert src.read("layers/dense/vars/0").tolist() == [0.0, 1.0, 2.0]


def test_a_keras_archive_with_a_corrupt_local_header_is_named(tmp_path: Path) -> None:
    import zipfile

    path = _keras_file(tmp_path)
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo("model.weights.h5").header_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 3] = 0x09  # PK\x03\x09: not a local file header
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=_exact(f"{path}: corrupt zip entry for model.weights.h5")):
        polyak.open_source(path)


def test_h5_dtypes_and_external_data(tmp_path: Path) -> None:
    import ml_dtypes

    h5py = pytest.importorskip("h5py")
    from polyak.formats._h5 import check_dataset, dataset_dtype

    with h5py.File(tmp_path / "a.h5", "w") as f:
        for name, tag in (("str", "bfloat16"), ("bytes", np.bytes_(b"bfloat16")), ("wrong", "float32"),
                          ("junk", "nonsense")):
            ds = f.create_dataset(name, data=np.zeros(2, np.uint16).view(np.dtype("V2")))  # Keras' opaque bfloat16
            ds.attrs["dtype"] = tag
        f.create_dataset("untagged", data=np.zeros(2, np.uint16).view(np.dtype("V2")))
        f.create_dataset("text", data=np.array([b"ab"]))
        assert [dataset_dtype(f[n]) for n in ("str", "bytes", "wrong", "junk", "untagged", "text")] == [
            np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.bfloat16), None, None, None, None]
        assert [dataset_dtype(f.create_dataset(k, data=np.zeros(1, k))) for k in ("?", "i2", "u1", "f8", "c8")] == [
            np.dtype(k) for k in ("?", "i2", "u1", "f8", "c8")]
        f.create_dataset("ext", shape=(4,), dtype="<f4", external=[("secret.bin", 0, 16)])
        with pytest.raises(UnsafeFileError, match=_exact("a.h5: dataset 'ext' keeps its data in external files "
                                                         "[('secret.bin', 0, 16)]; polyak (like Keras) refuses HDF5 "
                                                         "data outside the checkpoint")):
            check_dataset(f["ext"], "a.h5", "ext")


def test_h5_links_and_external_data_are_refused_where_they_sit(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    from polyak.formats._h5 import walk

    tail = "; polyak (like Keras) refuses links, which can point outside the checkpoint"
    for kind, make in (("soft link", lambda g: h5py.SoftLink("/layers")),
                       ("external link", lambda g: h5py.ExternalLink("other.h5", "/x"))):
        with h5py.File(tmp_path / "a.h5", "w") as f:
            f.create_dataset("layers/dense/vars/0", data=np.ones(2, np.float32))
            f["layers/dense/vars"]["1"] = make(f)
            with pytest.raises(UnsafeFileError, match=_exact(f"a.h5: 'layers/dense/vars/1' is an HDF5 {kind}{tail}")):
                list(walk(f, "a.h5"))
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("layers/dense/vars/0", shape=(4,), dtype="<f4", external=[("secret.bin", 0, 16)])
        with pytest.raises(UnsafeFileError, match=_exact("a.h5: dataset 'layers/dense/vars/0' keeps its data in "
                                                         "external files [('secret.bin', 0, 16)]; polyak (like Keras) "
                                                         "refuses HDF5 data outside the checkpoint")):
            list(walk(f, "a.h5"))


def test_h5_shape_bombs_are_refused_at_both_limits(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    from polyak.formats._h5 import _BOMB_FLOOR, _MAX_EXPANSION, check_dataset

    chunk = 1 << 20  # float32 elements: 4 MiB chunks, stored uncompressed, allocated only when written
    with h5py.File(tmp_path / "a.h5", "w") as f:
        floor = f.create_dataset("floor", shape=(_BOMB_FLOOR // 4,), dtype="<f4", chunks=(chunk,))  # nothing stored
        over = f.create_dataset("over", shape=(_BOMB_FLOOR // 4 + 1,), dtype="<f4", chunks=(chunk,))
        small = f.create_dataset("small", shape=(2,), dtype="<f4", chunks=(2,))  # declares 8 bytes, stores 0
        ratio = f.create_dataset("ratio", shape=(_MAX_EXPANSION * 2 * chunk,), dtype="<f4", chunks=(chunk,))
        ratio[: 2 * chunk] = 1.0  # stores exactly 1/_MAX_EXPANSION of what it declares
        beyond = f.create_dataset("beyond", shape=(_MAX_EXPANSION * 2 * chunk + 1,), dtype="<f4", chunks=(chunk,))
        beyond[: 2 * chunk] = 1.0
        assert ratio.id.get_storage_size() == 8 * chunk and ratio.size * 4 > _BOMB_FLOOR
        empty = f.create_dataset("empty", data=h5py.Empty("<f4"))  # a null dataspace: shape None
        scalar = f.create_dataset("scalar", data=np.float32(1))
        for ok in (floor, small, ratio, empty, scalar):
            check_dataset(ok, "a.h5", ok.name)
        for bomb in (over, beyond):
            with pytest.raises(UnsafeFileError, match=_exact(
                    f"a.h5: dataset {bomb.name!r} declares {bomb.size * 4} bytes but stores "
                    f"{bomb.id.get_storage_size()}; refusing a likely decompression bomb")):
                check_dataset(bomb, "a.h5", bomb.name)


def _zip_entry(size: int, stored: int, *, deflated: bool = False, at: int = 0, name: str = "w.npy",
               method: int | None = None) -> Any:
    import zipfile

    zi = zipfile.ZipInfo(name)
    zi.file_size, zi.compress_size, zi.header_offset = size, stored, at
    zi.compress_type = method if method is not None else zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED
    return zi


class _Directory:
    """What check_zip reads of an archive: its directory (whoever made the file wrote it)."""

    def __init__(self, *entries: Any) -> None:
        self.entries, self.fp = list(entries), None

    def infolist(self) -> list[Any]:
        return self.entries


def test_check_zip_at_each_limit_and_one_beyond() -> None:
    from polyak.formats._common import DEFLATE_MAX_RATIO, MAX_ARCHIVE_TOTAL, RATIO_FLOOR, check_zip

    big = 1 << 50  # an archive size that no claim below reaches
    ok = [
        (_zip_entry(10, 10, at=90), 100, 1000),  # its bytes end exactly at the end of the archive
        (_zip_entry(DEFLATE_MAX_RATIO * 10 + 1024, 10, deflated=True), big, 10**9),  # all deflate can give
        (_zip_entry(RATIO_FLOOR, RATIO_FLOOR // 1000, deflated=True), big, 10),  # small members may compress well
        (_zip_entry(20 * 2**20, 2**20, deflated=True), big, 20),  # at the ratio
        (_zip_entry(1024, 0, deflated=True), big, 10),  # deflate's allowance for tiny members
    ]
    for zi, size, ratio in ok:
        check_zip(_Directory(zi), "m.npz", max_ratio=ratio, archive_size=size)  # type: ignore[arg-type]
    half = MAX_ARCHIVE_TOTAL // 2
    check_zip(_Directory(_zip_entry(half, half), _zip_entry(half, half, name="b.npy")), "m.npz",  # type: ignore[arg-type]
              max_ratio=10, archive_size=big)
    refused = [
        (_zip_entry(10, 11, at=90), 100, 1000, FormatError,
         "m.npz: member w.npy claims 11 bytes beyond the end of the 100-byte archive; the file is truncated or corrupt"),
        (_zip_entry(11, 10), big, 1000, FormatError,
         "m.npz: stored member w.npy claims 11 bytes of content in 10 bytes; the archive is corrupt"),
        (_zip_entry(DEFLATE_MAX_RATIO * 10 + 1025, 10, deflated=True), big, 10**9, UnsafeFileError,
         f"m.npz: member w.npy claims to inflate 10 bytes to {DEFLATE_MAX_RATIO * 10 + 1025}, more than deflate can; "
         "refusing a corrupt or hostile archive"),
        (_zip_entry(20 * 2**20 + 1, 2**20, deflated=True), big, 20, UnsafeFileError,
         f"m.npz: member w.npy declares {20 * 2**20 + 1} bytes but stores {2**20} (expands 20×); refusing a likely zip bomb"),
        (_zip_entry(RATIO_FLOOR + 1, RATIO_FLOOR // 1000, deflated=True), big, 10, UnsafeFileError,
         f"m.npz: member w.npy declares {RATIO_FLOOR + 1} bytes but stores {RATIO_FLOOR // 1000} "
         f"(expands {(RATIO_FLOOR + 1) // (RATIO_FLOOR // 1000)}×); refusing a likely zip bomb"),
        (_zip_entry(RATIO_FLOOR + 1, 0, deflated=True), big, 10**9, UnsafeFileError,
         f"m.npz: member w.npy claims to inflate 0 bytes to {RATIO_FLOOR + 1}, more than deflate can; "
         "refusing a corrupt or hostile archive"),
        (_zip_entry(RATIO_FLOOR + 1, 0, method=14), big, RATIO_FLOOR, UnsafeFileError,  # LZMA: no deflate bound
         f"m.npz: member w.npy declares {RATIO_FLOOR + 1} bytes but stores 0 (expands {RATIO_FLOOR + 1}×); "
         "refusing a likely zip bomb"),
        (_zip_entry(1025, 0, deflated=True), big, 10**9, UnsafeFileError,
         "m.npz: member w.npy claims to inflate 0 bytes to 1025, more than deflate can; refusing a corrupt or "
         "hostile archive"),
    ]
    for zi, size, ratio, error, message in refused:
        with pytest.raises(error, match=_exact(message)):
            check_zip(_Directory(_zip_entry(1, 1, name="a.npy"), zi), "m.npz",  # type: ignore[arg-type]
                      max_ratio=ratio, archive_size=size)
    with pytest.raises(UnsafeFileError, match=_exact(f"m.npz: the archive claims {MAX_ARCHIVE_TOTAL + 1} bytes of "
                                                     "content; refusing it")):
        check_zip(_Directory(_zip_entry(half, half), _zip_entry(half + 1, half + 1, name="b.npy")),  # type: ignore[arg-type]
                  "m.npz", max_ratio=10, archive_size=big)


def test_check_zip_measures_the_archive_itself(tmp_path: Path) -> None:
    import zipfile

    from polyak.formats._common import check_zip

    p = tmp_path / "m.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("a.npy", b"x" * 100)
    with zipfile.ZipFile(p) as zf:
        check_zip(zf, "m.npz", max_ratio=10)  # the archive's own size, read from its file
        lie = zf.infolist()[0]
        lie.compress_size = lie.file_size = p.stat().st_size  # its bytes, from offset 1, run past the end
        lie.header_offset = 1
        with pytest.raises(FormatError, match=f"^m.npz: member a.npy claims {p.stat().st_size} bytes beyond the end "
                                              f"of the {p.stat().st_size}-byte archive"):
            check_zip(zf, "m.npz", max_ratio=10)
    with pytest.raises(FormatError, match="^m.npz: member a.npy claims 100 bytes beyond the end of the 0-byte"):
        check_zip(_Directory(_zip_entry(100, 100, name="a.npy")), "m.npz", max_ratio=10)  # type: ignore[arg-type]


def test_an_npz_whose_deflate_stream_is_damaged_is_named(tmp_path: Path) -> None:
    import zipfile

    from polyak.formats.npz import NpzSource

    p = tmp_path / "m.npz"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.npy", _npy(data=np.arange(2, dtype=np.float32).tobytes()))
    start = _member_data_offset(p, "a.npy")
    raw = bytearray(p.read_bytes())
    raw[start] = 0xFF  # the first deflate block header: an invalid block type
    p.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=f"^{re.escape(str(p))}: corrupt .npz archive \\(error: Error -3 while "
                                          "decompressing data: .+\\)$"):
        NpzSource(p)
