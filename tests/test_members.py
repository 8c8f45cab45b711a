"""Choosing, ordering, opening and checking the members of an average (polyak._engine.members).

Mismatches sit in a *middle* member on purpose: a check that only looked at the oldest
(or the newest) member would let a (1,) tensor broadcast, a float64 one be cast and a
missing name end in a KeyError.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import polyak
from _helpers import read_safetensors, write_members
from polyak import ConfigError, FormatError, MismatchError


def _exact(text: str) -> str:
    return f"^{re.escape(text)}$"


def _state(value: float, **extra: np.ndarray) -> dict[str, np.ndarray]:
    return {"a.w": np.full((2, 3), value, np.float32), "b.w": np.full(4, value, np.float32), **extra}


def _five(tmp_path: Path, middle: dict[str, np.ndarray]) -> list[Path]:
    states = [_state(float(i)) for i in range(5)]
    states[2] = middle
    return write_members(tmp_path, states)


@pytest.mark.parametrize(
    ("middle", "problem"),
    [
        ({"a.w": np.ones(1, np.float32), "b.w": np.ones(4, np.float32)},
         'tensor "a.w" has shape (1,), {newest} has (2, 3)'),
        ({"a.w": np.ones((2, 3), np.float64), "b.w": np.ones(4, np.float32)},
         'tensor "a.w" is float64, {newest} has float32'),
        ({"a.w": np.ones((2, 3), np.float32)}, 'missing 1 tensor(s) that {newest} has: "b.w"'),
        (_state(1.0, extra=np.ones(1, np.float32)), '1 unexpected tensor(s) that {newest} lacks: "extra"'),
    ],
    ids=["shape", "dtype", "missing", "unexpected"],
)
def test_a_mismatch_in_a_middle_member_is_refused_naming_it(tmp_path: Path, middle, problem: str) -> None:
    paths = _five(tmp_path, middle)
    line = f"  {paths[2]}: " + problem.format(newest=paths[4])
    message = "\n".join([
        "the 5 members do not match (1 problem(s)):", line,
        "polyak averages tensors by name and needs the same names, shapes and dtypes in every member"])
    with pytest.raises(MismatchError, match=f"^{re.escape(message)}$"):
        polyak.average(paths, out=tmp_path / "avg.safetensors")
    assert not (tmp_path / "avg.safetensors").exists()
    states = [polyak.open_source(p) for p in paths]
    try:
        with pytest.raises(MismatchError, match=re.escape(problem.format(newest=states[-1].label))):
            polyak.average(states)
    finally:
        for s in states:
            s.close()


def test_every_member_is_compared_with_the_newest(tmp_path: Path) -> None:
    states = [_state(float(i)) for i in range(4)]
    states[0]["a.w"] = np.ones(1, np.float32)
    states[1]["b.w"] = np.ones(4, np.float16)
    del states[2]["a.w"]
    paths = write_members(tmp_path, states)
    with pytest.raises(MismatchError, match=r"^the 4 members do not match \(3 problem\(s\)\):\n") as info:
        polyak.average(paths)
    lines = str(info.value).splitlines()
    assert lines[1:4] == [
        f'  {paths[0]}: tensor "a.w" has shape (1,), {paths[3]} has (2, 3)',
        f'  {paths[1]}: tensor "b.w" is float16, {paths[3]} has float32',
        f'  {paths[2]}: missing 1 tensor(s) that {paths[3]} has: "a.w"',
    ]


def test_prefix_hints_name_the_prefix_and_the_member() -> None:
    newest = {"w": np.ones(2, np.float32)}
    cases = [
        ({"module.w": np.ones(2, np.float32)},
         "hint: the keys of member 0 carry the prefix 'module.'; pass --strip-prefix module. (strip_prefix=['module.'])"),
        ({"_orig_mod.w": np.ones(2, np.float32)},
         "hint: the keys of member 0 carry the prefix '_orig_mod.'; pass --strip-prefix _orig_mod. "
         "(strip_prefix=['_orig_mod.'])"),
    ]
    for old, hint in cases:
        with pytest.raises(MismatchError, match=f"(?m)^{re.escape(hint)}$"):
            polyak.average([old, newest])
    with pytest.raises(MismatchError, match="(?m)^hint: the keys of the newest member carry the prefix 'model.' and "
                                            "member 0's do not; pass --strip-prefix model.$"):
        polyak.average([newest, {"model.w": np.ones(2, np.float32)}])
    mixed_old = {"module.a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}
    mixed_new = {"a": np.ones(1, np.float32), "module.b": np.ones(1, np.float32)}
    with pytest.raises(MismatchError, match="(?m)^hint: the keys differ only by the prefix 'module.'; pass --strip-prefix module.$"):
        polyak.average([mixed_old, mixed_new])
    with pytest.raises(MismatchError, match=r"^the 2 members do not match \(2 problem\(s\)\):\n[^\n]*\n[^\n]*\n"
                                            "polyak averages"):  # no hint for unrelated names
        polyak.average([{"x": np.ones(1, np.float32)}, {"y": np.ones(1, np.float32)}])


def test_strip_prefix_keeps_names_dtypes_and_values(tmp_path: Path) -> None:
    a = {"module.w": np.full(3, 1.0, np.float16), "module.n": np.array(4, np.int64), "module.module.b": np.ones(2)}
    b = {"w": np.full(3, 3.0, np.float16), "n": np.array(7, np.int64), "b": np.full(2, 3.0)}
    got = polyak.average([a, b], strip_prefix=["module."])
    assert {k: (v.dtype.name, v.shape) for k, v in got.items()} == {
        "w": ("float16", (3,)), "n": ("int64", ()), "b": ("float64", (2,))}
    assert got["w"].tolist() == [2.0, 2.0, 2.0] and got["n"] == 7 and got["b"].tolist() == [2.0, 2.0]
    paths = write_members(tmp_path, [a, b])
    polyak.average(paths, out=tmp_path / "avg.safetensors", strip_prefix=["module."])
    on_disk = read_safetensors(tmp_path / "avg.safetensors")
    assert {k: v.dtype.name for k, v in on_disk.items()} == {"b": "float64", "n": "int64", "w": "float16"}
    clash = {"module.w": np.ones(1, np.float32), "w": np.ones(1, np.float32)}
    message = "member 0: stripping ['module.'] makes 'module.w' and 'w' both 'w'; strip fewer prefixes"
    with pytest.raises(MismatchError, match=f"^{re.escape(message)}$"):
        polyak.average([clash, clash], strip_prefix=["module."])


def test_last_keeps_the_newest_and_is_checked(tmp_path: Path) -> None:
    paths = write_members(tmp_path, [_state(float(i)) for i in range(4)])
    assert polyak.average(paths, last=2)["b.w"].tolist() == [2.5] * 4
    assert polyak.average(paths, last=4)["b.w"].tolist() == [1.5] * 4
    for last in (0, -1, True, 2.0, "2"):
        with pytest.raises(ConfigError, match=f"^last must be a whole number ≥ 1, got {re.escape(repr(last))}$"):
            polyak.average(paths, last=last)
    with pytest.raises(ConfigError, match="^last=5 but only 4 members were given$"):
        polyak.average(paths, last=5)


def test_orders(tmp_path: Path) -> None:
    states = [_state(float(i)) for i in range(3)]
    paths = write_members(tmp_path, states, stem="m")  # m_0, m_1, m_2
    renamed = [tmp_path / n for n in ("m_10.safetensors", "m_9.safetensors", "m_100.safetensors")]
    for p, q in zip(paths, renamed, strict=True):
        p.rename(q)
    # the numbers in the names: m_9 (1.0) < m_10 (0.0) < m_100 (2.0); newest m_100
    assert polyak.average(renamed, last=1)["b.w"][0] == 2.0
    assert polyak.average(renamed, last=2)["b.w"][0] == 1.0  # mean of m_10 (0.0) and m_100 (2.0)
    # plain names: m_10 < m_100 < m_9 (1.0, newest)
    assert polyak.average(renamed, last=1, order="name")["b.w"][0] == 1.0
    assert polyak.average(renamed, last=1, order="given")["b.w"][0] == 2.0
    # modification times, whatever the names say: m_100 oldest, m_10 newest
    for p, t in zip(renamed, (3_000, 2_000, 1_000), strict=True):
        os.utime(p, ns=(t * 10**9, t * 10**9))
    assert polyak.average(renamed, last=1, order="mtime")["b.w"][0] == 0.0
    assert polyak.average(renamed, last=2, order="mtime")["b.w"][0] == 0.5
    with pytest.raises(ConfigError, match="^unknown order 'newest'; choose one of number, mtime, name, given$"):
        polyak.average(renamed, order="newest")
    with pytest.raises(FormatError, match=f"^{re.escape(str(tmp_path / 'gone.safetensors'))}: no such file$"):
        polyak.average([*renamed, tmp_path / "gone.safetensors"], order="mtime")


def test_in_memory_states_keep_their_order_and_paths_do_not_mix(tmp_path: Path) -> None:
    states = [_state(float(i)) for i in range(3)]
    assert polyak.average(states, last=1, order="name")["b.w"][0] == 2.0
    (path,) = write_members(tmp_path, states[:1])
    with pytest.raises(ConfigError, match="^mixing file paths and in-memory states needs order='given'$"):
        polyak.average([path, states[1]])
    assert polyak.average([path, states[2]], order="given", last=1)["b.w"][0] == 2.0
    with pytest.raises(ConfigError, match="^member 1: expected a checkpoint path or a mapping of tensors, got int$"):
        polyak.average([states[0], 3], order="given")


def test_the_same_file_twice_is_refused_under_any_spelling(tmp_path: Path) -> None:
    paths = write_members(tmp_path, [_state(float(i)) for i in range(2)])
    (tmp_path / "sub").mkdir()
    again = tmp_path / "sub" / ".." / paths[0].name
    with pytest.raises(ConfigError, match=f"^{re.escape(str(again))} is given twice; each member may appear once$"):
        polyak.average([paths[0], paths[1], again], order="given")
    link = tmp_path / "link.safetensors"
    link.symlink_to(paths[1])
    with pytest.raises(ConfigError, match="is given twice; each member may appear once$"):
        polyak.average([paths[0], paths[1], link], order="given")
    with pytest.raises(ConfigError, match="is given twice"):  # also where last= would drop it
        polyak.average([paths[0], paths[0], paths[1]], order="given", last=2)
    with pytest.raises(ConfigError, match="^no members given: pass at least one checkpoint$"):
        polyak.average([])


def test_checks_of_the_newest_member(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="^member 1: the checkpoint holds no tensors$"):
        polyak.average([_state(0.0), {}])
    states = [_state(float(i), n=np.array(i, np.int32), mask=np.array([True, False])) for i in range(2)]
    message = ('integer/bool tensors cannot be averaged and int_policy is \'error\': "n", "mask"; '
               "use --int-policy newest to copy them from the newest member")
    with pytest.raises(MismatchError, match=re.escape(message)):
        polyak.average(states, int_policy="error")
    with pytest.raises(ConfigError, match="^int_policy must be 'newest' or 'error', got 'oldest'$"):
        polyak.average(states, int_policy="oldest")
    strings = [_state(0.0, s=np.array(["a"])), _state(1.0, s=np.array(["b"]))]
    with pytest.raises(MismatchError, match='(?m)^  tensors of unsupported dtypes: "s"$'):
        polyak.average(strings)


def _touch_members(folder: Path, names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        p = folder / name
        polyak.save(_state(1.0), p)
        paths.append(p)
    return paths


def test_ambiguous_orders_are_named_in_full(tmp_path: Path) -> None:
    tail = (", and the result depends on their order (the scheme weights them differently); choose it with "
            "--order mtime|name|given (order='mtime', 'name' or 'given'), or rename them")
    two_bare = _touch_members(tmp_path, ["best.safetensors", "final.safetensors", "m_1.safetensors"])
    with pytest.raises(ConfigError, match=_exact("cannot tell the order of the checkpoints: best.safetensors, "
                                                 "final.safetensors have no number to place them among m_1.safetensors" + tail)):
        polyak.average(two_bare, scheme="linear")
    for p in two_bare:
        p.unlink()
    many = _touch_members(tmp_path, [f"run{i}_7_3.safetensors" for i in "abcdefgh"])  # 8 with the same numbers
    with pytest.raises(ConfigError, match=_exact(
            "cannot tell the order of the checkpoints: runa_7_3.safetensors, runb_7_3.safetensors, "
            "runc_7_3.safetensors, rund_7_3.safetensors, rune_7_3.safetensors, runf_7_3.safetensors and 2 more "
            "carry the same numbers (7, 3)" + tail)):
        polyak.average(many, scheme="linear")
    for p in many[6:]:
        p.unlink()
    with pytest.raises(ConfigError, match=_exact(
            "cannot tell the order of the checkpoints: runa_7_3.safetensors, runb_7_3.safetensors, "
            "runc_7_3.safetensors, rund_7_3.safetensors, rune_7_3.safetensors, runf_7_3.safetensors "
            "carry the same numbers (7, 3)" + tail)):
        polyak.average(many[:6], scheme="linear")


def test_ties_group_only_equal_numbers(tmp_path: Path) -> None:
    # 1, 2, 2, 3: only the two 2s tie, named with their numbers (not the first member's)
    paths = _touch_members(tmp_path, ["m_1.safetensors", "a_2.safetensors", "b_2.safetensors", "m_3.safetensors"])
    with pytest.raises(ConfigError, match="checkpoints: a_2.safetensors, b_2.safetensors carry the same numbers \\(2\\),"):
        polyak.average(paths, scheme="linear")
    assert polyak.average(paths)["b.w"][0] == 1.0  # equal weights: the order does not matter


def test_a_folder_member_is_as_new_as_its_newest_file(tmp_path: Path) -> None:
    folders = []
    for i, when in enumerate((3_000, 1_000, 2_000)):
        folder = tmp_path / f"step_{i}"
        folder.mkdir()
        polyak.save(_state(float(i)), folder / "model.safetensors")
        os.utime(folder / "model.safetensors", ns=(when * 10**9, when * 10**9))
        os.utime(folder, ns=(9_000 * 10**9 - i, 9_000 * 10**9 - i))  # the folders' own times say otherwise
        folders.append(folder)
    assert polyak.average(folders, order="mtime", last=1)["b.w"][0] == 0.0  # step_0's file is the newest
    empty = tmp_path / "empty"
    empty.mkdir()
    os.utime(empty, ns=(500 * 10**9, 500 * 10**9))
    from polyak._engine.members import order_members

    assert order_members([*folders, empty], "mtime") == [empty, folders[1], folders[2], folders[0]]


def _span_reference(parts: list[tuple[str, ...]]) -> tuple[int, int]:
    """Shared leading components, then shared trailing ones of what is left (never overlapping)."""
    if not parts:
        return (0, 0)
    if len(parts) == 1:
        return (len(parts[0]) - 1, 0)
    from itertools import takewhile

    def shared(seqs: list[tuple[str, ...]]) -> int:
        return sum(1 for _ in takewhile(lambda column: len(set(column)) == 1, zip(*seqs)))

    lead = shared(parts)
    return lead, shared([tuple(reversed(p[lead:])) for p in parts])


def test_common_span_against_a_reference() -> None:
    import random

    from polyak._engine.members import _common_span

    rng = random.Random(7)
    cases: list[list[tuple[str, ...]]] = [
        [], [("/", "m")], [("/", "a", "b", "m")], [("m",)], [("a", "x"), ("b", "x")],  # relative parts too
        [("/", "r", "c", "m"), ("/", "r", "c", "c", "m")],  # the shared tail must not eat into the shared head
        [("/", "r", "a"), ("/", "r", "a", "b")],  # one path is a prefix of the other
        [("/", "r", "a"), ("/", "r", "a")],
        [("/", "x", "m"), ("/", "y", "m"), ("/", "x", "z", "m")],
    ]
    for _ in range(300):
        n = rng.randint(2, 4)
        cases.append([("/", *rng.choices("ab", k=rng.randint(0, 4))) for _ in range(n)])
    for parts in cases:
        assert _common_span(parts) == _span_reference(parts), parts


def test_member_names_of_nested_and_current_folder_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polyak._engine.members import member_names

    monkeypatch.chdir(tmp_path)
    assert member_names(["run/a", "run/a/b"]) == ["a", "b"]  # nothing differs in the first: its own name
    assert member_names([".", "sub"]) == [".", "sub"]  # and when it has none: the path as given
    assert member_names(["run/ckpt_1.pt"]) == ["ckpt_1.pt"]


def test_member_names_of_in_memory_members(tmp_path: Path) -> None:
    from polyak._engine.members import member_label, member_names, open_member

    polyak.save(_state(1.0), tmp_path / "m_1.safetensors")
    source = open_member(tmp_path / "m_1.safetensors", 0)
    try:
        assert member_names([_state(0.0), source, tmp_path / "m_2.safetensors", _state(2.0)]) == [
            "member 0", source.label, "m_2.safetensors", "member 3"]
    finally:
        source.close()
    assert member_label(tmp_path / "m_2.safetensors", 5) == str(tmp_path / "m_2.safetensors")


def test_natural_order_compares_digit_runs_as_numbers() -> None:
    from polyak._engine.members import _natural_key

    names = ["a10b", "a2", "a10", "a9b", "b1", "a"]
    assert sorted(names, key=_natural_key) == ["a", "a2", "a9b", "a10", "a10b", "b1"]


def test_one_member_without_a_number_needs_no_order(tmp_path: Path) -> None:
    from polyak._engine.members import select_members

    (path,) = _touch_members(tmp_path, ["final.safetensors"])
    assert select_members([path]) == [path]  # weights=None: a sweep of one member
    assert select_members([path], weights=[1.0], last=1) == [path]


def test_numbers_in_the_shared_file_name_do_not_order_the_folders(tmp_path: Path) -> None:
    paths = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        paths += _touch_members(tmp_path / run, ["model-2.safetensors"])
    with pytest.raises(ConfigError, match="^cannot tell the order of the checkpoints: a/model-2.safetensors, "
                                          "b/model-2.safetensors have no numbers that order them, "):
        polyak.average(paths, scheme="linear")


def test_a_sweep_over_many_tied_groups_names_the_first_three(tmp_path: Path) -> None:
    from polyak._engine.members import select_members

    paths = _touch_members(tmp_path, [f"{run}_{i}.safetensors" for i in range(1, 5) for run in "ab"])
    groups = "; ".join(f"a_{i}.safetensors, b_{i}.safetensors carry the same numbers ({i})" for i in range(1, 4))
    with pytest.raises(ConfigError, match=_exact(
            f"cannot tell the order of the checkpoints: {groups}, and the result depends on their order (a sweep "
            "compares the averages of the newest n); choose it with --order mtime|name|given (order='mtime', "
            "'name' or 'given'), or rename them")):
        select_members(paths)  # weights=None: every order matters


def test_order_by_name_compares_the_differing_path_parts_joined_by_slashes(tmp_path: Path) -> None:
    from polyak._engine.members import order_members

    # "a/z" sorts before "a0": the separator '/' comes before the digits
    members = [tmp_path / "a0" / "m.safetensors", tmp_path / "a" / "z" / "m.safetensors"]
    assert order_members(members, "name") == [members[1], members[0]]


def test_check_members_refuses_none_and_hints_at_a_prefix_on_one_side() -> None:
    from polyak._engine.members import check_members

    with pytest.raises(ConfigError, match=_exact("no members given: pass at least one checkpoint")):
        check_members([])
    w = np.ones(2, np.float32)
    with pytest.raises(MismatchError, match="\nhint: the keys differ only by the prefix 'module.'; pass --strip-prefix "
                                            "module.\n"):
        polyak.average([{"w": w}, {"w": w, "module.w": w}])  # only missing names, no unexpected ones


def test_key_reaches_every_pt_member(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    paths = []
    for i in range(2):
        p = tmp_path / f"ckpt_{i}.pt"
        torch.save({"model": {"w": torch.full((2,), float(i))}, "ema": {"w": torch.full((2,), 10.0 + i)}}, p)
        paths.append(p)
    assert polyak.average(paths, key="ema")["w"].tolist() == [10.5, 10.5]
    assert polyak.average(paths, key="model")["w"].tolist() == [0.5, 0.5]
