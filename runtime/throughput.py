"""Throughput mode: images per second with several inference requests in flight.

Reported apart from single-stream latency (``mode="throughput"``): ``fps`` is the number of images
completed over the measured window (first submission to last completion, ramp-up and drain
included), and the latency figures are per request, from submission to completion, so they include
any time a request waits inside the backend behind the others.

How requests are kept in flight depends on the backend; each way is the backend's own:

* **OpenVINO** — its ``AsyncInferQueue`` with ``requests`` infer requests (default: the compiled
  model's optimal number, which the ``throughput`` hint raises by running several streams). A new
  request is submitted as soon as one is idle; its latency is stamped from that moment to its
  completion callback.
* **Runners whose ``infer`` is thread-safe** (``Runner.concurrent_infer``; ONNX Runtime, whose
  ``InferenceSession.run`` is thread-safe and releases the GIL) — ``requests`` Python threads
  calling ``infer`` back to back on the one session. ONNX Runtime has no async API in Python, and
  its concurrent runs share one intra-op thread pool, so the default is one request: throughput
  there comes from the batch (pass a larger ``x``), and more requests measure what contention does.
* **Other runners** (TensorRT: one execution context and one stream) — one request at a time; more
  is a user error rather than a silently serialised measurement.

Warm-up uses the same settle rule as single-stream, on rounds of ``requests`` concurrent requests.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from runtime.errors import BckdError
from runtime.profile import (DEFAULT_CV_THRESHOLD, Clock, LatencyStats, Protocol, Warmup,
                             WarmupPolicy, activated, warm_up)

if TYPE_CHECKING:
    from runtime.backends.base import Runner


class QueueStream:
    """Keeps an OpenVINO ``AsyncInferQueue`` full; latency per request from its callback."""

    kind = "openvino AsyncInferQueue"

    def __init__(self, queue: Any, x: np.ndarray, requests: int) -> None:
        self.queue, self.feed, self.requests = queue, {0: np.ascontiguousarray(x)}, requests

    def round(self) -> None:
        """One warm-up round: ``requests`` requests in flight, then wait for all."""
        self.queue.set_callback(_ignore)
        for _ in range(self.requests):
            self.queue.start_async(self.feed)
        self.queue.wait_all()

    def run(self, protocol: Protocol, clock: Clock) -> tuple[list[int], int]:
        latencies: list[int] = []
        append = latencies.append
        self.queue.set_callback(lambda request, t0: append(clock() - t0))
        start = clock()
        min_end, max_end = protocol.deadlines(start)
        while True:
            self.queue.get_idle_request_id()  # blocks (GIL released) until a request is free
            now = clock()
            if now >= max_end or (now >= min_end and len(latencies) >= protocol.iters):
                break
            self.queue.start_async(self.feed, userdata=now)
        self.queue.wait_all()
        return latencies, clock() - start

    def close(self) -> None:
        self.queue.set_callback(_ignore)


class ThreadStream:
    """``requests`` threads calling a thread-safe ``infer`` back to back (inline for one)."""

    kind = "threads"

    def __init__(self, infer: Callable[[], Any], requests: int) -> None:
        self.infer, self.requests = infer, requests
        self.pool = ThreadPoolExecutor(requests) if requests > 1 else None

    def round(self) -> None:
        if self.pool is None:
            self.infer()
        else:
            list(self.pool.map(lambda _: self.infer(), range(self.requests)))

    def run(self, protocol: Protocol, clock: Clock) -> tuple[list[int], int]:
        latencies: list[int] = []
        append, infer, iters = latencies.append, self.infer, protocol.iters
        start = clock()
        min_end, max_end = protocol.deadlines(start)

        def worker() -> int:
            while True:
                t0 = clock()
                infer()
                t1 = clock()
                append(t1 - t0)
                if t1 >= max_end or (t1 >= min_end and len(latencies) >= iters):
                    return t1

        if self.pool is None:
            return latencies, worker() - start
        ends = [f.result() for f in [self.pool.submit(worker) for _ in range(self.requests)]]
        return latencies, max(ends) - start

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _ignore(request: Any, userdata: Any) -> None:
    """An AsyncInferQueue callback that drops the result (warm-up, and after a measurement)."""


def open_stream(runner: Runner, x: np.ndarray, requests: int | None) -> QueueStream | ThreadStream:
    """The way ``runner`` keeps ``requests`` requests in flight (see the module docstring)."""
    if requests is not None and (not isinstance(requests, int) or requests < 1):
        raise BckdError(f"requests must be a positive integer, got {requests!r}")
    async_queue = getattr(runner, "async_queue", None)
    if callable(async_queue):
        n = requests or runner.jobs  # type: ignore[attr-defined]
        return QueueStream(async_queue(n), x, n)
    if (requests or 1) > 1 and not runner.concurrent_infer:
        raise BckdError(
            f"the {runner.backend} runner runs one request at a time, so requests={requests} would "
            "only queue them up; use requests=1 and a larger batch to measure throughput"
        )
    return ThreadStream(lambda: runner.infer(x, check=False), requests or 1)


def profile_throughput(
    runner: Runner,
    x: np.ndarray,
    *,
    requests: int | None = None,
    warmup: int | WarmupPolicy = 10,
    iters: int = 50,
    min_seconds: float = 1.0,
    max_seconds: float = 60.0,
    cv_threshold: float = DEFAULT_CV_THRESHOLD,
    clock: Clock = time.perf_counter_ns,
) -> LatencyStats:
    """Images/s of ``runner`` on ``x`` with ``requests`` requests in flight (``mode="throughput"``).

    At least ``iters`` requests complete and ``min_seconds`` pass (capped by ``max_seconds``);
    ``warmup`` is the minimum number of warm-up rounds. ``x`` is checked once, before timing.
    """
    proto = Protocol(iters=iters, min_seconds=min_seconds, max_seconds=max_seconds,
                     cv_threshold=cv_threshold, warmup=WarmupPolicy.of(warmup))
    with activated(runner):
        runner.check_input(x)
        stream = open_stream(runner, x, requests)
        try:
            warm = warm_up(stream.round, proto.warmup, clock)
            latencies, window_ns = stream.run(proto, clock)
        finally:
            stream.close()
        return _throughput_stats(runner, x, stream, latencies, window_ns, warm, proto)


def _throughput_stats(runner: Runner, x: np.ndarray, stream: QueueStream | ThreadStream,
                      latencies: list[int], window_ns: int, warm: Warmup,
                      proto: Protocol) -> LatencyStats:
    first = next(iter(x.values())) if isinstance(x, dict) else x
    batch = int(first.shape[0])
    images = len(latencies) * batch
    fps = images / (window_ns / 1e9) if window_ns > 0 else float("inf")
    context = {**runner.describe(), "input_shape": list(first.shape), "requests": stream.requests,
               "concurrency": stream.kind, "images": images}
    return LatencyStats.from_ns(latencies, total_s=window_ns / 1e9, batch=batch, warmup=warm,
                                mode="throughput", fps=fps, protocol=proto,
                                warnings=proto.cut_short(len(latencies)), context=context)
