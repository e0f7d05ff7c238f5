"""Traffic shapes other than a weight: a `match` stage (only requests with these headers
or cookies reach the canary) and a `mirror` stage (a share of requests is copied to the
canary, whose answers are discarded). Plain frozen values, shared by the policy, the
engine and every router.

A shape travels as its `key`: one canonical line of JSON, stored with the rollout (what
canary wants, what the router is known to carry) and kept by each router beside what
it wrote, so a router reads back exactly the shape it was given, or says it was edited.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

How = Literal["exact", "prefix", "regex"]
Where = Literal["header", "cookie"]
EDITED = "edited: "  # a live key that is no shape canary wrote


# Python's `re` accepts these; nginx's PCRE2 or Envoy's and the gateways' RE2 refuse them
# (or read them otherwise), and nginx -t would then fail at the stage, not at validate.
_UNPORTABLE = (
    (re.compile(r"\(\?(=|!|<=|<!)"), "a lookaround (?=, (?!, (?<=, (?<!"),
    (re.compile(r"\(\?>"), "an atomic group (?>"),
    (re.compile(r"\(\?\("), "a conditional (?("),
    (re.compile(r"\(\?#"), "a comment (?#"),
    (re.compile(r"\(\?P="), "a back-reference (?P="),
    (re.compile(r"\(\?[imsx-]*[aLux][a-zA-Z-]*[:)]"), "an inline flag other than i, m, s"),
    (re.compile(r"\\[1-9gkNuUZ]"), "an escape only Python reads (\\1, \\g, \\k, \\N, \\u, \\U, "
                                  "\\Z)"),
    (re.compile(r"(?<![\\(])[*+?}]\+"), "a possessive quantifier (*+, ++, ?+)"),
    (re.compile(r"\{,"), "a repeat with no lower bound ({,n}; write {0,n})"),
)


def unportable(regex: str) -> str | None:
    """What in `regex` some router's engine refuses, or None. Escaped characters and the
    insides of character classes are read as the literals they are."""
    plain, i, in_class = [], 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            # keep escapes that mean something outside a class; others become a literal
            plain.append(c + nxt if not in_class and nxt.isalnum() else "_")
            i += 2
            continue
        if in_class:
            in_class = c != "]" or plain[-1] == "["
            plain.append("_" if in_class else "]")
        else:
            in_class = c == "["
            plain.append("[" if in_class else c)
        i += 1
    text = "".join(plain)
    found = next((what for pattern, what in _UNPORTABLE if pattern.search(text)), None)
    return found or _too_big(regex, text)


# RE2 refuses a repeat count over 1000, and repeats nested to more than 1000 in all (it
# divides 1000 by each nested count, outermost first); nginx's PCRE2 refuses parentheses
# nested 250 deep. Canary stops at 100, leaving room for the group it wraps a match in.
MAX_REPEAT = 1000
MAX_NESTING = 100


def _too_big(regex: str, plain: str) -> str | None:
    depth = deepest = 0
    for c in plain:  # (escapes and classes are literals in `plain`)
        depth += (c == "(") - (c == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        return f"groups nested {deepest} deep (at most {MAX_NESTING})"
    # Python's own reading of it (it compiled already); a module without stubs
    sre: Any = importlib.import_module("re._parser")

    def walk(items: Any, budget: int) -> str | None:
        for op, arg in items:
            if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                lo, hi, sub = arg
                bounded = hi != sre.MAXREPEAT
                if max(lo, hi if bounded else 0) > MAX_REPEAT:
                    return f"a repeat count over {MAX_REPEAT}"
                m = hi if bounded else lo
                inner = budget // m if m > 0 else budget
                if inner == 0:
                    return f"repeats nested to more than {MAX_REPEAT} in all"
                found = walk(sub, inner)
            elif op == sre.SUBPATTERN:
                found = walk(arg[-1], budget)
            elif op == sre.BRANCH:
                found = next((f for b in arg[1] if (f := walk(b, budget))), None)
            elif op in (sre.ASSERT, sre.ASSERT_NOT, sre.ATOMIC_GROUP):
                found = walk(arg[-1], budget)
            else:
                found = None
            if found:
                return found
        return None

    try:
        return walk(sre.parse(regex), MAX_REPEAT)
    except Exception:  # (what Python cannot read is said where it compiles)
        return None


@dataclass(frozen=True)
class Condition:
    """One request property to compare: a header's or a cookie's value."""

    how: How
    value: str

    def regex(self) -> str:
        """The condition as a whole-value regular expression (RE2 and PCRE alike)."""
        if self.how == "regex":
            return self.value
        escaped = re.escape(self.value)
        return escaped + ".*" if self.how == "prefix" else escaped

    def to_json(self) -> str | dict[str, str]:
        return self.value if self.how == "exact" else {self.how: self.value}

    def text(self) -> str:
        return {"exact": "= {!r}", "prefix": "starts with {!r}",
                "regex": "matches {!r}"}[self.how].format(self.value)


@dataclass(frozen=True)
class Rule:
    where: Where
    name: str        # a header's name in lower case, or a cookie's name
    condition: Condition


@dataclass(frozen=True)
class Shape:
    """`rules` (all must hold) for a match stage, or `mirror` percent for a mirror stage."""

    rules: tuple[Rule, ...] = ()
    mirror: int | None = None

    @property
    def headers(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.where == "header")

    @property
    def cookies(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.where == "cookie")

    def key(self) -> str:
        if self.mirror is not None:
            return json.dumps({"mirror": self.mirror})
        return json.dumps({"match": [[r.where, r.name, r.condition.how, r.condition.value]
                                     for r in sorted(self.rules, key=_order)]},
                          separators=(",", ":"))

    def text(self) -> str:
        if self.mirror is not None:
            return f"mirror {self.mirror}% to the canary"
        return "match " + " and ".join(f"{r.where} {r.name} {r.condition.text()}"
                                       for r in sorted(self.rules, key=_order))


def _order(r: Rule) -> tuple[str, str]:
    return (r.where, r.name)


def from_key(key: str) -> Shape | None:
    """The shape a key stands for; None for anything else (an `edited` marker)."""
    try:
        data: Any = json.loads(key)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("mirror"), int):
        return Shape(mirror=data["mirror"])
    rules = data.get("match")
    if not isinstance(rules, list):
        return None
    try:
        return Shape(rules=tuple(Rule(w, n, Condition(h, v)) for w, n, h, v in rules))
    except (TypeError, ValueError):
        return None


def describe(key: str | None) -> str:
    """A shape key in words, for events and reasons."""
    if key is None:
        return "no match rule or mirror"
    if key.startswith(EDITED):
        return key[len(EDITED):]
    shape = from_key(key)
    return shape.text() if shape else key


def cookie_regex(name: str, condition: Condition) -> str:
    """A regular expression over the whole `Cookie` header that holds when the cookie
    `name` satisfies `condition` (for routers that cannot match a cookie by name)."""
    value = condition.regex()
    return f"^(.*?;\\s*)?{re.escape(name)}=({value})(;.*)?$"
