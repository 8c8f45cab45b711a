"""The public surface: __all__ resolves, and importing polyak pulls in no framework."""

import subprocess
import sys

import polyak


def test_all_names_resolve():
    assert all(isinstance(name, str) for name in polyak.__all__)
    for name in polyak.__all__:
        assert getattr(polyak, name) is not None, name


def test_import_polyak_and_cli_import_no_framework():
    code = (
        "import sys, polyak, polyak.cli\n"
        "polyak.cli.build_parser()\n"
        "heavy = [m for m in ('torch', 'keras', 'h5py', 'matplotlib', 'tensorflow', 'jax') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_errors_are_one_family():
    for name in ("ConfigError", "FormatError", "MismatchError", "NonFiniteError", "OutputError", "SchemeError", "UnsafeFileError"):
        assert issubclass(getattr(polyak, name), polyak.PolyakError)
    assert issubclass(polyak.OutputError, OSError)
    assert issubclass(polyak.MismatchError, ValueError)
