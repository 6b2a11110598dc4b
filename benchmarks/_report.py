"""Shared benchmark helpers: timing and writing a named section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "BENCHMARKS.md")
HEADER = "# Benchmarks\n\nEach section is written by the script named in it; rerun it to refresh.\n"


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}"
    )


def load_note(load_start: float) -> str:
    """The machine's load during a run (measured, not assumed): noisy numbers say so."""
    return (
        f"Load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores (other jobs on the machine make absolute numbers noisy; compare "
        "within the run)."
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``body``."""
    text = open(REPORT).read() if os.path.exists(REPORT) else HEADER
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    block = (
        f"<!-- {name}:start -->\n## {name}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n"
        f"{body.strip()}\n<!-- {name}:end -->"
    )
    pattern = re.compile(
        rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S
    )
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block
    )
    with open(REPORT, "w") as f:
        f.write(text.rstrip() + "\n")
    print(block)
