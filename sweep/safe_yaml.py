"""The one way fwsweep reads YAML: safe, bounded, and strict about what YAML itself lets slip.

Every config, spec, `--set` value and saved sweep state goes through here, so one set of limits holds
everywhere:
- only regular files are read (a folder, `/dev/zero`, a named pipe or a socket are refused before any
  read, so nothing hangs), and at most `MAX_BYTES` of them;
- a key given twice in one mapping is an error naming the key and both lines (PyYAML keeps the last);
- nesting deeper than `MAX_DEPTH` is refused while composing (no RecursionError);
- a document whose aliases expand to more than `MAX_NODES` nodes (a "billion laughs" bomb) or refer to
  themselves is refused before anything walks it.
The loader is PyYAML's SafeLoader: plain data only, no Python objects.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from sweep.errors import Problem, UserError

MAX_BYTES = 1 << 20  # 1 MiB: the largest shipped spec is ~3 KB
MAX_DEPTH = 50  # a spec nests ~5 levels deep
MAX_NODES = 100_000  # scalars + collections after alias expansion


class _LimitError(Exception):
    """A document over one of the limits; `line` is 1-based (0 when unknown)."""

    def __init__(self, message: str, fix: str, line: int = 0) -> None:
        super().__init__(message)
        self.message, self.fix, self.line = message, fix, line


class BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader with a depth bound while composing and duplicate keys refused while constructing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LimitError(f"nested more than {MAX_DEPTH} levels deep",
                                  "a spec needs a few levels; remove the runaway brackets or indentation",
                                  self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                continue
            if first is not None:
                raise _LimitError(f"key {key!r} is given twice (lines {first} and {line}); YAML would keep "
                                  "only the last one", "remove one of them", line)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Node) -> int:
    """Nodes in the document once every alias is expanded; a _LimitError on a bomb or a cycle."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _LimitError("an alias refers to the collection that contains it",
                              "replace the alias (*name) with the values it stands for",
                              node.start_mark.line + 1)
        active.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:  # depth is bounded by MAX_DEPTH, so this recursion is too
            total += size(child)
            if total > MAX_NODES:
                raise _LimitError(f"expands to more than {MAX_NODES:,} values (aliases repeat their anchor)",
                                  "write the values out once, without nested aliases",
                                  child.start_mark.line + 1)
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document within the limits; every failure is a UserError naming `source`."""
    if len(text) > MAX_BYTES:
        raise UserError(Problem(source, f"is larger than {MAX_BYTES // 1024} KiB",
                                "a spec or config is a few KB; check that this is the right file"))
    try:  # the loader's reader checks every character as it is built: a binary file fails here
        loader = BoundedSafeLoader(text)
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        raise UserError(Problem(f"{source}:{line}", f"holds a character YAML does not allow ({err.reason}, "
                                f"#x{err.character:04x})", "give a text YAML file (UTF-8); this one looks "
                                "binary or damaged")) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except _LimitError as err:
        where = f"{source}:{err.line}" if err.line else source
        raise UserError(Problem(where, err.message, err.fix)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise UserError(Problem(where, f"malformed YAML ({getattr(err, 'problem', None) or err})",
                                "fix the syntax at that line")) from None
    except RecursionError:  # a last guard: MAX_DEPTH should stop it first
        raise UserError(Problem(source, "nested too deeply", "remove the runaway nesting")) from None
    finally:
        loader.dispose()


def read_text(path: str | Path) -> str:
    """A regular file's text (UTF-8, at most MAX_BYTES); anything else is a UserError naming the path."""
    p = Path(path)
    where = str(p)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError(Problem(where, "file not found", "check the path (relative to the current folder)")) \
            from None
    except NotADirectoryError:
        raise UserError(Problem(where, "file not found: a part of the path is a file, not a folder",
                                "check the path")) from None
    except OSError as err:
        raise UserError(Problem(where, f"cannot be read ({err.strerror or err})",
                                "check the path and its permissions")) from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(Problem(where, "is a folder, not a YAML file", "name the .yaml file inside it"))
    if not stat.S_ISREG(st.st_mode):
        raise UserError(Problem(where, "is not a regular file (a device, pipe or socket)",
                                "give the path of a .yaml file"))
    if st.st_size > MAX_BYTES:
        raise UserError(Problem(where, f"is {st.st_size:,} bytes, larger than the {MAX_BYTES // 1024} KiB "
                                "allowed", "a spec or config is a few KB; check that this is the right file"))
    try:
        # O_NONBLOCK: should the file be swapped for a pipe after the check, the read still returns
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise UserError(Problem(where, f"is larger than {MAX_BYTES // 1024} KiB",
                                    "a spec or config is a few KB; check that this is the right file"))
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(Problem(where, f"cannot be read ({err})",
                                "check its permissions and encoding (UTF-8)")) from None


def read_yaml_file(path: str | Path) -> Any:
    """Read and parse one YAML file within the limits (any YAML value; callers check its shape)."""
    return parse_yaml(read_text(path), str(path))
