"""POSIX shared-memory segments (files under ``/dev/shm``) owned by exactly one creator.

Used by the colocated CPU path. We map files directly instead of using
``multiprocessing.shared_memory`` because that module's resource tracker (Python < 3.13) unlinks
or warns about segments *opened* by a consumer process when it exits, which breaks the ownership
rule "the creator unlinks".

Lifetime: a tensor made by :func:`map_segment` or :meth:`SharedSegment.tensor` keeps its
mapping alive (torch holds a reference to the ``mmap``), so unlinking a segment never invalidates
live views; it only removes the name. Names are validated and always derive from a caller-given
prefix, never hard-coded.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe single path component, else raise ``ValueError``."""
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid shared-memory name {name!r} (use [A-Za-z0-9._-], no '/')")
    return name


def _path(name: str) -> Path:
    return SHM_DIR / check_name(name)


class SharedSegment:
    """A writable segment created (exclusively) by this process; :meth:`unlink` removes it."""

    def __init__(self, name: str, nbytes: int) -> None:
        """Create ``/dev/shm/<name>`` of ``nbytes`` bytes.

        Raises ``FileExistsError`` if the name is taken (e.g. left over by a crashed process:
        see :func:`remove_segments`) and ``OSError`` (ENOSPC) if ``/dev/shm`` is too small --
        space is reserved up front so a full tmpfs fails here instead of with SIGBUS later.
        """
        self.name = name
        self.nbytes = nbytes
        path = _path(name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            size = max(nbytes, 1)  # mmap cannot map zero bytes
            os.posix_fallocate(fd, 0, size)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._linked = True

    def tensor(self) -> torch.Tensor:
        """The segment as a writable 1-D uint8 tensor of ``nbytes`` elements."""
        if self._mmap is None:
            raise RuntimeError(f"segment {self.name!r} is closed")
        return torch.frombuffer(self._mmap, dtype=torch.uint8)[: self.nbytes]

    def unlink(self) -> None:
        """Remove the name (idempotent); existing mappings stay valid until dropped."""
        if self._linked:
            self._linked = False
            try:
                os.unlink(_path(self.name))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unlink and drop this object's reference to the mapping (idempotent).

        The mmap is not closed explicitly: tensors created from it may still be alive, and
        closing would leave them dangling. It is unmapped once the last reference goes.
        """
        self.unlink()
        self._mmap = None


def map_segment(name: str, nbytes: int) -> torch.Tensor:
    """Map an existing segment read-only-for-the-owner as a 1-D uint8 tensor (no data copy).

    The mapping is copy-on-write private (``ACCESS_COPY``): reads come straight from the shared
    pages and an accidental write by the consumer never reaches the producer's data.
    """
    path = _path(name)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"segment {name!r} has {size} bytes, expected {nbytes}")
        mapping = mmap.mmap(fd, max(size, 1), access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8)[:nbytes]


def list_segments(prefix: str) -> list[str]:
    """Names of existing segments starting with ``prefix`` (e.g. for leak checks)."""
    check_name(prefix)
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))


def remove_segments(prefix: str) -> list[str]:
    """Unlink stale segments starting with ``prefix`` (e.g. after a trainer crash)."""
    removed = []
    for name in list_segments(prefix):
        try:
            os.unlink(_path(name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
