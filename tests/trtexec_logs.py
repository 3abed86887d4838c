"""trtexec output for the parser tests: the verbatim examples of trt-jetson.md §3.2, then blocks
composed from the strings in TensorRT's ``samples/common/sampleReporting.cpp`` / ``sampleOptions.cpp``.

Every constant says where it comes from. Verbatim ones are copied byte for byte from the design
notes (which quote the linked GitHub threads); keep them that way, they are the evidence that the
parser reads real output. Composed ones are marked so.
"""
from __future__ import annotations

# -- verbatim (trt-jetson.md §3.2) -----------------------------------------------------------------
# TRT 10.x, 3 percentiles: NVIDIA/TensorRT #4177 (2024-10-03).
SUMMARY_10X = r"""[10/03/2024-10:47:59] [I] === Performance summary ===
[10/03/2024-10:47:59] [I] Throughput: 130.298 qps
[10/03/2024-10:47:59] [I] Latency: min = 5.38672 ms, max = 13.3664 ms, mean = 7.60628 ms, median = 7.16092 ms, percentile(90%) = 10.2996 ms, percentile(95%) = 10.8698 ms, percentile(99%) = 12.9675 ms
[10/03/2024-10:47:59] [I] Enqueue Time: min = 2.72876 ms, max = 15.0201 ms, mean = 7.63062 ms, median = 7.86694 ms, percentile(90%) = 10.1792 ms, percentile(95%) = 11.7217 ms, percentile(99%) = 14.1848 ms
[10/03/2024-10:47:59] [I] H2D Latency: min = 0.0065918 ms, max = 0.0698242 ms, mean = 0.0122212 ms, median = 0.00814819 ms, percentile(90%) = 0.0253906 ms, percentile(95%) = 0.0270996 ms, percentile(99%) = 0.0515137 ms
[10/03/2024-10:47:59] [I] GPU Compute Time: min = 5.34595 ms, max = 13.3388 ms, mean = 7.58404 ms, median = 7.14139 ms, percentile(90%) = 10.2881 ms, percentile(95%) = 10.8175 ms, percentile(99%) = 12.9485 ms
[10/03/2024-10:47:59] [I] D2H Latency: min = 0.00390625 ms, max = 0.110596 ms, mean = 0.0100141 ms, median = 0.00439453 ms, percentile(90%) = 0.0254517 ms, percentile(95%) = 0.0319824 ms, percentile(99%) = 0.0994873 ms
[10/03/2024-10:47:59] [I] Total Host Walltime: 3.00082 s
[10/03/2024-10:47:59] [I] Total GPU Compute Time: 2.96536 s
"""

# TRT 8.4 on Jetson AGX Xavier, single percentile, with the footer: OE4T/meta-tegra PR #952.
SUMMARY_84 = r"""[03/11/2022-14:57:03] [I] === Performance summary ===
[03/11/2022-14:57:03] [I] Throughput: 41087.7 qps
[03/11/2022-14:57:03] [I] Latency: min = 0.387207 ms, max = 0.447357 ms, mean = 0.402238 ms, median = 0.401947 ms, percentile(99%) = 0.420288 ms
[03/11/2022-14:57:03] [I] Enqueue Time: min = 0.0830078 ms, max = 0.229004 ms, mean = 0.090497 ms, median = 0.0871582 ms, percentile(99%) = 0.126099 ms
[03/11/2022-14:57:03] [I] H2D Latency: min = 0.00622559 ms, max = 0.0571899 ms, mean = 0.0104126 ms, median = 0.00952148 ms, percentile(99%) = 0.0272217 ms
[03/11/2022-14:57:03] [I] GPU Compute Time: min = 0.375977 ms, max = 0.403564 ms, mean = 0.388221 ms, median = 0.388443 ms, percentile(99%) = 0.393188 ms
[03/11/2022-14:57:03] [I] D2H Latency: min = 0.00195312 ms, max = 0.00537109 ms, mean = 0.00360451 ms, median = 0.00366211 ms, percentile(99%) = 0.00488281 ms
[03/11/2022-14:57:03] [I] Total Host Walltime: 3.00119 s
[03/11/2022-14:57:03] [I] Total GPU Compute Time: 2.99202 s
[03/11/2022-14:57:03] [I] Explanations of the performance metrics are printed in the verbose logs.
&&&& PASSED TensorRT.trtexec [TensorRT v8400] # trtexec --loadEngine=mnist16.trt --batch=16
"""

