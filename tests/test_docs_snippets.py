"""Every ```python block of the user guide runs: per page, in order, in one fresh namespace.

The pages are Markdown (README.md, docs/*.md, docs/guide/*.md); a block that raises fails its page's test.
Each page runs in a temporary working directory (files it writes land there) with the variables
``torch.distributed.init_process_group`` reads set for a single rank, so the distributed page
runs as one process.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = [DOCS.parent / "README.md", *sorted([*DOCS.glob("*.md"), *(DOCS / "guide").glob("*.md")])]
BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_guide_has_code():
    assert sum(len(python_blocks(p.read_text())) for p in PAGES) >= 15


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())],
                         ids=lambda p: str(p.relative_to(DOCS.parent)))
def test_page_snippets_run(page, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    rng = torch.get_rng_state()
    namespace = {"__name__": f"docs_{page.stem}"}
    try:
        for line, code in python_blocks(page.read_text()):
            # Line numbers of a traceback are those of the page.
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
    finally:
        torch.set_rng_state(rng)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
