"""The YAML loader of groups files (:func:`reverst.config.parse_groups`), apart so that
importing :mod:`reverst.config` (as a tunnel client does, for its auth types) does not load
PyYAML."""
from __future__ import annotations

from typing import Any

import yaml

from .config import _q


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one, documents
    nested deeper than any groups file (PyYAML's composer recurses), lone surrogates
    (``"\\ud800"``) and values its own constructors fail on with other errors than
    YAMLError (``!!int x``, ``2001-02-30``): each a YAML error with its line and column."""

    MAX_DEPTH = 64

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > self.MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {self.MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            value = super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            tag = node.tag.rpartition(":")[2]
            shown = f" {_q(node.value[:40])}" if isinstance(node.value, str) else ""
            raise yaml.constructor.ConstructorError(None, None, f"invalid {tag}{shown}", node.start_mark) from exc
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise yaml.constructor.ConstructorError(None, None, "a string with a lone surrogate (not text)",
                                                        node.start_mark) from None
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_q(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep)
