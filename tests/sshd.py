"""A throwaway OpenSSH server on 127.0.0.1 for the remote-target tests.

It listens on the loopback address only, on a free port, accepts one throwaway ed25519 key and
nothing else (no passwords, no root login, no forwarding), and runs as an unprivileged user: the
test user itself, or -- when the tests run as root -- the user ``bckdssh`` (created if missing).
It is killed at the end of the test session and bounded by ``timeout`` in any case.
"""
from __future__ import annotations

import getpass
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SERVER_USER = "bckdssh"
LIFETIME_S = 1800


class Unavailable(Exception):
    """sshd cannot start here (the reason is the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> tuple[str, list[str]]:
    if os.geteuid() != 0:
        return getpass.getuser(), []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        proc = subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", SERVER_USER],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise Unavailable(f"cannot create the unprivileged user {SERVER_USER}: "
                              f"{proc.stderr.strip()}")
    runuser = shutil.which("runuser") or shutil.which("setpriv")
    if not runuser:
        raise Unavailable("neither runuser nor setpriv is installed to drop root for sshd")
    if runuser.endswith("runuser"):
        return SERVER_USER, [runuser, "-u", SERVER_USER, "--"]
    pw = pwd.getpwnam(SERVER_USER)
    return SERVER_USER, [runuser, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                         "--init-groups", "--"]


def grant_traverse(user: str, paths: list[Path]) -> None:
    """Let ``user`` reach ``paths`` (the Python that serves as the board's): an ACL entry
    'u:USER:x' on each folder above them that others cannot enter (e.g. /root of a pyenv)."""
    need: set[Path] = set()
    for path in paths:
        for p in [path.resolve(), *path.resolve().parents]:
            if p.is_dir() and not os.stat(p).st_mode & 0o001:
                need.add(p)
    if not need:
        return
    setfacl = shutil.which("setfacl")
    if not setfacl:
        raise Unavailable(f"{user} cannot reach this Python ({', '.join(map(str, sorted(need)))} "
                          "closed to others) and setfacl is missing: apt-get install acl")
    for p in sorted(need):
        subprocess.run([setfacl, "-m", f"u:{user}:x", str(p)], check=True, capture_output=True)


class SshServer:
    def __init__(self, root: Path) -> None:
        if not os.path.exists(SSHD) or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
            raise Unavailable("OpenSSH (sshd, ssh, ssh-keygen) is not installed: "
                              "apt-get install openssh-server openssh-client")
        self.root = root
        self.user, self.prefix = _server_user()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        srv = root / "server"
        srv.mkdir(parents=True)
        self.board = root / "board"  # the target's workdir lives here
        self.board.mkdir()
        self.host_key = srv / "host_key"
        self.client_key = root / "client_key"
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bckd-test",
                            "-f", str(key)], check=True, capture_output=True)
        (srv / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {self.host_key.with_suffix('.pub').read_text()}")
        self.config = srv / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {srv / 'sshd.pid'}", f"AuthorizedKeysFile {srv / 'authorized_keys'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "PermitRootLogin no",
            f"AllowUsers {self.user}", "StrictModes no", "AllowTcpForwarding no",
            "AllowAgentForwarding no", "X11Forwarding no", "PermitTunnel no",
            "MaxSessions 64", "MaxStartups 64", "LogLevel ERROR", ""]))
        if self.prefix:
            subprocess.run(["chown", "-R", self.user, str(srv), str(self.board)], check=True)
            os.chmod(root, 0o755)
            grant_traverse(self.user, [root, Path(sys.executable), Path(sys.prefix),
                                       Path(sys.base_prefix)])

    def start(self) -> "SshServer":
        self.log = open(self.root / "sshd.log", "wb")
        self.proc = subprocess.Popen(
            [*self.prefix, "timeout", str(LIFETIME_S), SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"sshd exited at once: {self.log_text()[-300:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise Unavailable("sshd did not listen within 15 s")

    def log_text(self) -> str:
        try:
            return (self.root / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""

    def listener(self) -> int | None:
        try:
            return int((self.config.parent / "sshd.pid").read_text())
        except (OSError, ValueError):
            return None

    def descendants(self) -> list[int]:
        """Every process under the listener: sessions and the commands they run."""
        out, todo = [], [self.listener() or 0]
        while todo:
            pid = todo.pop()
            kids = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]
            out += kids
            todo += kids
        return out

    def drop_connections(self) -> None:
        """Kill every session and what it runs, as a board that loses power would."""
        for pid in self.descendants():
            try:
                os.kill(pid, 9)
            except OSError:
                pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.drop_connections()
            main = self.listener()
            if main:
                try:
                    os.kill(main, 15)
                except OSError:
                    pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "log", None):
            self.log.close()
