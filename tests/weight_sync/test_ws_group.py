"""Standalone group lifecycle and failure modes that need only one process."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from weight_sync import WeightSyncError, WeightSyncTimeout, create_group, free_port


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises if the port were taken
    assert 0 < port < 65536


def test_rendezvous_without_a_master_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="'ws-test-lonely' \\(rank 1/2\\): create_group"):
        create_group("127.0.0.1", free_port(), 1, 2, "ws-test-lonely", timeout_s=1)
    assert time.monotonic() - start < 15


def test_single_rank_group_and_use_after_destroy() -> None:
    group = create_group("127.0.0.1", free_port(), 0, 1, "ws-test-solo", timeout_s=5)
    with group:
        t = torch.arange(3.0)
        group.broadcast(t, src=0)
        group.barrier()
        assert t.tolist() == [0.0, 1.0, 2.0] and "alive=True" in repr(group)
    group.destroy()  # idempotent
    with pytest.raises(WeightSyncError, match="after destroy"):
        group.broadcast(t, src=0)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        create_group("127.0.0.1", 1, 2, 2, "g")
    with pytest.raises(ValueError, match="backend"):
        create_group("127.0.0.1", 1, 0, 1, "g", backend="mpi")
