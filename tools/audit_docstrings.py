"""Audit the docstrings of every public name: what the API reference (issue 16) must show.

For every name in the ``__all__`` of the documented modules (the reference pages of
``docs/reference/``, listed by ``tools/docs_hooks.py``), read statically with griffe as the
site reads them:

* a one-line summary of at least four words that says what the thing is for;
* functions: every parameter in ``Args``, ``Returns`` when it returns something, ``Raises``
  when its body raises;
* classes: every constructor parameter in ``Args`` (a dataclass's fields may be its
  ``Attributes``), ``Raises`` when ``__init__`` raises; every public method and property
  defined by the class has a docstring (framework callback hooks excepted), with ``Raises``
  when it raises, and every public attribute is documented (in ``Args``/``Attributes`` or by
  a docstring of its own);
* constants: a docstring (a string literal right after the assignment);
* functions and classes other than exceptions and warnings: an ``Example``, unless listed in
  :data:`NO_EXAMPLE` with the reason; an example whose every line is ``# doctest: +SKIP``
  only when listed in :data:`SKIPPED_EXAMPLES` with the reason.

Usage: ``python tools/audit_docstrings.py [ROOT]``. Prints one line per name with a gap and
exits 1 when there is any (``tests/test_docs_site.py`` runs it).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[1]

#: The documented modules (one reference page each).
MODULES = ("polyak", "polyak.torch", "polyak.keras", "polyak.lightning", "polyak.transformers", "polyak.formats")

#: Public functions and classes without an Example, each with the reason.
NO_EXAMPLE: dict[str, str] = {
    "polyak.PosthocPlan": "made by posthoc_plan, whose example (a PostHocEMA run) shows its fields",
    "polyak.PosthocResult": "returned by posthoc(out=...), whose example (a PostHocEMA run) shows its fields",
    "polyak.torch.AveragerState": "plain data read off an averager's .state (EMA's and SWA's examples read it); "
                                  "its docstring lives in the framework-free polyak._online, whose examples run "
                                  "without torch",
}

#: Public names whose Example is all ``# doctest: +SKIP``, each with the reason.
SKIPPED_EXAMPLES: dict[str, str] = {
    "polyak.keras.EMACallback": "its docstring lives in polyak/keras/_ema.py, which the Keras-backends work "
                                "(issue 14) is rewriting; make it run there",
}

#: Methods a framework calls on a callback (documented by the framework, not here).
HOOKS = re.compile(r"^(on_\w+|setup|teardown|state_dict|load_state_dict)$")
#: Bases that make a class a framework callback.
CALLBACK_BASES = ("keras.callbacks.Callback", "pl.Callback", "transformers.TrainerCallback")

EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
SKIP = re.compile(r"#\s*doctest:\s*\+SKIP")
EXC_SUFFIXES = ("Error", "Warning")


def _load(root: Path) -> griffe.Module:
    loader = griffe.GriffeLoader(search_paths=[str(root / "src")], docstring_parser=griffe.Parser.google)
    pkg = loader.load("polyak")
    loader.resolve_aliases(implicit=True, external=False)
    return pkg


def _public_names(root: Path, module: str) -> list[str]:
    spec = importlib.util.spec_from_file_location("docs_hooks", root / "tools" / "docs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(hooks)  # type: ignore[union-attr]
    hooks.SRC = root / "src"
    return [n for n in hooks.public_names(module) if not n.startswith("__")]


def _target(obj: Any) -> Any:
    return obj.final_target if obj.is_alias else obj


def _sections(obj: Any) -> dict[str, Any]:
    """The Google sections of ``obj``'s docstring (``Example:`` read as ``Examples:``)."""
    text = EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
    parsed = griffe.Docstring(text, parent=obj).parse(griffe.Parser.google, warnings=False)
    out: dict[str, Any] = {}
    for s in parsed:
        out.setdefault(s.kind.value, []).append(s.value)
    return out


def _names(sections: dict[str, Any], *kinds: str) -> set[str]:
    return {item.name.lstrip("*") for kind in kinds for value in sections.get(kind, []) for item in value}


def _params(fn: Any) -> list[str]:
    return [p.name for p in fn.parameters if p.name not in ("self", "cls")]


def _example_lines(obj: Any) -> list[str]:
    """The docstring's ``>>>`` lines, doctest directives included (griffe drops those)."""
    return [line for line in obj.docstring.value.splitlines() if line.lstrip().startswith(">>>")]


def _is_callback(cls: Any) -> bool:
    return any(str(b) in CALLBACK_BASES for b in cls.bases)


