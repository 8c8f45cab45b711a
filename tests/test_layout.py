"""polyak._layout: the one matcher of names, shapes and dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from polyak import MismatchError
from polyak._layout import MAX_LISTED, compare_layouts, dtype_label, mismatch_error


def _layout(**shapes):
    return {n: np.zeros(s, np.float32) for n, s in shapes.items()}


def test_every_kind_of_difference_is_found_wherever_it_sits():
    expected = _layout(a=(1,), b=(2, 2), c=(3,), d=(4,), e=(5,))
    found = _layout(a=(1,), b=(2, 3), d=(4,), e=(5,), zz=(1,), bb=(1,))
    found["d"] = found["d"].astype(np.float64)
    diff = compare_layouts(expected, found, ("ref", "other"))
    assert not diff.ok
    assert diff.missing == ["c"]  # in the middle of expected's order
    assert diff.unexpected == ["bb", "zz"]
    assert diff.shapes == [("b", (2, 2), (2, 3))]
    assert diff.dtypes == [("d", "float32", "float64")]
    assert diff.problems() == [
        'other: missing 1 tensor(s) that ref has: "c"',
        'other: 2 unexpected tensor(s) that ref lacks: "bb", "zz"',
        'other: tensor "b" has shape (2, 3), ref has (2, 2)',
        'other: tensor "d" is float64, ref has float32',
    ]


def test_options_relax_only_what_they_name():
    expected, found = _layout(a=(1,), b=(2,)), _layout(b=(2,), c=(1,))
    found["b"] = found["b"].astype(np.float16)
    assert compare_layouts(expected, found, missing_ok=True).missing == []
    assert compare_layouts(expected, found, missing_ok=True).unexpected == ["c"]
    assert compare_layouts(expected, found, unexpected_ok=True).unexpected == []
    assert compare_layouts(expected, found, unexpected_ok=True).missing == ["a"]
    assert compare_layouts(expected, found, dtypes=False).dtypes == []
    assert compare_layouts(expected, found).dtypes == [("b", "float32", "float16")]
    assert compare_layouts(expected, dict(expected)).ok


def test_names_only_needs_no_shapes():
    found = _layout(a=(1,), b=(2,), c=(3,))
    diff = compare_layouts(dict.fromkeys(["a", "x", "c"]), found, ("the model", "the file"), shapes=False)
    assert diff.missing == ["x"] and diff.unexpected == ["b"] and diff.shapes == [] and diff.dtypes == []
    assert compare_layouts({"a": None}, found, unexpected_ok=True).shapes == [("a", (), (1,))]
    relaxed = compare_layouts(dict.fromkeys(["a", "x", "c"]), found, shapes=False, unexpected_ok=True)
    assert relaxed.problems() == ['found: missing 1 tensor(s) that expected has: "x"']


def test_dtype_labels_across_frameworks():
    import ml_dtypes

    assert dtype_label(np.zeros(1, np.float32)) == "float32"
    assert dtype_label(np.zeros(1, ml_dtypes.bfloat16)) == "bfloat16"
    assert dtype_label([1.0]) is None

    class KerasLike:
        dtype = "float16"
        shape = (1,)

    assert dtype_label(KerasLike()) == "float16"
    torch = pytest.importorskip("torch")
    assert dtype_label(torch.zeros(1, dtype=torch.bfloat16)) == "bfloat16"
    diff = compare_layouts({"w": np.zeros((2,), np.float32)}, {"w": torch.zeros(2)})
    assert diff.ok


def test_one_error_lists_everything_and_the_fix():
    problems = [f"p{i}" for i in range(60)]
    err = mismatch_error("the things do not match", problems, fix="do this", hints=["look here"])
    assert isinstance(err, MismatchError)
    lines = str(err).splitlines()
    assert lines[0] == "the things do not match (60 problem(s)):"
    assert lines[1] == "  p0" and lines[50] == "  p49" and lines[51] == "  ... and 10 more"
    assert lines[-2:] == ["hint: look here", "do this"]
    fifty = str(mismatch_error("w", [f"p{i}" for i in range(MAX_LISTED)], fix="f")).splitlines()
    assert len(fifty) == MAX_LISTED + 2 and fifty[-2:] == [f"  p{MAX_LISTED - 1}", "f"]  # all listed, no "more"
    with pytest.raises(MismatchError, match=r'(?s)the model does not fit.*"c".*reload'):
        compare_layouts(_layout(c=(1,)), {}, ("the file", "the model")).raise_if_any(
            "the model does not fit", fix="reload")


def test_quoted_names_show_eight_and_count_the_rest() -> None:
    from polyak._layout import quoted

    names = [f"t{i}" for i in range(10)]
    assert quoted(names[:8]) == ", ".join(f'"t{i}"' for i in range(8))
    assert quoted(names[:9]) == ", ".join(f'"t{i}"' for i in range(8)) + " and 1 more"
    assert quoted(names) == ", ".join(f'"t{i}"' for i in range(8)) + " and 2 more"
    assert quoted(names, 3) == '"t0", "t1", "t2" and 7 more'
    assert quoted(names[:3], 3) == '"t0", "t1", "t2"'
    assert quoted([]) == ""


def test_shapes_and_dtypes_of_values_that_only_describe_themselves() -> None:
    from polyak._layout import shape_of

    class Described:  # a lazy or remote tensor: shape and dtype, no data to convert
        shape = (2, 3)
        dtype = np.float16  # a numpy scalar type, not a dtype instance

    assert shape_of(Described()) == (2, 3) and dtype_label(Described()) == "float16"
    assert shape_of([[1, 2, 3]]) == (1, 3) and shape_of(np.zeros((4,), np.int8)) == (4,)
