"""torch.compile(fullgraph=True) from the first call of a fresh process, as a user's script meets it:
each case of tests/compile_cases.py runs in its own interpreter (two at a time) and must match eager."""

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch_xent
from compile_cases import CASES

SCRIPT = Path(__file__).with_name("compile_cases.py")
NEEDS_NATIVE = {"options-native", "linear-native"}


def _run(case):
    proc = subprocess.run([sys.executable, str(SCRIPT), case], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              p for p in (str(SCRIPT.parent), os.environ.get("PYTHONPATH")) if p)))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def results():
    cases = [c for c in CASES if c not in NEEDS_NATIVE or torch_xent.native_available("cpu")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(cases, pool.map(_run, cases)))


@pytest.mark.parametrize("case", list(CASES))
def test_compile_case_in_a_fresh_process(results, case):
    if case not in results:
        pytest.skip("the compiled CPU kernel is not built")
    rc, output = results[case]
    assert rc == 0 and f"OK {case}" in output, output[-6000:]
