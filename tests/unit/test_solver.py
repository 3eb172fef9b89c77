"""The solver plumbing (trident/sched/solver.py): preloading leaves nothing for cffi to
bind under its lock in a later solve, so a model freed by the garbage collector during a
solve cannot hang the process (a simulator run froze that way, with no CPU use)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

# Run in a fresh interpreter: binding is per process, and this one may have solved.
CHECK = """
import mip.cbc as cbc
from trident.sched.solver import preload
lib, ffi = cbc.cbclib, cbc.ffi
before = "Cbc_deleteModel" in lib.__dict__
preload("cbc")
after = "Cbc_deleteModel" in lib.__dict__
parsed = any("int (void *, int, int, const char *" in str(k) for k in ffi._parsed_types)
print(before, after, parsed)
"""


def test_preload_binds_the_destructor_and_parses_the_callback_type() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=100, check=True
    )
    before, after, parsed = out.stdout.split()
    assert before == "False"  # bound lazily: the hazard exists without a preload
    assert after == "True"  # a later __del__ never takes cffi's lock
    assert parsed == "True"  # the first solve's callback type needs no parse under it
