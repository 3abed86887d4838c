"""Remote targets over ssh, against a real OpenSSH server on 127.0.0.1 (tests/sshd.py).

The server runs as an unprivileged user with a throwaway key; the tests skip, with the reason,
only where it cannot start. The board's Python is this test run's Python, so the same runtimes
give the same numbers on both sides.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import BckdError

sys.path.insert(0, str(Path(__file__).parent))
from sshd import SshServer, Unavailable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bckd(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("bckd: error: "), proc.stderr
    for w in words:
        assert w.lower() in line.lower(), line
    return line


def start_server(root: Path) -> SshServer:
    try:
        return SshServer(root).start()
    except Unavailable as exc:
        pytest.skip(f"no ssh server for the target tests: {exc}")


def add(env: dict, server: SshServer, name: str = "lo", *extra: str,
        workdir: Path | None = None) -> subprocess.CompletedProcess:
    proc = bckd(env, "target", "add", name, f"ssh://{server.user}@127.0.0.1:{server.port}",
                "--python", sys.executable, "--workdir", str(workdir or server.board),
                "--identity", str(server.client_key), "--known-hosts", str(server.known_hosts),
                *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """A running sshd, a registered target 'lo' with bckd installed, and the env to call it."""
    root = tmp_path_factory.mktemp("ssh")
    server = start_server(root)
    env = dict(os.environ, BCKD_CONFIG_DIR=str(root / "config"),
               BCKD_CACHE=str(root / "cache"))
    add(env, server)
    proc = bckd(env, "target", "check", "lo", "--install")
    assert proc.returncode == 0, proc.stderr
    yield server, env
    server.stop()


@pytest.fixture(scope="module")
def quick_run(board, tmp_path_factory):
    """A local quick run (its models and data feed the stage tests; its rows are the reference)."""
    _, env = board
    out = tmp_path_factory.mktemp("local") / "run"
    proc = bckd(env, "run", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


# -- registry ----------------------------------------------------------------------------------
def test_target_add_refuses_bad_urls_secrets_and_overwrite(tmp_path):
    env = dict(os.environ, BCKD_CONFIG_DIR=str(tmp_path))
    one_error_line(bckd(env, "target", "add", "a", "http://me@host"), "ssh://user@host")
    one_error_line(bckd(env, "target", "add", "a", "ssh://me:pw@host"), "password")
    one_error_line(bckd(env, "target", "add", "a", "ssh://host"), "user")
    one_error_line(bckd(env, "target", "add", "a b", "ssh://me@host"), "name")
    one_error_line(bckd(env, "target", "add", "a", "ssh://me@host:99999"), "port")
    assert bckd(env, "target", "add", "a", "ssh://me@host:2222").returncode == 0
    one_error_line(bckd(env, "target", "add", "a", "ssh://me@other"), "exists", "--force")
    saved = json.loads((tmp_path / "targets.json").read_text())["targets"]["a"]
    assert saved["host"] == "host" and saved["port"] == 2222 and "pw" not in json.dumps(saved)
    assert bckd(env, "target", "add", "a", "ssh://me@other", "--force").returncode == 0
    assert "other" in bckd(env, "target", "list").stdout
    assert bckd(env, "target", "remove", "a").returncode == 0
    one_error_line(bckd(env, "target", "check", "a"), "no target named 'a'")


def test_plan_rewrites_paths_and_refuses_checkpoints(tmp_path):
    from runtime.remote.stages import plan_command

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    (tmp_path / "m.onnx.card.json").write_text("{}")
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    (data / "val" / "a.png").write_bytes(b"png")
    plan = plan_command("eval", [str(model), "--data", str(data), "--out",
                                 str(tmp_path / "r.json"), "--batch=2", "--target", "lo"])
    assert plan.argv == ["eval", "@upload0", "--data", "@upload1", "--out", "out/r.json",
                         "--batch", "2"]
    assert set(plan.uploads[0][1]) == {"m.onnx", "m.onnx.card.json"}
    assert set(plan.uploads[1][1]) == {"val/a.png"}
    with pytest.raises(BckdError, match="needs torch and runs on the host"):
        plan_command("export", [str(tmp_path / "s.pt"), "--out", "x.onnx"])
    with pytest.raises(BckdError, match="spell each option out in full"):
        plan_command("eval", [str(model), "--dat", str(data)])


# -- check, install, stages --------------------------------------------------------------------
def test_check_reports_the_board(board):
    _, env = board
    proc = bckd(env, "target", "check", "lo", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    from runtime.remote.ssh import host_build

    assert info["bckd"]["build"] == host_build()
    assert info["packages"]["onnxruntime"] and info["python"]
    table = bckd(env, "target", "check", "lo").stdout
    assert "same as this host" in table and "onnxruntime" in table and "trtexec" in table


def test_stages_on_the_target_match_local(board, quick_run, tmp_path):
    _, env = board
    model, data = quick_run / "onnx" / "student-bckd.onnx", quick_run / "data"
    local = bckd(env, "eval", str(model), "--data", str(data), "--json")
    remote = bckd(env, "eval", str(model), "--data", str(data), "--json", "--target", "lo",
                  "--out", str(tmp_path / "eval.json"), "--save-predictions",
                  str(tmp_path / "preds"))
    assert remote.returncode == 0, remote.stderr
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"]
    assert json.loads((tmp_path / "eval.json").read_text())["miou"] == a["miou"]
    assert any((tmp_path / "preds").iterdir())
    assert str(model) in remote.stdout  # the board's paths are shown as the user's
    prof = bckd(env, "profile", str(model), "--target", "lo", "--iters", "20",
                "--min-seconds", "0.2", "--out", str(tmp_path / "p.json"))
    assert prof.returncode == 0, prof.stderr
    assert json.loads((tmp_path / "p.json").read_text())["latency_ms"]["p50"] > 0
    one_error_line(bckd(env, "profile", str(model), "--target", "lo", "--out",
                        str(tmp_path / "p.json")), "exists")
    xml = tmp_path / "ir" / "m.xml"
    exp = bckd(env, "export", str(model), "--out", str(xml), "--target", "lo")
    assert exp.returncode == 0, exp.stderr
    assert {p.name for p in xml.parent.iterdir()} == {"m.xml", "m.bin", "m.xml.card.json"}
    cal = bckd(env, "calib", str(model), "--data", str(data), "--images", "8", "--out",
               str(tmp_path / "m.int8.onnx"), "--target", "lo")
    assert cal.returncode == 0, cal.stderr
    assert (tmp_path / "m.int8.onnx").is_file() and (tmp_path / "m.int8.onnx.card.json").is_file()


def test_run_quick_on_the_target_gives_the_local_rows(board, quick_run, tmp_path):
    _, env = board
    out = tmp_path / "remote"
    proc = bckd(env, "run", "--quick", "--target", "lo", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    remote = json.loads((out / "report.json").read_text())
    local = json.loads((quick_run / "report.json").read_text())
    key = ("model", "method", "backend", "precision")
    assert [tuple(r[k] for k in key) for r in remote["results"]] == \
        [tuple(r[k] for k in key) for r in local["results"]]
    for r, l in zip(remote["results"], local["results"]):
        assert (r["miou"], r["boundary_f"], r["lhd"]) == (l["miou"], l["boundary_f"], l["lhd"])
        assert r["measured_on"]["where"] == "target" and r["measured_on"]["target"] == "lo"
        assert l["measured_on"]["where"] == "host"
    assert remote["target"]["name"] == "lo" and remote["target"]["objects_sent"] > 0
    for rel in ("openvino/student-bckd.xml", "openvino/student-bckd.bin",
                "int8/student-bckd.int8.onnx.card.json"):
        assert (out / rel).is_file(), rel
    assert "measured on" in (out / "report.md").read_text()
    # a second run with unchanged inputs: students and exports come from the cache, byte for
    # byte, and the board has every file already
    proc = bckd(env, "run", "--quick", "--target", "lo", "--out", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    second = json.loads((tmp_path / "again" / "report.json").read_text())["target"]
    assert second["bytes_sent"] == 0 and second["objects_sent"] == 0, second


def test_unchanged_copies_send_nothing(board, quick_run):
    server, env = board
    from runtime.remote.ssh import Connection
    from runtime.remote.stages import folder_files
    from runtime.remote.targets import get_target

    os.environ["BCKD_CONFIG_DIR"] = env["BCKD_CONFIG_DIR"]
    try:
        conn = Connection(get_target("lo"))
        files = folder_files(quick_run / "data", "dataset")
        first = conn.push_tree(files)
        sent = conn.stats.bytes_sent
        again = conn.push_tree(files)
    finally:
        del os.environ["BCKD_CONFIG_DIR"]
    assert first == again
    assert conn.stats.objects_sent <= len(files)
    assert conn.stats.bytes_sent == sent  # not a byte: the tree is there
    assert conn.stats.objects_skipped >= len(files)


# -- faults ------------------------------------------------------------------------------------
@pytest.fixture
def spare(tmp_path):
    """A second server of the test's own, to break."""
    server = start_server(tmp_path / "s")
    env = dict(os.environ, BCKD_CONFIG_DIR=str(tmp_path / "config"),
               BCKD_CACHE=str(tmp_path / "cache"))
    yield server, env
    server.stop()


