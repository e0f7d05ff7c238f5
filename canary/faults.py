"""Failpoints for crash tests. `CANARY_FAILPOINTS="after_save=0.05,before_apply=0.1"`
makes the process SIGKILL itself at those named points with that probability; it prints
the point's name to stderr first so the test can count where it died. Unset (as in
production) each call is one dictionary lookup."""

from __future__ import annotations

import os
import random
import signal
import sys


def _parse(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in text.split(","):
        name, _, p = item.partition("=")
        if name.strip():
            out[name.strip()] = float(p or 1.0)
    return out


_POINTS = _parse(os.environ.get("CANARY_FAILPOINTS", ""))


def point(name: str) -> None:
    p = _POINTS.get(name)
    if p is not None and random.random() < p:
        sys.stderr.write(f'{{"failpoint": "{name}"}}\n')
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
