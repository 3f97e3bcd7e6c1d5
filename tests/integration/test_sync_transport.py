"""The stateless gloo group moves buckets between real processes, and a dead peer is an error, not a hang."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from cai_ray.sync import GroupSpec, StatelessGroupTransport, SyncError, rebucket
from cai_ray.training.engine import open_store


def _receiver(spec: GroupSpec, rank: int, die: bool, queue: mp.Queue) -> None:
    transport = StatelessGroupTransport(spec, rank)
    if die:
        os._exit(1)  # a receiver that dies after joining, mid-sync
    try:
        named, timings = transport.receive()
        # Plain bytes through the queue: torch's shared-memory handoff dies with this process.
        as_bytes = [(n, str(t.dtype), bytes(t.contiguous().view(-1).view(torch.uint8).numpy())) for n, t in named]
        queue.put((rank, as_bytes, timings.num_buckets))
    except (RuntimeError, SyncError) as err:
        queue.put((rank, f"error: {err}", 0))


def _start_receivers(num: int, dying: set[int], timeout_s: float) -> tuple[object, GroupSpec, mp.Queue, list]:
    ctx = mp.get_context("spawn")
    store, host, port = open_store(num + 1, timeout_s=timeout_s)
    spec = GroupSpec("gloo", host, port, num + 1, version=3, timeout_s=timeout_s)
    queue: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(spec, r, r in dying, queue)) for r in range(1, num + 1)]
    for p in procs:
        p.start()
    return store, spec, queue, procs


def test_gloo_broadcast_to_two_receivers() -> None:
    store, spec, queue, procs = _start_receivers(2, set(), timeout_s=30)
    sent = [(f"layer{i}.weight", torch.randn(64, 64)) for i in range(6)]
    sent.append(("norm.weight", torch.randn(64).to(torch.bfloat16)))
    timings = StatelessGroupTransport(spec, 0, store).send(rebucket(sent, 40_000))
    assert timings.num_buckets == 3 and timings.num_bytes == 6 * 64 * 64 * 4 + 64 * 2  # all offsets already aligned
    for _ in procs:
        rank, named, num_buckets = queue.get(timeout=60)
        assert num_buckets == 3, rank
        assert [n for n, _, _ in named] == [n for n, _ in sent]
        for (_, dtype, raw), (_, want) in zip(named, sent, strict=True):
            assert dtype == str(want.dtype)
            assert raw == bytes(want.view(-1).view(torch.uint8).numpy())
    for p in procs:
        p.join(timeout=30)


@pytest.mark.timeout(90)
def test_dead_receiver_is_an_error_within_the_timeout() -> None:
    timeout_s = 8.0
    store, spec, queue, procs = _start_receivers(2, {2}, timeout_s)
    tensors = [(f"w{i}", torch.randn(100_000)) for i in range(8)]
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        StatelessGroupTransport(spec, 0, store).send(rebucket(tensors, 400_000))
    assert time.monotonic() - start < timeout_s + 5
    rank, outcome, _ = queue.get(timeout=timeout_s + 30)  # the surviving receiver also fails, it does not hang
    assert rank == 1 and str(outcome).startswith("error:")
    for p in procs:
        p.join(timeout=30)
        assert not p.is_alive()
