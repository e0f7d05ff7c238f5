"""YAML with line numbers: every value of a document can say which line it came from.

Anchors and aliases are refused: policies and configs have no use for them, and
they are how a small file expands into a huge one.
"""

from __future__ import annotations

import os
import pathlib
import re
import stat
from dataclasses import dataclass, field
from typing import Any

import yaml

from canary.errors import Problem, ValidationFailed

Path = tuple[str | int, ...]
MAX_BYTES = 1 << 20
MAX_DEPTH = 64  # nested mappings and lists; a policy needs about 6


class _Loader(yaml.SafeLoader):
    """PyYAML's composer recurses once per level of nesting: bound the depth so a file
    of ten thousand `[` is a clear problem, not a RecursionError."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(
                    problem=f"nested more than {MAX_DEPTH} levels deep; a policy or config "
                            "needs only a few levels",
                    problem_mark=self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


# A number with a signed exponent and no dot (`5e-3`, `1e-09`) is a number, as in YAML 1.2
# and to an editor and helm: YAML 1.1 reads it as text, and helm writes every value
# below 1e-6 in that form (`1e-07`), so a policy given through the chart would be
# refused. An unsigned exponent (`1234e56`, which could be a version) stays text.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+][0-9]+$"),
    list("-+.0123456789"))


def scalar(text: str) -> Any:
    """What canary's loader reads `text`, written bare as a value, as (`5e-3`: 0.005)."""
    return yaml.load(text, Loader=_Loader)  # (_Loader is a SafeLoader)


@dataclass
class Doc:
    file: str
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line(self, path: Path) -> int:
        """The line of `path`, or of its nearest parent that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


def read(path: str | pathlib.Path) -> Doc:
    """Load a file; a file that cannot be read is its one problem."""
    return load(read_bytes(path), str(path))


def read_bytes(path: str | pathlib.Path, *, named: bool = False) -> bytes:
    """A file's bytes, at most MAX_BYTES of them: a regular file, never waiting on a FIFO
    for a writer. Anything else is its one problem (ValidationFailed). A file `named` on
    the command line may also be a pipe (`canary validate /dev/stdin`, `<(...)`): read
    as `cat` would, still bounded."""
    def fail(message: str) -> ValidationFailed:
        return ValidationFailed([Problem(str(path), 1, "(file)", message)])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if named else os.O_NONBLOCK))
    except (OSError, ValueError) as e:
        raise fail(f"cannot read: {e.strerror if isinstance(e, OSError) else e}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (named and not stat.S_ISDIR(st.st_mode))):
            raise fail("cannot read: not a regular file (a directory, a FIFO or a device)")
        if st.st_size > MAX_BYTES:
            raise fail(f"file is {st.st_size} bytes; the limit is {MAX_BYTES}")
        chunks, size = [], 0
        while size <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_BYTES:  # (a pipe, a device, or a file that grew)
            raise fail(f"file is larger than {MAX_BYTES} bytes, the limit")
        return b"".join(chunks)
    except OSError as e:
        raise fail(f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def load(text: str | bytes, file: str) -> Doc:
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise _fail(file, 1, f"file is {len(text)} bytes; the limit is {MAX_BYTES}")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail(file, 1, f"not UTF-8 text (byte {e.start}); save the file as UTF-8") from e
    if len(text) > MAX_BYTES:
        raise _fail(file, 1, f"file is larger than {MAX_BYTES} bytes")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return Doc(file, None, {(): 1})
        doc = Doc(file, None)
        doc.data = _convert(loader, node, (), doc, set())
        return doc
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise _fail(file, line, f"malformed YAML: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise _fail(file, 1, f"malformed YAML: {e}") from e
    except RecursionError:  # (MAX_DEPTH stops this first; a last line of defence)
        raise _fail(file, 1, "malformed YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _fail(file: str, line: int, message: str) -> ValidationFailed:
    return ValidationFailed([Problem(file, line, "(file)", message)])


def _convert(loader: _Loader, node: yaml.Node, path: Path, doc: Doc, seen: set[int]) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    if id(node) in seen:
        raise yaml.MarkedYAMLError(
            problem="anchors and aliases (&name, *name) are not supported; write the value out",
            problem_mark=node.start_mark,
        )
    seen.add(id(node))  # an alias is the node it names: met twice, whatever its kind
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if id(key_node) in seen:  # (a key is no path's value; an alias of one is met here)
                raise yaml.MarkedYAMLError(
                    problem="anchors and aliases (&name, *name) are not supported; write the "
                            "value out", problem_mark=key_node.start_mark)
            seen.add(id(key_node))
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.MarkedYAMLError(
                    problem="merge keys (<<) are not supported", problem_mark=key_node.start_mark
                )
            key = str(_scalar(loader, key_node))
            if key in out:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
                )
            out[key] = _convert(loader, value_node, (*path, key), doc, seen)
            doc.lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, n, (*path, i), doc, seen) for i, n in enumerate(node.value)]
    return _scalar(loader, node)


_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _scalar(loader: _Loader, node: yaml.Node) -> Any:
    # YAML 1.1 reads 1:30 as 90 (base 60); helm, editors (YAML 1.2) and people read text
    if node.tag in _NUMBERS and isinstance(node, yaml.ScalarNode) and node.style is None \
            and ":" in node.value:
        return node.value
    value = loader.construct_object(node)
    if isinstance(value, str) and any("\ud800" <= c <= "\udfff" for c in value):
        raise yaml.MarkedYAMLError(
            problem="a lone UTF-16 surrogate (an escape like \\ud800) is half a character, "
                    "not text; write the character itself, or its \\U0001XXXX escape",
            problem_mark=node.start_mark)
    return value
