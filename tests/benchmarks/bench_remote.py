"""Remote-target numbers (issue 13), against a loopback board: an OpenSSH server on 127.0.0.1.

The board is this machine reached over ssh (tests/sshd.py: a throwaway key, an unprivileged
user), with this Python, so local and remote figures come from the same runtimes and CPU:

1. **Same rows, time.** ``bckd run --quick`` locally and ``bckd run --quick --target loopback``,
   ``--rounds`` pairs, the order swapped every round, one warm teacher cache shared by both (the
   first, untimed local run fills it). Every row's metric fields must be identical (bit for bit
   in the JSON); the time figure is the median of the per-pair ratios remote / local.
2. **Copies.** The bytes this host sent in each remote run (counted on the stream into ssh: the
   file objects, manifests and hash lists, not ssh's own framing), and for a second identical
   stage command (``bckd profile --target``) on an unchanged artifact.
3. **Remote profile overhead.** ``bckd profile M --json`` run on the board by hand (through ssh,
   as a user logged in there would) vs ``bckd profile M --target loopback --json``, ``--rounds``
   pairs, order swapped: the median of the per-pair p50 ratios minus one.

Run on an idle machine (2 cores here: both sides share them)::

    python tests/benchmarks/bench_remote.py --out tests/benchmarks/results/remote-loopback.json

Prints and writes one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sshd import SshServer  # noqa: E402

METRICS = ("miou", "pixel_acc", "boundary_f", "boundary_iou", "lhd", "per_class_iou",
           "box_ap", "box_ap50", "mask_ap", "boundary_ap")


def bckd(env: dict, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bckd {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc, wall


def rows_of(run: Path) -> list[dict]:
    return json.loads((run / "report.json").read_text())["results"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-rounds", type=int, default=6)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    server = SshServer(work / "ssh").start()
    env = dict(os.environ, BCKD_CONFIG_DIR=str(work / "config"), BCKD_CACHE=str(work / "cache"))
    try:
        bckd(env, "target", "add", "loopback", f"ssh://{server.user}@127.0.0.1:{server.port}",
             "--python", sys.executable, "--workdir", str(server.board),
             "--identity", str(server.client_key), "--known-hosts", str(server.known_hosts))
        bckd(env, "target", "check", "loopback", "--install")
        reference, first_local = bckd(env, "run", "--quick", "--out", str(work / "warm"))
        local_t, remote_t, ratios, identical, sent = [], [], [], [], []
        for r in range(args.rounds):
            order = ("local", "remote") if r % 2 == 0 else ("remote", "local")
            t: dict[str, float] = {}
            for side in order:
                out = work / f"{side}{r}"
                extra = ["--target", "loopback"] if side == "remote" else []
                _, t[side] = bckd(env, "run", "--quick", "--out", str(out), *extra)
            local_t.append(t["local"])
            remote_t.append(t["remote"])
            ratios.append(t["remote"] / t["local"])
            lrows, rrows = rows_of(work / f"local{r}"), rows_of(work / f"remote{r}")
            same = len(lrows) == len(rrows) and all(
                {k: a.get(k) for k in METRICS} == {k: b.get(k) for k in METRICS}
                for a, b in zip(lrows, rrows))
            identical.append(same)
            target = json.loads((work / f"remote{r}" / "report.json").read_text())["target"]
            sent.append({k: target[k] for k in ("bytes_sent", "objects_sent", "objects_skipped",
                                                "bytes_received")})

        # a stage command twice on an unchanged artifact: the second sends no file
        model = work / "local0" / "onnx" / "student-bckd.onnx"
        from runtime.remote.ssh import Connection
        from runtime.remote.stages import artifact_files
        from runtime.remote.targets import get_target

        os.environ["BCKD_CONFIG_DIR"] = env["BCKD_CONFIG_DIR"]
        conn = Connection(get_target("loopback"))
        conn.push_tree(artifact_files(model))
        before = conn.stats.bytes_sent
        conn.push_tree(artifact_files(model))
        stage_again = conn.stats.bytes_sent - before

        # remote profile vs the same command run on the board by hand
        workdir = server.board
        lib = (workdir / "lib" / "current").read_text().strip()
        tree = conn.push_tree(artifact_files(model))
        by_hand = conn.ssh_argv(["env", f"PYTHONPATH={workdir / 'lib' / lib}", sys.executable,
                                 "-m", "runtime.cli", "profile", f"{tree}/{model.name}",
                                 "--json", "--threads", "1", "--min-seconds", "3"])
        p_hand, p_target, p_ratios = [], [], []
        for r in range(args.profile_rounds):
            order = ("hand", "target") if r % 2 == 0 else ("target", "hand")
            got: dict[str, float] = {}
            for side in order:
                if side == "hand":
                    proc = subprocess.run(by_hand, capture_output=True, text=True, timeout=300)
                    if proc.returncode:
                        sys.exit(f"profile on the board failed: {proc.stderr[-2000:]}")
                else:
                    proc, _ = bckd(env, "profile", str(model), "--target", "loopback", "--json",
                                   "--threads", "1", "--min-seconds", "3")
                got[side] = json.loads(proc.stdout)["latency_ms"]["p50"]
            p_hand.append(got["hand"])
            p_target.append(got["target"])
            p_ratios.append(got["target"] / got["hand"])
        conn.close()
        result = {
            "what": "bckd run --quick, local vs --target loopback (OpenSSH on 127.0.0.1)",
            "command": "python tests/benchmarks/bench_remote.py " + " ".join(
                shlex.quote(a) for a in sys.argv[1:]),
            "rounds": args.rounds,
            "local_seconds": [round(x, 2) for x in local_t],
            "remote_seconds": [round(x, 2) for x in remote_t],
            "remote_over_local_median": round(statistics.median(ratios), 3),
            "rows_identical": identical,
            "first_local_seconds_filling_the_teacher_cache": round(first_local, 1),
            "copies_per_remote_run": sent,
            "second_stage_command_bytes_sent": stage_again,
            "profile_p50_ms_by_hand_on_board": p_hand,
            "profile_p50_ms_through_target": p_target,
            "profile_overhead_median": round(statistics.median(p_ratios) - 1, 4),
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
