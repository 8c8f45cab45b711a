"""A griffe extension: Sphinx roles in polyak's docstrings become mkdocstrings references.

polyak's docstrings name other objects the way Python's own docs do
(``:func:`polyak.average```, ``:class:`~polyak.torch.EMA```), which also reads well in
``help()``. On the site, a role whose target is a public, fully qualified name becomes a
cross-reference (``[`average`][polyak.average]``), which the strict build checks: a renamed
or removed target fails it. Short or private targets (``:meth:`update```,
``:mod:`polyak._engine.kernel```) become plain code. A section titled ``Example:`` (the
Google style guide's spelling, used throughout polyak) is read as griffe's ``Examples:``
section, so its doctest lines render as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)(\(\))?`")


def _replace(match: re.Match[str]) -> str:
    tilde, target, call = match.group(1), match.group(2), match.group(3) or ""
    shown = (target.rsplit(".", 1)[-1] if tilde else target) + call
    public = target.startswith("polyak.") and not any(part.startswith("_") for part in target.split("."))
    if public:
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(_replace, obj.docstring.value)
            obj.docstring.value = EXAMPLE.sub(r"\1Examples:", text)