# TRT 8.2-era on Xavier NX, with End-to-End Host Latency: OE4T/meta-tegra PR #1124.
LINES_82 = r"""[12/06/2022-15:00:20] [I] Latency: min = 0.564209 ms, max = 0.593018 ms, mean = 0.573891 ms, median = 0.572998 ms, percentile(99%) = 0.587769 ms
[12/06/2022-15:00:20] [I] End-to-End Host Latency: min = 0.574707 ms, max = 0.606201 ms, mean = 0.586663 ms, median = 0.585938 ms, percentile(99%) = 0.601685 ms
"""

# Header line: NVIDIA/TensorRT #4036.
HEADER_102 = r"""&&&& RUNNING TensorRT.trtexec [TensorRT v100200] # D:\TensorRT-10.2.0.19\bin\trtexec.exe --loadEngine=...
"""

# Trace-average line: hmorimitsu/ptlflow #65.
TRACE_AVERAGE_10X = r"""Average on 10 runs - GPU latency: 30.3272 ms - Host latency: 30.7521 ms (enqueue 30.3453 ms)
"""

# -- composed from TensorRT's sources --------------------------------------------------------------
# The warning strings of printEpilog (sampleReporting.cpp, 8.4+ for the coefficient of variance);
# the 16.4497 % value is illustrative.
WARNINGS_10X = """\
[10/03/2024-10:47:59] [W] * Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may be under-utilized.
[10/03/2024-10:47:59] [W]   If not already in use, --useCudaGraph (utilize CUDA graphs where possible) may increase the throughput.
[10/03/2024-10:47:59] [W] * GPU compute time is unstable, with coefficient of variance = 16.4497%.
[10/03/2024-10:47:59] [W]   If not already in use, locking GPU clock frequency or adding --useSpinWait may improve the stability.
[10/03/2024-10:47:59] [I] Explanations of the performance metrics are printed in the verbose logs.
[10/03/2024-10:47:59] [I]
"""

# The device block of a Jetson AGX Orin run (as tests/test_tensorrt.py's BANNER_10).
DEVICE_ORIN = """\
[01/10/2025-21:52:50] [I] === Device Information ===
[01/10/2025-21:52:50] [I] Selected Device: Orin
[01/10/2025-21:52:50] [I] Compute Capability: 8.7
[01/10/2025-21:52:50] [I] SMs: 16
[01/10/2025-21:52:50] [I] Device Global Memory: 28826 MiB
[01/10/2025-21:52:50] [I]
"""

STAMP = "[01/10/2025-21:52:50] "


def options_echo(major: int, minor: int, *, transfers: bool, spin: bool, graph: bool,
                 shapes: dict[str, str] | None = None, iterations: int = 10, duration: float = 3,
                 warmup: float = 200, percentiles: str = "90,95,99", streams: int = 1,
                 batch: str = "Explicit", export_times: str = "") -> str:
    """The '=== Inference Options ===' and '=== Reporting Options ===' echo, as ``operator<<`` in
    sampleOptions.cpp prints it: 'Streams' / 'Percentile' and 'Input inference shape:' up to 8.x,
    'Inference Streams' / 'Percentiles' and 'Input inference shape :' (profile-aware) in 10.x+."""
    new = major >= 10
    on = {True: "Enabled", False: "Disabled"}
    lines = ["=== Inference Options ===", f"Batch: {batch}"]
    if shapes:
        sep = " : " if new else ": "
        lines += [f"Input inference shape{sep}{n}={d}" for n, d in shapes.items()]
    else:
        lines.append("Input inference shapes: model")
    lines += [f"Iterations: {iterations}", f"Duration: {duration:g}s (+ {warmup:g}ms warm up)",
              "Sleep time: 0ms", "Idle time: 0ms",
              f"{'Inference Streams' if new else 'Streams'}: {streams}", "ExposeDMA: Disabled",
              f"Data transfers: {on[transfers]}", f"Spin-wait: {on[spin]}",
              "Multithreading: Disabled", f"CUDA Graph: {on[graph]}",
              f"Separate profiling: {on[major >= 11]}", "Time Deserialize: Disabled",
              "Time Refit: Disabled", "Inputs:", "=== Reporting Options ===", "Verbose: Disabled",
              "Averages: 10 inferences",
              f"{'Percentiles' if (major, minor) >= (8, 5) else 'Percentile'}: {percentiles}",
              "Dump refittable layers:Disabled", "Dump output: Disabled", "Profile: Disabled",
              f"Export timing to JSON file: {export_times}", "Export output to JSON file: ",
              "Export profile to JSON file: ", ""]
    return "".join(f"{STAMP}[I] {ln}\n" for ln in lines)
