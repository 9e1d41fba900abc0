"""Every Python block of README.md and docs/*.md runs (issue 20): documentation that drifts
from the code fails here.

A file's blocks run in order in one namespace, as a reader would run them, each from a fresh
seed and in a temporary directory. Two HTML comments right before a block change that:

* ``<!-- no-test: reason -->`` skips it (real data, a GPU, a long run); the skips are
  reported with their reasons, and there may be only a few;
* ``<!-- test-setup: code -->`` runs ``code`` first: what the text says the reader has
  (a model, a batch) without printing it in the block.
"""

from __future__ import annotations

import functools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_SKIPPED = 5  # a budget: a block that cannot run is the exception, and says why

FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```", re.S | re.M)
COMMENT = re.compile(r"<!--\s*(no-test|test-setup):((?:(?!<!--).)*?)-->\s*\Z", re.S)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    code: str
    skip: str | None = None  # the reason
    setup: str = ""

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@functools.cache
def blocks(path: Path) -> tuple[Block, ...]:
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        code = textwrap.dedent(m.group(2))
        skip, setup = None, ""
        comment = COMMENT.search(text, 0, m.start())
        if comment:
            kind, body = comment.group(1), comment.group(2).strip()
            if kind == "no-test":
                skip = body
            else:  # the first line follows "test-setup:", the others are indented
                head, _, rest = body.partition("\n")
                setup = head.strip() + "\n" + textwrap.dedent(rest)
        found.append(Block(path, line, code, skip, setup))
    return tuple(found)


ALL = [b for path in DOCS for b in blocks(path)]


@functools.cache
def namespace_before(path: Path, index: int) -> dict:
    """The namespace a reader has before block ``index`` of ``path``: every earlier block run."""
    if index == 0:
        return {"__name__": "__docs__"}
    ns = dict(namespace_before(path, index - 1))
    run(blocks(path)[index - 1], ns)
    return ns


def run(block: Block, ns: dict) -> None:
    if block.skip is not None:
        return
    torch.manual_seed(0)
    exec(compile(block.setup, f"{block.id} (setup)", "exec"), ns)
    exec(compile(block.code, block.id, "exec"), ns)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes stays out of the checkout


def test_the_docs_have_python_blocks():
    assert len(ALL) >= 15  # the extractor finds them (a broken pattern would find none)
    assert {b.path.name for b in ALL} >= {"README.md", "concrete.md", "data.md"}


def test_few_blocks_are_skipped_and_each_says_why():
    skipped = [b for b in ALL if b.skip is not None]
    for b in skipped:
        assert len(b.skip) > 10, f"{b.id}: a no-test needs a reason"
    assert len(skipped) <= MAX_SKIPPED, [b.id for b in skipped]


@pytest.mark.parametrize("block", ALL, ids=lambda b: b.id)
def test_block_runs(block):
    if block.skip is not None:
        pytest.skip(f"no-test: {block.skip}")
    path = block.path
    index = blocks(path).index(block)
    ns = dict(namespace_before(path, index))
    run(block, ns)
