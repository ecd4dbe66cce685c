"""The client's native worker pool (reverst.client._handler._Workers), on its own."""
from __future__ import annotations

import threading
import time

from reverst.client._handler import _Workers

from .observe import eventually


def test_light_traffic_stays_on_one_warm_thread():
    pool = _Workers(8)
    seen = []
    for _ in range(20):
        done = threading.Event()
        pool.submit(lambda: (seen.append(threading.get_ident()), done.set()))
        assert done.wait(5)
        eventually(lambda: pool._idle, timeout=5.0)  # the worker is back in the idle stack
    assert len(set(seen)) == 1
    pool.close()
    eventually(lambda: pool._threads == 0, timeout=5.0)


def test_at_most_size_threads_and_the_backlog_runs_in_order():
    pool = _Workers(3)
    gate = threading.Event()
    running, order, lock = set(), [], threading.Lock()

    def task(i):
        with lock:
            running.add(threading.get_ident())
        gate.wait(5)
        with lock:
            order.append(i)

    for i in range(10):
        pool.submit(task, i)
    eventually(lambda: len(running) == 3, timeout=5.0)
    time.sleep(0.1)
    assert len(running) == 3 and pool._threads == 3 and len(pool._backlog) == 7
    gate.set()
    eventually(lambda: len(order) == 10, timeout=5.0)
    assert sorted(order) == list(range(10))
    pool.close()
    eventually(lambda: pool._threads == 0, timeout=5.0)


def test_a_failing_call_does_not_kill_its_worker():
    pool = _Workers(1)
    done = threading.Event()
    pool.submit(lambda: 1 / 0)
    pool.submit(done.set)
    assert done.wait(5)
    assert pool._threads == 1
    pool.close()
    eventually(lambda: pool._threads == 0, timeout=5.0)
