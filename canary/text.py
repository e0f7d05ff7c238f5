"""Text from outside (request bodies, stored rollouts, Prometheus) on its way to a
terminal: control characters are refused at the API and escaped wherever they are shown."""

from __future__ import annotations

import unicodedata

# bidi embeddings, overrides and isolates (they reorder what follows them on screen) and
# the Unicode line and paragraph separators
_FORMAT = frozenset({*map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)),
                     "\u2028", "\u2029"})


# the characters is_control refuses, as a JSON Schema pattern that ECMA-262, Go's RE2
# (helm) and Python all read: those above U+00FF are in it as themselves (RE2 has no
# backslash-u escape). Schemas use it as a search under `not`, so that no engine's `$`
# (Python's matches before a final line break) lets one through.
CONTROL_PATTERN = "[\\x00-\\x1f\\x7f-\\x9f" + "".join(sorted(_FORMAT)) + "]"


def is_control(c: str) -> bool:
    """C0 and C1 controls (NUL, ESC, CR, LF, TAB, DEL, ...), bidi controls and line
    separators: characters that can move the cursor, recolour or reorder a terminal."""
    return c in _FORMAT or unicodedata.category(c) == "Cc"


def escape(text: object) -> str:
    """`text` with every control character written as a visible escape (`\\x1b`, `\\u202e`),
    so what reaches a terminal is exactly what was stored; None and numbers as str()."""
    s = str(text)
    if s.isprintable() and not any(c in _FORMAT for c in s):
        return s
    out = []
    for c in s:
        if is_control(c):
            code = ord(c)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(c)
    return "".join(out)
