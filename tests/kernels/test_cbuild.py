"""The C kernels build wherever they can: on an x86_64 CPU with AVX2 and FMA and a C compiler,
a kernel that fails to build would otherwise only show as skipped tests and torch fallbacks."""

from __future__ import annotations

import platform
import shutil

import pytest

from kernels import cpu_attention, cpu_fused, cpu_linear


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(
    platform.machine() != "x86_64"
    or not {"avx2", "fma"} <= _cpu_flags()
    or not (shutil.which("cc") or shutil.which("gcc")),
    reason="not an AVX2/FMA x86_64 machine with a C compiler",
)
def test_every_c_kernel_builds_here():
    assert cpu_linear.available(), "kernels/csrc/linear_cpu.c did not build"
    assert cpu_attention.available(), "kernels/csrc/paged_attention_cpu.c did not build"
    assert cpu_fused.available(), "kernels/csrc/fused_cpu.c did not build"


@pytest.mark.skipif(not cpu_fused.available(), reason="C kernels cannot be built here")
def test_the_build_cache_is_keyed_by_cpu(tmp_path, monkeypatch):
    """``-march=native`` code from one CPU model may fault on another: a cache directory
    shared between machines must hold one build per CPU, never hand one CPU's build to
    another."""
    from kernels import _cbuild

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cbuild.load("fused_cpu") is not None
    monkeypatch.setattr(_cbuild, "_cpu_identity", lambda: b"model name: another cpu")
    assert _cbuild.load("fused_cpu") is not None
    builds = sorted((tmp_path / "rl-rollout" / "kernels").glob("fused_cpu_*.so"))
    assert len(builds) == 2, builds
