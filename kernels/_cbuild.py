"""Build-and-load for the C kernels in ``csrc/``: each source is compiled once per source
(with the headers of ``csrc/``), flags and machine into a user cache directory with the
system C compiler (``cc``) and loaded through ctypes. No compiler, or a CPU the source cannot
target (e.g. no AVX2/FMA): ``load`` returns None and callers use their torch path."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

CSRC = os.path.join(os.path.dirname(__file__), "csrc")
# -fopenmp: the library asks for libgomp.so.1, which resolves to the copy torch has already
# loaded, so these kernels and torch's ops share one OpenMP thread pool (checked in /proc/maps).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rl-rollout", "kernels")


def _cpu_identity() -> bytes:
    """The CPU's model and feature flags: ``-march=native`` code built on one CPU can fault on
    another (a shared or copied cache directory), so the cache key names the CPU."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = (b"model name", b"flags")
    return b"\n".join(sorted({ln for ln in lines if ln.split(b":")[0].strip() in wanted}))


def _sources(source: str) -> bytes:
    """The source and every header of ``csrc/`` (a source may include any of them), so that
    editing a header rebuilds what includes it."""
    headers = sorted(f for f in os.listdir(CSRC) if f.endswith(".h"))
    parts = []
    for path in [source, *(os.path.join(CSRC, h) for h in headers)]:
        with open(path, "rb") as f:
            parts.append(f.read())
    return b"\0".join(parts)


def _build(source: str, target: str, flags: list[str]) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, source, "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, target)  # atomic: concurrent builders never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """``csrc/<name>.c`` as a loaded library, or None when it cannot be built here.
    ``extra_flags`` are added to ``FLAGS`` for this source (e.g. ``-ffp-contract=off``)."""
    source = os.path.join(CSRC, f"{name}.c")
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256(_sources(source) + " ".join(flags).encode())
    key.update(platform.machine().encode() + _cpu_identity())
    target = os.path.join(_cache_dir(), f"{name}_{key.hexdigest()[:16]}.so")
    try:
        if not os.path.exists(target):
            _build(source, target, flags)
        return ctypes.CDLL(target)
    except (OSError, subprocess.CalledProcessError):
        return None


def load_typed(
    name: str, signatures: dict[str, list], extra_flags: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
    """``load``, with the argument types of each function in ``signatures`` set (they all
    return a C ``int``: 0, or an error code)."""
    lib = load(name, extra_flags)
    if lib is not None:
        for function, argtypes in signatures.items():
            fn = getattr(lib, function)
            fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib
