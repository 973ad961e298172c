"""The error tree in ``tidal.errors``' docstring is complete and true to the classes."""

from __future__ import annotations

import inspect
import re

import pytest

import tidal.errors as errors_module
from tidal.errors import (
    BlobUnavailableError,
    RegistryError,
    RegistryUnavailableError,
    RetryableError,
    TidalError,
)

_NAME = re.compile(r"[A-Z][A-Za-z0-9]*")
_ALSO = re.compile(r"\(also an? ([A-Z][A-Za-z0-9]*)\)")


def _tree(doc: str) -> dict[str, set[str]]:
    """Class name -> the parents the docstring gives it (drawn above it, or named in notes)."""
    lines = doc.split("::", 1)[1].splitlines()
    parents: dict[str, set[str]] = {}
    stack: list[tuple[int, str]] = []
    for line in lines:
        if not line.strip():
            continue
        m = _NAME.search(line)
        assert m is not None, f"no class name in tree line {line!r}"
        depth, name = m.start(), m.group(0)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        found = parents.setdefault(name, set())
        if stack:
            found.add(stack[-1][1])
        notes = line[m.end() :]
        found.update(_ALSO.findall(notes))
        if "(retryable)" in notes:
            found.add("RetryableError")
        stack.append((depth, name))
    return parents


def _classes() -> dict[str, type[BaseException]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors_module.__name__
    }


def test_every_class_is_in_the_docstring_tree_under_its_parents() -> None:
    tree = _tree(errors_module.__doc__ or "")
    classes = _classes()
    assert set(tree) == set(classes), (
        f"missing from the tree: {sorted(set(classes) - set(tree))}; "
        f"in the tree but not a class: {sorted(set(tree) - set(classes))}"
    )
    for name, cls in classes.items():
        want = {b.__name__ for b in cls.__bases__ if b.__module__ == errors_module.__name__}
        if cls is TidalError:
            continue
        # Non-Tidal bases (ValueError, FileNotFoundError) may be named in notes: drop them.
        drawn = tree[name] & set(classes)
        assert drawn == want, (
            f"{name}: the tree gives parents {sorted(drawn)}, the class {sorted(want)}"
        )


def test_tree_parser_sees_a_wrong_parent() -> None:
    doc = "Tree::\n\n    TidalError\n    ├── A\n    │   └── B  (also a C)\n    └── D (retryable)\n"
    assert _tree(doc) == {
        "TidalError": set(),
        "A": {"TidalError"},
        "B": {"A", "C"},
        "D": {"TidalError", "RetryableError"},
    }


@pytest.mark.parametrize("base", [BlobUnavailableError, RegistryError, RetryableError])
def test_registry_unavailable_is_a_blob_unavailable_and_a_registry_error(
    base: type[Exception],
) -> None:
    assert issubclass(RegistryUnavailableError, base)
