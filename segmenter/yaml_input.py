"""Bounded YAML input: the one reader for every YAML the package accepts (configs, study specs,
command-line option values).

YAML aliases let a kilobyte of text stand for billions of values (`a: &a [1, 1]`,
`b: &b [*a, *a]`, ...). PyYAML builds such a document cheaply, as a graph that shares nodes, but
anything that walks it as a tree (validation, an error message that prints the value, JSON)
expands it and runs out of memory. So before a document is turned into Python objects, its
size is checked twice: the text against `MAX_YAML_BYTES`, and the number of values it would
have written out in full (aliases expanded) against `MAX_YAML_VALUES`. A recursive alias is
refused outright.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

#: the most bytes of YAML text read from one file or string (1 MiB)
MAX_YAML_BYTES = 1 << 20
#: the most scalars, lists and mappings one document may hold with its aliases expanded
MAX_YAML_VALUES = 100_000


class YamlInputError(ValueError):
    """YAML that cannot be read or is larger than the bounds; the message is one line."""


def load_yaml(text: str | bytes, source: str = "<yaml>") -> Any:
    """Parse one YAML document safely (`yaml.SafeLoader`) within the size bounds.

    Returns what `yaml.safe_load` returns (None for an empty document). Raises YamlInputError
    naming `source` for a syntax error, more than `MAX_YAML_BYTES` of text, more than
    `MAX_YAML_VALUES` values with aliases expanded, or a recursive alias.
    """
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", errors="replace"))
    if isinstance(text, bytes) and size <= MAX_YAML_BYTES:
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise YamlInputError(f"{source}: not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    if size > MAX_YAML_BYTES:
        raise YamlInputError(f"{source}: more than {MAX_YAML_BYTES} bytes of YAML; a config or spec is "
                             "a few kilobytes: check that this is the file you meant")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        count = expanded_size(node, source)
        if count > MAX_YAML_VALUES:
            raise YamlInputError(
                f"{source}: its aliases (*name) expand to {count} values, more than the "
                f"{MAX_YAML_VALUES} allowed: write the values out or use fewer nested aliases"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise YamlInputError(f"{source}: YAML nested too deeply to read") from None
    except yaml.YAMLError as err:
        raise YamlInputError(f"{source}: invalid YAML: {describe_yaml_error(err)}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    """`load_yaml` of a file's text; reads at most `MAX_YAML_BYTES` + 1 bytes of it.

    Raises FileNotFoundError when `path` is not a file, YamlInputError as `load_yaml`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    return load_yaml(data, str(path))


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """One line: the problem and where (line and column, 1-based) when PyYAML knows them."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if problem:
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        return f"{problem}{where}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def expanded_size(node: yaml.Node, source: str = "<yaml>") -> int:
    """How many values (scalars, sequences, mappings, keys included) `node` holds written out in
    full, each alias counted as a copy of what it names. Shared nodes are measured once, so this
    costs time in the number of distinct nodes. Raises YamlInputError on a recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YamlInputError(f"{source}: recursive YAML alias at line {n.start_mark.line + 1}: "
                                 "a value cannot contain itself")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        active.discard(key)
        sizes[key] = total
        return total

    return size(node)
