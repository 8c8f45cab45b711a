"""The public surface: __all__ resolves, and importing polyak pulls in no framework."""

import subprocess
import sys

import pytest

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


def test_average_options_list_every_keyword_of_average():
    # The typed overloads of average() spell its keywords through AverageOptions (and of
    # average_sources through StreamOptions): a keyword added to one must reach the other.
    import inspect

    from polyak._engine.average import AverageOptions
    from polyak._engine.stream import StreamOptions, average_sources

    def keywords(fn, *skip):
        return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY and n not in skip}

    assert set(AverageOptions.__annotations__) == keywords(polyak.average, "out")
    assert set(StreamOptions.__annotations__) == keywords(average_sources, "writer")


def test_average_return_type_follows_out(tmp_path):
    # polyak.average returns a dict without out= and an AverageResult with it (the overloads
    # say so to type checkers; mypy checks a caller here).
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "caller.py"
    snippet.write_text(
        "import numpy as np\n"
        "import polyak\n"
        "from typing_extensions import assert_type\n"
        "a = {'w': np.zeros(2, np.float32)}\n"
        "assert_type(polyak.average([a, a]), dict[str, np.ndarray])\n"
        "assert_type(polyak.average([a, a], scheme='linear', out='x.npz'), polyak.AverageResult)\n"
    )
    stdout, stderr, status = api.run([str(snippet), "--no-incremental", "--follow-imports=silent", "--ignore-missing-imports"])
    assert status == 0, stdout + stderr
