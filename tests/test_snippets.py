"""The documentation's self-contained code blocks run verbatim, as a user would paste them: in a
fresh process, with and without ``jax_enable_x64`` where the block does not choose.

A block is self-contained when its first line is an ``import``; others continue an earlier one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as file:
        return [block for block in BLOCK.findall(file.read()) if block.startswith("import ")]


DOCUMENTS = ("README.md", "docs/recipes.md", "docs/architecture.md")
SNIPPETS = [(path, index, block) for path in DOCUMENTS for index, block in enumerate(_blocks(path))]


def _run(code, x64):
    env = dict(os.environ, JAX_ENABLE_X64="1" if x64 else "0", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _id(snippet):
    path, index, _ = snippet
    return f"{path}[{index}]"


def _custom_kernel(snippet):
    return "kernels.register" in snippet[2] and "check_kernel" in snippet[2]


# The fast profile runs the README's custom-kernel block after `jax_enable_x64` (where its
# check_kernel once failed); the full profile every block in both precisions.
CALLS = [
    pytest.param(s, x64, marks=() if _custom_kernel(s) and x64 else pytest.mark.slow, id=f"{_id(s)}-{'float64' if x64 else 'float32'}")
    for s in SNIPPETS
    for x64 in (False, True)
]


@pytest.mark.parametrize("snippet, x64", CALLS)
def test_documented_code_runs_verbatim(snippet, x64):
    if not x64 and "jax_enable_x64" in snippet[2]:
        pytest.skip("the block enables float64 itself")
    result = _run(snippet[2], x64)
    assert result.returncode == 0, result.stderr[-4000:]


def test_every_document_has_runnable_blocks():
    """The extraction itself: the README's custom-kernel block and both recipes are found."""
    assert any(_custom_kernel(s) for s in SNIPPETS)
    assert sum(path == "docs/recipes.md" for path, _, _ in SNIPPETS) == 2
    assert sum(path == "docs/architecture.md" for path, _, _ in SNIPPETS) == 1
