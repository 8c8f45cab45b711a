"""Archive bombs in every zip-based format, and ``.pt`` tensors that hold no plain array.

Every zip-based format (``.npz`` stored and compressed, ``.keras``, ``.pt``) goes through
one check of the archive's directory against the file (``polyak.formats._common.check_zip``)
before anything is inflated or handed to ``torch.load``. Each format gets each bomb: a
member that inflates far beyond its stored size, a directory that claims more than the
member's bytes can hold, and a member that claims bytes beyond the end of the file.
"""

from __future__ import annotations

import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import pytest

import polyak
from _formats_samples import SAMPLES, available, sample_state
from _hostile import leftovers, one_line_error
from polyak.cli import main as cli_main

ZIP_SAMPLES = ["npz", "npz-compressed", "keras", "torch"]
BOMB = 64 << 20  # inflates from ~64 kB: past the 16 MiB floor, > 1000×


def _sample(tmp_path: Path, name: str) -> Path:
    sample = SAMPLES[name]
    if not available(sample):
        pytest.skip(f"{name} needs {', '.join(sample.needs)}")
    folder = tmp_path / "src"
    folder.mkdir()
    path, _ = sample.make(folder, sample_state(0))
    return path


def _victim(zf: zipfile.ZipFile, name: str) -> str:
    """The member a bomb replaces: the pickle of a .pt, the weights of a .keras, an array."""
    names = zf.namelist()
    for suffix in ("data.pkl", "model.weights.h5"):
        for n in names:
            if n.endswith(suffix):
                return n
    return next(n for n in names if n.endswith(".npy"))


def _inflating(src: Path, dst: Path) -> None:
    """Rewrite ``src`` with its main member replaced by 64 MiB of zeros, deflated (~1000×)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        victim = _victim(zin, src.name)
        for zi in zin.infolist():
            if zi.filename == victim:
                zout.writestr(zi.filename, bytes(BOMB), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            else:
                zout.writestr(zi, zin.read(zi))


def _patch_directory(src: Path, dst: Path, field: str) -> None:
    """Copy ``src`` with one size in the victim's central-directory record made up."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        victim = _victim(zf, src.name).encode()
    pos = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        assert pos >= 0, "victim not found in the central directory"
        (name_len,) = struct.unpack_from("<H", data, pos + 28)
        if bytes(data[pos + 46 : pos + 46 + name_len]) == victim:
            break
        pos += 4
    if field == "uncompressed":
        struct.pack_into("<I", data, pos + 24, 0xFFFFFFFE)  # claims 4 GiB of content
    else:
        struct.pack_into("<I", data, pos + 20, 10**9)  # its bytes run past the end
        struct.pack_into("<I", data, pos + 24, 10**9)
    dst.write_bytes(bytes(data))


BOMBS = {
    "inflates-1000x": (lambda s, d: _inflating(s, d), polyak.UnsafeFileError, r"declares \d+ bytes but stores \d+ \(expands \d+×\); refusing a likely zip bomb"),
    "directory-lies": (
        lambda s, d: _patch_directory(s, d, "uncompressed"),
        polyak.FormatError,
        r"(stored member .* claims 4294967294 bytes of content in \d+ bytes|claims to inflate \d+ bytes to 4294967294, more than deflate can)",
    ),
    "beyond-the-end": (
        lambda s, d: _patch_directory(s, d, "compressed"),
        polyak.FormatError,
        r"claims 1000000000 bytes beyond the end of the \d+-byte archive",
    ),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
@pytest.mark.parametrize("name", ZIP_SAMPLES)
def test_every_zip_format_refuses_every_bomb_before_inflating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, bomb: str
) -> None:
    good = _sample(tmp_path, name)
    make, error, match = BOMBS[bomb]
    bad = tmp_path / f"bomb{good.suffix}"
    make(good, bad)
    inflated: list[str] = []
    real_read = zipfile.ZipExtFile.read

    def watched(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        inflated.append(self.name)
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", watched)
    if name == "torch":
        torch = pytest.importorskip("torch")
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load saw the bomb"))
    with pytest.raises(error, match=match) as info:
        polyak.inspect(bad)
    assert str(bad) in str(info.value)
    assert inflated == []  # refused from the directory alone


def test_pt_bomb_via_cli_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: a small .pt whose data.pkl inflates enormously; `polyak inspect` refuses it."""
    good = _sample(tmp_path, "torch")
    bad = tmp_path / "bomb.pt"
    _inflating(good, bad)
    assert bad.stat().st_size < (1 << 20)
    assert cli_main(["inspect", str(bad)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(bad) in line and "zip bomb" in line
    out = tmp_path / "avg.pt"
    shutil.copy(good, tmp_path / "ok.pt")
    assert cli_main(["average", str(tmp_path / "ok.pt"), str(bad), "-o", str(out), "-q"]) == 2
    assert "zip bomb" in one_line_error(capsys.readouterr().err)
    assert not out.exists() and leftovers(tmp_path) == []


# --- .pt tensors that hold no plain array ----------------------------------------------------


def _special(kind: str) -> object:
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():  # "beta" / "deprecated" notices of torch itself
        warnings.simplefilter("ignore", UserWarning)
        if kind == "sparse-coo":
            return torch.eye(3).to_sparse()
        if kind == "sparse-csr":
            return torch.eye(3).to_sparse_csr()
        if kind == "meta":
            return torch.empty(3, device="meta")
        return torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)


SPECIAL = {
    "sparse-coo": r"'b' is a sparse tensor \(torch\.sparse_coo\).*\.to_dense\(\)",
    "sparse-csr": r"'b' is a sparse tensor \(torch\.sparse_csr\).*\.to_dense\(\)",
    "meta": r"'b' is on the 'meta' device and holds no data.*[Mm]aterialise it",
    "quantized": r"'b' is quantized \(torch\.qint8\).*\.dequantize\(\)",
}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_pt_tensor_without_a_plain_array_named_with_the_fix(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    members = []
    for i in range(3):
        path = tmp_path / f"m_{i}.pt"
        # The special tensor sits in the middle member, between ordinary ones.
        b = _special(kind) if i == 1 else torch.ones(3)
        torch.save({"a": torch.ones(2) * i, "b": b, "c": torch.zeros(1)}, path)
        members.append(path)
    with pytest.raises(polyak.FormatError, match=SPECIAL[kind]) as info:
        polyak.inspect(members[1])
    assert str(members[1]) in str(info.value)
    out = tmp_path / "avg.safetensors"
    assert cli_main(["average", *map(str, members), "-o", str(out), "-q"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(members[1]) in line
    assert cli_main(["inspect", str(members[1])]) == 2
    one_line_error(capsys.readouterr().err)
    assert not out.exists() and leftovers(tmp_path) == []
