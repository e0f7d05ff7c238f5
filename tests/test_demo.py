"""`canary demo`, the README's first command, end to end: it must keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# the whole demo: real nginx, Prometheus and Alertmanager, about a minute
pytestmark = pytest.mark.e2e


def test_the_demo_promotes_the_healthy_release_and_rolls_back_both_bad_ones():
    canary = Path(sys.executable).with_name("canary")
    out = subprocess.run([str(canary), "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "rollout 1 ended succeeded" in text
    # v2 handed over: the stable side redeployed with it and serving again; the next
    # versions go where the controller says, and each step says where traffic is
    assert ("target web: stable side ({port}) runs v2, carries 100%; canary side ({port}) "
            "runs v2, carries 0%. Serving: stable side; the next version goes to the canary "
            "side").replace("({port})", "") in re.sub(r"\(\d+\)", "", text)
    assert "deploys it where the controller says: the canary side" in text
    assert "stable version v2 inferred from the serving side" in text
    assert "rollout 2 ended rolled_back" in text
    assert "rollout 3 ended rolled_back: gate errors: canary's error rate is above stable's" \
        in text
    assert "Traceback" not in out.stderr
