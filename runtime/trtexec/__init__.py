"""NVIDIA's ``trtexec`` on the device: find and run it, read its reports, profile with it.

* :mod:`~runtime.trtexec.tool` — locate the binary, read its version and GPU from the banner, run
  it with a kept log (shared with the trtexec engine builder in :mod:`export.trt.trtexec`).
* :mod:`~runtime.trtexec.report` — parse an inference run's output: the performance summary in its
  8.x / 10.x / 11.x forms, the echoed options (which decide what "Latency" means), the warnings.
* :mod:`~runtime.trtexec.times` — the ``--exportTimes`` per-query JSON, bckd's statistics of it.
* :mod:`~runtime.trtexec.profiler` — :func:`profile_trtexec`, ``bckd profile --backend trtexec``.

Facts and sources: shared/design/trt-jetson.md §3. Nothing here imports TensorRT or torch.
"""
from runtime.trtexec.profiler import (DEFAULT_PERCENTILES, InferenceRun, inference_command,
                                      profile_trtexec)
from runtime.trtexec.report import (InferenceOptions, MetricStats, PerformanceSummary, TrtexecLog,
                                    parse_trtexec_log, read_trtexec_log)
from runtime.trtexec.times import (IterationTimes, latency_stats, parse_export_times,
                                   read_export_times, trtexec_median, trtexec_percentile)
from runtime.trtexec.tool import (find_trtexec, parse_trtexec_device, parse_trtexec_version,
                                  run_trtexec, shape_spec, trtexec_version)

__all__ = [
    "DEFAULT_PERCENTILES", "InferenceOptions", "InferenceRun", "IterationTimes", "MetricStats",
    "PerformanceSummary", "TrtexecLog", "find_trtexec", "inference_command", "latency_stats",
    "parse_export_times", "parse_trtexec_device", "parse_trtexec_log", "parse_trtexec_version",
    "profile_trtexec", "read_export_times", "read_trtexec_log", "run_trtexec", "shape_spec",
    "trtexec_median", "trtexec_percentile", "trtexec_version",
]
