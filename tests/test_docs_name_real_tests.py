"""Every promise in the README and docs/ names the test that would fail if it were false;
a name that no longer exists (renamed, deleted) would leave the promise unheld while
still looking held."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tests/x.py::test_y, bench/x.py::test_y, or x.py::test_y (a file in tests/)
NAMED = re.compile(r"(?<![\w/])((?:tests/|bench/)?[\w/]+\.py)::(\w+)")


def test_every_test_the_docs_name_exists():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = [(doc.name, m.group(1) if m.group(1).startswith(("tests/", "bench/"))
              else f"tests/{m.group(1)}", m.group(2))
             for doc in docs for m in NAMED.finditer(doc.read_text())]
    assert len(named) > 50, "the docs name the tests that hold them"
    missing = [(doc, path, name) for doc, path, name in named
               if not (ROOT / path).is_file()
               or not re.search(rf"^\s*(?:async\s+)?def {name}\(|^class {name}\b",
                                (ROOT / path).read_text(), re.M)]
    assert not missing, missing


def test_every_test_the_docs_name_without_its_file_exists_somewhere():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    defined = {name for f in (*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/**/*.py"))
               for name in re.findall(r"def (test_\w+)\(", f.read_text())}
    named = {(doc.name, name) for doc in docs
             for name in re.findall(r"`(test_\w+)`", doc.read_text())}
    assert len(named) > 20
    assert not {(doc, name) for doc, name in named if name not in defined}