def connection(env: dict, name: str = "lo"):
    from runtime.remote.ssh import Connection
    from runtime.remote.targets import get_target

    old = os.environ.get("BCKD_CONFIG_DIR")
    os.environ["BCKD_CONFIG_DIR"] = env["BCKD_CONFIG_DIR"]
    try:
        return Connection(get_target(name))
    finally:
        if old is None:
            del os.environ["BCKD_CONFIG_DIR"]
        else:
            os.environ["BCKD_CONFIG_DIR"] = old


def test_dropped_connection_mid_copy_keeps_only_whole_objects_and_resumes(spare, tmp_path):
    server, env = spare
    add(env, server)
    files = {}
    for i in range(3):
        p = tmp_path / f"blob{i}"
        p.write_bytes(os.urandom(6 << 20))
        files[f"blob{i}"] = p
    conn = connection(env)
    dropped = []

    def cut(n: int) -> None:
        if n > 7 << 20 and not dropped:  # in the second file
            dropped.append(n)
            server.drop_connections()

    with pytest.raises(BckdError, match="dropped|stopped answering|broke off"):
        conn.push_tree(files, chunk_hook=cut)
    objects = server.board / "objects"
    from runtime.remote.ssh import hash_file

    whole = {hash_file(p) for p in files.values()}
    present = {p.name for p in objects.iterdir() if not p.name.startswith(".part")}
    assert present < whole  # the file cut off is not there under its name
    from runtime.remote.agent import sha256_file

    for name in present:  # and what is there is whole
        assert sha256_file(objects / name) == name
    retry = connection(env)
    retry.push_tree(files)
    assert retry.stats.objects_sent == len(whole - present)  # only what was missing
    assert retry.stats.objects_skipped == len(present)
    assert not [p for p in objects.iterdir() if p.name.startswith(".part")]