def _inherited_doc(cls: Any, name: str) -> bool:
    """Whether a base class (of polyak) documents ``name``: an override needs no docstring."""
    for base in cls.mro():
        member = base.members.get(name)
        if member is not None and not member.is_alias and member.docstring is not None:
            return True
    return False


def _member_gaps(cls: Any, documented: set[str]) -> list[str]:
    """Public methods/properties without a docstring; public attributes nowhere documented
    (an override of a documented member of a base class is documented there)."""
    gaps = []
    for name, member in cls.members.items():
        if name.startswith("_") or member.is_alias or _inherited_doc(cls, name):
            continue
        if member.kind.value == "function":
            if member.docstring is None and not (_is_callback(cls) and HOOKS.match(name)):
                gaps.append(f"method {name} has no docstring")
        elif member.kind.value == "attribute":
            if "property" in member.labels:
                if member.docstring is None:
                    gaps.append(f"property {name} has no docstring")
            elif member.docstring is None and name not in documented:
                gaps.append(f"attribute {name} is not documented")
    # Methods that raise say so, also those inherited from a base class of polyak.
    for owner in [cls, *cls.mro()]:
        for name, member in owner.members.items():
            if (not name.startswith("_") and not member.is_alias and member.kind.value == "function"
                    and member.docstring is not None and "raise " in member.source
                    and "raises" not in _sections(member)):
                gaps.append(f"method {name} raises but no Raises")
    return gaps


def audit_name(full: str, obj: Any) -> list[str]:
    """The gaps of one public name (empty: none)."""
    kind = obj.kind.value
    if obj.docstring is None:
        return ["no docstring"]
    sections = _sections(obj)
    issues = []
    summary = obj.docstring.value.strip().splitlines()[0]
    if len(summary.split()) < 4:
        issues.append(f"thin summary {summary!r}")
    short = full.rsplit(".", 1)[-1]
    if kind == "class" and not short.endswith(EXC_SUFFIXES):
        init = obj.members.get("__init__")
        params = _params(init) if init is not None and init.kind.value == "function" else []
        # A subclass (PosthocResult of AverageResult) may leave its base's fields to the base.
        documented = _names(sections, "parameters", "attributes").union(
            *(_names(_sections(b), "parameters", "attributes") for b in obj.mro() if b.docstring is not None))
        missing = [p for p in params if p not in documented]
        if missing:
            issues.append(f"constructor parameters not in Args/Attributes: {', '.join(missing)}")
        source = init.source if init is not None and init.kind.value == "function" and not init.is_alias else ""
        if "raise " in source and "raises" not in sections:
            issues.append("__init__ raises but no Raises")
        issues += _member_gaps(obj, documented)
    elif kind == "function":
        missing = [p for p in _params(obj) if p not in _names(sections, "parameters")]
        if missing:
            issues.append(f"parameters not in Args: {', '.join(missing)}")
        if obj.returns is not None and str(obj.returns) not in ("None", "") and "returns" not in sections:
            issues.append("no Returns")
        if "raise " in obj.source and "raises" not in sections:
            issues.append("raises but no Raises")
    if kind in ("function", "class") and not short.endswith(EXC_SUFFIXES):
        lines = _example_lines(obj) if "examples" in sections else []
        if not lines:
            if full not in NO_EXAMPLE:
                issues.append("no Example")
        elif full in NO_EXAMPLE:
            issues.append("has an Example: remove it from NO_EXAMPLE")
        elif all(SKIP.search(line) for line in lines) and full not in SKIPPED_EXAMPLES:
            issues.append("every Example line is +SKIP")
        elif full in SKIPPED_EXAMPLES and not all(SKIP.search(line) for line in lines):
            issues.append("its Example runs: remove it from SKIPPED_EXAMPLES")
    return issues


def audit(root: Path = ROOT) -> list[str]:
    """One line per public name with a gap (empty: the reference is complete)."""
    pkg = _load(root)
    report = []
    seen = set()
    for module in MODULES:
        for name in _public_names(root, module):
            full = f"{module}.{name}"
            seen.add(full)
            obj = _target(pkg[full.removeprefix("polyak.")] if module != "polyak" else pkg[name])
            issues = audit_name(full, obj)
            if issues:
                report.append(f"{full} [{obj.kind.value}]: " + "; ".join(issues))
    for full in sorted((set(NO_EXAMPLE) | set(SKIPPED_EXAMPLES)) - seen):
        report.append(f"{full}: listed in NO_EXAMPLE/SKIPPED_EXAMPLES but not a public name")
    return report


def main(argv: list[str]) -> int:
    root = Path(argv[1]).resolve() if len(argv) > 1 else ROOT
    report = audit(root)
    for line in report:
        print(line)
    print(len(report), "names with gaps")
    return 1 if report else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
