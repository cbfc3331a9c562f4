"""YAML from files anyone may hand us: safe_load with the expansion of aliases capped and repeated keys refused.

PyYAML shares one object per anchor, so a "billion laughs" document loads in little
memory; it explodes only when something walks it (a copy, a repr, a dump). Counting
the nodes the document would expand to, without expanding it, refuses such a file
before anything walks it.
"""

from __future__ import annotations

from typing import Any

import yaml

from vera_cli.errors import VeraError

MAX_NODES = 100_000  # a shipped config has about a hundred
MAX_CHARS = 1_000_000
# PyYAML's scanner slows down with the square of the bracket nesting depth; configs nest a few levels.
MAX_FLOW_DEPTH = 100


class _CountingLoader(yaml.SafeLoader):
    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if _expanded_nodes(node, {}) > MAX_NODES:
            raise VeraError(f"expands to more than {MAX_NODES:,} values through its aliases (*name): "
                            "a config needs far fewer; write the values out or drop the aliases")
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML keeps a repeated key's last value: a second `train:` section would drop the first without a word.
        # Keys that a merge (<<) brings in are meant to be overridden, and are not in node.value until flattened.
        lines: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in lines:
                    raise VeraError(f"has the key {key.value!r} twice (lines {lines[key.tag, key.value]} and {line}): keep one")
                lines[key.tag, key.value] = line
        return super().construct_mapping(node, deep)


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes `node` stands for with every alias expanded; shared nodes are counted once per use."""
    if id(node) in memo:
        return memo[id(node)]
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    for child in children:
        total += _expanded_nodes(child, memo)
        if total > MAX_NODES:
            break
    memo[id(node)] = total
    return total


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ and { (quoted ones counted too: an overestimate, never an under-)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def safe_load(text: str, where: str) -> Any:
    """yaml.safe_load, refusing oversized, deeply nested or alias-bomb documents and repeated keys with a
    VeraError naming `where`; a syntax error stays a yaml.YAMLError for the caller to place."""
    if len(text) > MAX_CHARS:
        raise VeraError(f"{where} is {len(text):,} characters long, more than a config can be ({MAX_CHARS:,})")
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise VeraError(f"{where} nests brackets more than {MAX_FLOW_DEPTH} levels deep: that is not a config")
    try:
        return yaml.load(text, Loader=_CountingLoader)  # noqa: S506 - a SafeLoader subclass
    except VeraError as exc:
        raise VeraError(f"{where} {exc}") from None
    except RecursionError:
        raise VeraError(f"{where} is nested too deeply to be a config") from None