def test_board_down_wrong_key_and_full_disk(spare, tmp_path):
    server, env = spare
    add(env, server)
    # a wrong host key: the known_hosts entry holds another key
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    bad_known = tmp_path / "bad_known_hosts"
    bad_known.write_text(f"[127.0.0.1]:{server.port} {other.with_suffix('.pub').read_text()}")
    proc = bckd(env, "target", "add", "evil", f"ssh://{server.user}@127.0.0.1:{server.port}",
                "--python", sys.executable, "--identity", str(server.client_key),
                "--known-hosts", str(bad_known), "--accept-new-host-key")
    assert proc.returncode == 0
    one_error_line(bckd(env, "target", "check", "evil"), "host key", "known_hosts")
    # a full disk: a tiny tmpfs as the board's workdir (needs root to mount)
    if os.geteuid() == 0 and shutil.which("mount"):
        tiny = tmp_path / "tiny"
        tiny.mkdir()
        import pwd

        uid = pwd.getpwnam(server.user).pw_uid
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=256k,uid={uid},mode=0755",
                           "tmpfs", str(tiny)], capture_output=True).returncode == 0:
            try:
                add(env, server, "tiny", workdir=tiny)
                line = one_error_line(bckd(env, "target", "check", "tiny", "--install"),
                                      "no space left", "free space")
                assert "tiny" in line
                assert not list((tiny / "objects").iterdir())  # nothing half-copied left
                assert not (tiny / "lib" / "current").exists()
            finally:
                subprocess.run(["umount", str(tiny)], capture_output=True)
    # the board goes down
    server.stop()
    one_error_line(bckd(env, "target", "check", "lo"), "refused")


def test_version_mismatch_missing_runtime_and_timeout(board, quick_run, tmp_path):
    server, env = board
    model = quick_run / "onnx" / "student-bckd.onnx"
    lib = server.board / "lib"
    current = (lib / "current").read_text().strip()
    # the board runs another build
    fake = "f" * 64
    subprocess.run(["cp", "-a", str(lib / current), str(lib / fake)], check=True)
    (lib / "current").write_text(fake + "\n")
    try:
        one_error_line(bckd(env, "profile", str(model), "--target", "lo"),
                       "runs bckd build ffffffffffff", "--install")
    finally:
        (lib / "current").write_text(current + "\n")
        shutil.rmtree(lib / fake)
    # a command past its time on the board is stopped
    one_error_line(bckd(env, "profile", str(model), "--target", "lo", "--min-seconds", "30",
                        "--remote-timeout", "3"), "ran past 3 s")
    # a board without OpenVINO: its python hides the package
    fake_pkgs = tmp_path / "hide"
    (fake_pkgs / "openvino").mkdir(parents=True)
    (fake_pkgs / "openvino" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'openvino'\", name='openvino')\n")
    wrapper = tmp_path / "python-without-openvino"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={fake_pkgs} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    if server.prefix:
        subprocess.run(["chown", "-R", server.user, str(tmp_path)], check=True)
        os.chmod(tmp_path, 0o755)
    proc = bckd(env, "target", "add", "noov", f"ssh://{server.user}@127.0.0.1:{server.port}",
                "--python", str(wrapper), "--workdir", str(server.board),
                "--identity", str(server.client_key), "--known-hosts", str(server.known_hosts))
    assert proc.returncode == 0
    one_error_line(bckd(env, "export", str(model), "--out", str(tmp_path / "m.xml"),
                        "--target", "noov"), "openvino")
    assert not (tmp_path / "m.xml").exists()

