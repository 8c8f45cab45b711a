"""Hostile files: nothing from a file is ever executed, nothing points outside, no bombs.

Every crafted file here would run code, read outside its folder or exhaust memory if
polyak trusted it. Each must be refused with :class:`polyak.UnsafeFileError` (or a
``FormatError``) naming the file, and the side effect (a marker file) must never happen.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import polyak
from _hostile import leftovers, one_line_error, read_all, run_cli
from polyak.cli import main as cli_main


class _RunsCode:
    """Unpickling this object runs ``os.system``; a safe loader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _evil_pt(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    torch = pytest.importorskip("torch")
    state = {"w": torch.zeros(3), "payload": _RunsCode(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickle_that_runs_code_is_refused(tmp_path: Path, legacy: bool, suffix: str) -> None:
    marker = tmp_path / "PWNED"
    path = _evil_pt(tmp_path / f"evil{suffix}", marker, legacy=legacy)
    with pytest.raises(polyak.UnsafeFileError, match=f"^{re.escape(str(path))}: ") as info:
        polyak.open_source(path)
    text = str(info.value)
    assert "weights_only=True" in text and "never falls back" in text
    assert "If you trust this file, convert it" in text and "safetensors" in text
    assert not marker.exists()


def test_pickle_that_runs_code_via_cli_and_average(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "PWNED"
    good = tmp_path / "a_1.pt"
    torch.save({"w": torch.ones(3)}, good)
    evil = _evil_pt(tmp_path / "a_2.pt", marker)
    out = tmp_path / "avg.safetensors"
    assert cli_main(["average", str(good), str(evil), "-o", str(out), "-q"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(evil) in line and "UnsafeFile" not in line
    assert not marker.exists() and not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(polyak.UnsafeFileError, match=f"^{re.escape(str(evil))}: .*weights_only=True"):
        polyak.average([good, evil])
    assert not marker.exists()


def test_raw_pickle_with_pt_suffix_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
    with pytest.raises(polyak.UnsafeFileError, match=r"model\.pt"):
        polyak.open_source(path)
    assert not marker.exists()


def test_npz_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "m.npz"
    obj = np.empty(1, dtype=object)
    obj[0] = _RunsCode(marker)
    np.savez(path, w=np.ones(3, np.float32), evil=obj)
    with pytest.raises(polyak.UnsafeFileError, match=r"(?s)m\.npz.*'evil'.*pickle"):
        polyak.open_source(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "shard",
    ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", ".", "..", "sub/x.safetensors"],
)
def test_index_pointing_outside_its_folder_is_refused(tmp_path: Path, shard: str) -> None:
    st = pytest.importorskip("safetensors.numpy")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    st.save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "outside.safetensors"))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": shard}}))
    with pytest.raises(polyak.UnsafeFileError, match="outside the checkpoint folder") as info:
        polyak.open_source(index)
    assert str(index) in str(info.value)


def test_index_with_absurd_total_size_or_shape_is_refused(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    st.save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "s.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 10**30}, "weight_map": {"w": "s.safetensors"}}))
    with pytest.raises(polyak.FormatError, match="total_size"):
        polyak.open_source(index)
    index.write_text(json.dumps({"metadata": {"total_size": "x"}, "weight_map": {"w": "s.safetensors"}}))
    with pytest.raises(polyak.FormatError, match="total_size"):
        polyak.open_source(index)


def _safetensors_bytes(header: dict[str, object], data: bytes = b"", *, claimed: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


@pytest.mark.parametrize(
    ("header", "data", "claimed", "error", "match"),
    [
        ({}, b"", 2**63, polyak.FormatError, "header"),
        ({}, b"", 200_000_000, polyak.FormatError, "header"),
        ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8, None, polyak.FormatError, "'w'"),
        ({"w": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}, b"", None, polyak.FormatError, "'w'"),
        ({"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}, b"\0" * 8, None, polyak.FormatError, "truncated"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, polyak.FormatError, "'w'"),
        ({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4, None, polyak.FormatError, "'w'"),
        ({"w": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, polyak.FormatError, "dtype"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, None, polyak.FormatError, "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", None, polyak.FormatError, "__metadata__"),
        ({"w": [1, 2]}, b"", None, polyak.FormatError, "'w'"),
    ],
    ids=["len-2^63", "len-200MB", "shape-overflow", "shape-huge-empty", "beyond-file", "negative-dim",
         "float-dim", "bad-dtype", "overlap", "bad-metadata", "entry-not-object"],
)
def test_safetensors_absurd_header_refused_before_allocation(
    tmp_path: Path, header: dict[str, object], data: bytes, claimed: int | None, error: type[Exception], match: str
) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(header, data, claimed=claimed))
    with pytest.raises(error, match=match) as info:
        # format= skips the suffix sniffing, so the reader's own checks are what is tested.
        polyak.open_source(path, format="safetensors")
    assert str(path) in str(info.value)


def _npz_with_member(path: Path, member: str, payload: bytes, *, compress: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        zf.writestr(member, payload)


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def test_npz_huge_shape_claim_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    _npz_with_member(path, "w.npy", _npy_header("<f4", (2**40, 2**40)))
    with pytest.raises(polyak.FormatError, match=r"'w'.*truncated or corrupt"):
        polyak.open_source(path)


def test_npz_zip_bomb_refused_before_inflating(tmp_path: Path) -> None:
    # 8 MB of zeros deflate to ~8 KB (1000x, allowed below 16 MB); patch the directory so
    # the member claims far more than deflate can produce from its bytes.
    path = tmp_path / "m.npz"
    payload = _npy_header("<f4", (2 * 2**20,)) + bytes(8 * 2**20)
    _npz_with_member(path, "w.npy", payload, compress=zipfile.ZIP_DEFLATED)
    polyak.open_source(path).close()  # genuine deflate, small: allowed
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        zi = zf.getinfo("w.npy")
    # Claim 1 TB uncompressed in the central directory (and the local header).
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, 0xFFFFFFFF - 1)
    struct.pack_into("<I", data, zi.header_offset + 22, 0xFFFFFFFF - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(polyak.UnsafeFileError, match="more than deflate can"):
        polyak.open_source(path)


def test_npz_member_beyond_archive_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, w=np.ones(1000, np.float32))
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 20, 10**9)  # compressed size
    struct.pack_into("<I", data, cd + 24, 10**9)  # uncompressed size
    path.write_bytes(bytes(data))
    with pytest.raises(polyak.FormatError, match="beyond the end"):
        polyak.open_source(path)


def test_npz_big_npy_header_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    _npz_with_member(path, "w.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 50_000_000) + b"{" * 100)
    with pytest.raises(polyak.UnsafeFileError, match="header"):
        polyak.open_source(path)


def test_hostile_file_via_cli_subprocess_no_traceback(tmp_path: Path) -> None:
    """One real subprocess: exit status 2, one line, no traceback, no output, no temp."""
    np.savez(tmp_path / "m_1.npz", w=np.ones(3, np.float32))
    obj = np.empty(1, dtype=object)
    np.savez(tmp_path / "m_2.npz", w=np.ones(3, np.float32), evil=obj)
    out = tmp_path / "avg.npz"
    proc = run_cli(["average", str(tmp_path / "m_1.npz"), str(tmp_path / "m_2.npz"), "-o", str(out)])
    assert proc.returncode == 2, proc.stderr
    assert "m_2.npz" in one_line_error(proc.stderr)
    assert not out.exists() and leftovers(tmp_path) == []


def test_reading_good_files_still_works(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", w=np.arange(6, dtype=np.float32).reshape(2, 3))
    got = read_all(tmp_path / "m.npz")
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


# --- Keras / HDF5 -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["keras-weights", "keras2-h5", "keras"])
@pytest.mark.parametrize("attack", ["soft-link", "external-link", "external-storage", "virtual"])
def test_hdf5_links_and_external_data_refused(tmp_path: Path, name: str, attack: str) -> None:
    """Links and external/virtual storage could read other files (e.g. /etc/shadow): refused."""
    h5py = pytest.importorskip("h5py")
    from _formats_samples import SAMPLES, sample_state

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as g:
        g["w"] = np.ones(4, np.float32)
    folder = tmp_path / "m"
    folder.mkdir()
    path, _ = SAMPLES["keras-weights" if name == "keras" else name].make(folder, sample_state(0))
    with h5py.File(path, "a") as f:
        group = f["layers"] if "layers" in f else f[next(iter(f))]
        if attack == "soft-link":
            group["alias"] = h5py.SoftLink("/" + next(iter(f)))
        elif attack == "external-link":
            group["alias"] = h5py.ExternalLink(str(outside), "/w")
        elif attack == "external-storage":
            group.create_dataset("ext", shape=(4,), dtype="<f4", external=[(str(secret), 0, 16)])
        else:
            layout = h5py.VirtualLayout(shape=(4,), dtype="<f4")
            layout[:] = h5py.VirtualSource(str(outside), "w", shape=(4,))
            group.create_virtual_dataset("virt", layout)
    if name == "keras":
        archive = folder / "model.keras"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("config.json", "{}")
            zf.writestr("metadata.json", "{}")
            zf.write(path, "model.weights.h5")
        path = archive
    with pytest.raises(polyak.UnsafeFileError, match=f"^{re.escape(str(path))}: "):
        read_all(path)


def test_keras_archive_bomb_and_hostile_metadata(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"\0" * (40 << 20))
    with pytest.raises(polyak.UnsafeFileError, match="bomb"):
        polyak.open_source(bomb)
    bad_meta = tmp_path / "meta.keras"
    with zipfile.ZipFile(bad_meta, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("metadata.json", "[1, 2]")
        zf.writestr("model.weights.h5", b"")
    with pytest.raises(polyak.FormatError, match=r"meta\.keras"):
        polyak.open_source(bad_meta)
