"""Rules the tests themselves keep (STYLE.md): every ``pytest.raises`` and ``pytest.warns``
says which error it expects with ``match=``, so that a wrong error of the right class (or a
message that lost what it must say) fails the test."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _calls_without_match(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("raises", "warns") and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "pytest" and not any(k.arg == "match" for k in node.keywords)):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_rule_finds_a_bare_raises() -> None:
    bare = ast.parse("with pytest.raises(ValueError):\n    f()\nwith pytest.warns(UserWarning, match='x'):\n    g()")
    assert _calls_without_match(bare) == [(1, "pytest.raises(ValueError)")]


def test_every_raises_and_warns_has_a_match() -> None:
    missing = [f"{path.relative_to(TESTS.parent)}:{line}: {call}"
               for path in sorted(TESTS.rglob("*.py"))
               for line, call in _calls_without_match(ast.parse(path.read_text(encoding="utf-8")))]
    assert missing == [], "give these a match= naming the message they expect:\n" + "\n".join(missing)
