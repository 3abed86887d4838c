"""What BCKD costs: training-step time against logit KD, and context memory at stride 4 vs 8.

1. Step time: one full training step (student + frozen teacher forward, loss, backward, SGD) of
   the default student from the default teacher at the default size, with logit KD and with BCKD,
   measured in interleaved blocks after warm-up (median per step), under the autocast the trainer
   would pick. Prints the ratio BCKD / KD (and BCKD with ``teacher_boundary: soft``, to show
   what fitting the teacher boundary costs).
2. Memory: the peak memory of a BCKD training step with the context term at feature stride 4 and
   at stride 8 (boundary term off, so the context is what differs), each in a fresh process:
   ``torch.cuda.max_memory_allocated`` on CUDA, peak resident set size on CPU. Prints the ratio of
   whole-step peaks and of the part above a KD step's peak.

    python tests/benchmarks/bench_bckd_cost.py [--device cpu|cuda] [--batch 8] [--size 128]
        [--stride4-time]   # also the step time of BCKD at feature stride 4
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from distill.losses import LossContext, build_losses  # noqa: E402
from distill.task import DistillTask  # noqa: E402
from distill.trainer import AMP_DTYPES, build_model, resolve_amp, resolve_device  # noqa: E402
from runtime.config import RunConfig  # noqa: E402


def make_step(method: str, options: dict, device: torch.device, batch: int, size: int, amp: str):
    """A closure running one training step of ``method`` on fixed random data."""
    cfg = RunConfig()
    torch.manual_seed(0)
    student = build_model(cfg.student, 7).to(device).to(memory_format=torch.channels_last)
    teacher = build_model(cfg.teacher, 7).to(device).to(memory_format=torch.channels_last)
    losses = build_losses(method, options, LossContext.from_models(student, teacher))
    for loss, _ in losses.values():
        loss.to(device)
    task = DistillTask(student, teacher, losses).train()
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch, size, size), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp != "none"):
            total = task(x, y, epoch=0, epochs=20)["total"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def time_steps(args) -> dict:
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    steps = {"kd": make_step("kd", {}, device, args.batch, args.size, amp),
             "bckd": make_step("bckd", {}, device, args.batch, args.size, amp),
             # the frozen conv's sigmoid, the default before 'fitted': what the fit costs
             "bckd_soft": make_step("bckd", {"bckd": {"teacher_boundary": "soft"}}, device,
                                    args.batch, args.size, amp)}
    if args.stride4_time:  # the ablation's stride-4 variant (auto radius 10), for the record
        steps["bckd_stride4"] = make_step("bckd", {"bckd": {"feature_stride": 4}}, device,
                                          args.batch, args.size, amp)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    for _ in range(args.blocks):
        for name, step in steps.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    out = {"device": str(device), "amp": amp, "threads": torch.get_num_threads(),
           "kd_ms": med["kd"], "bckd_ms": med["bckd"], "ratio": med["bckd"] / med["kd"],
           "kd_min_ms": min(times["kd"]) * 1000, "bckd_min_ms": min(times["bckd"]) * 1000,
           "bckd_soft_ms": med["bckd_soft"], "ratio_soft": med["bckd_soft"] / med["kd"]}
    if "bckd_stride4" in med:
        out.update(bckd_stride4_ms=med["bckd_stride4"],
                   ratio_stride4=med["bckd_stride4"] / med["kd"])
    return out


def peak_memory_child(args) -> None:
    """Run in a fresh process: a few steps of one configuration, print the peak in MiB."""
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    method, options = json.loads(args.child)
    step = make_step(method, options, device, args.batch, args.size, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _own_peak_rss_mib()
    print(json.dumps({"peak_mib": peak}))


def _own_peak_rss_mib() -> float:
    """This process's peak resident set, MiB.

    ``VmHWM`` belongs to the address space made at exec, so it is this child's own. ``ru_maxrss``
    is not: Linux carries it across fork + exec, so it starts at the parent's resident set (here
    the timing phase's, up to ~900 MiB) and hid the context term's memory behind it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(args, method: str, options: dict) -> float:
    cmd = [sys.executable, __file__, "--child", json.dumps([method, options]), "--device",
           args.device, "--amp", args.amp, "--batch", str(args.batch), "--size", str(args.size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--stride4-time", action="store_true",
                    help="also time a BCKD step at feature stride 4 (the ablation's variant)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return peak_memory_child(args)
    timing = time_steps(args)
    print(f"step time ({timing['device']}, amp {timing['amp']}, {timing['threads']} threads, "
          f"batch {args.batch}, {args.size}²): KD {timing['kd_ms']:.1f} ms, "
          f"BCKD {timing['bckd_ms']:.1f} ms -> ratio {timing['ratio']:.3f} (target <= 1.25); "
          f"with the soft teacher boundary {timing['bckd_soft_ms']:.1f} ms -> "
          f"{timing['ratio_soft']:.3f}")
    if "ratio_stride4" in timing:
        print(f"BCKD at feature stride 4: {timing['bckd_stride4_ms']:.1f} ms -> ratio "
              f"{timing['ratio_stride4']:.3f} to KD")
    context_only = {"boundary_weight": 0.0}
    base = peak_memory(args, "kd", {})
    s8 = peak_memory(args, "bckd", {"bckd": dict(context_only, feature_stride=8)})
    s4 = peak_memory(args, "bckd", {"bckd": dict(context_only, feature_stride=4)})
    print(f"peak memory: KD step {base:.0f} MiB, context stride 8 {s8:.0f} MiB, stride 4 "
          f"{s4:.0f} MiB -> ratio {s4 / s8:.3f} (target <= 2.5); above the KD step: "
          f"{s8 - base:.0f} vs {s4 - base:.0f} MiB")
    print(json.dumps({**timing, "peak_kd_mib": base, "peak_stride8_mib": s8,
                      "peak_stride4_mib": s4, "memory_ratio": s4 / s8}))


if __name__ == "__main__":
    main()
