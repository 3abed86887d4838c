"""A connection to a target through the system ``ssh`` (OpenSSH), and content-addressed copies.

Nothing here opens a socket: every byte goes through ``ssh`` with ``BatchMode`` (no password
prompt), strict host-key checking, connect and keep-alive timeouts, and one multiplexed master
connection per target (``ControlMaster``) so that each step costs a round trip, not a handshake.
On the board the standard-library :mod:`runtime.remote.agent` does the work: it receives files
by their sha256, checks them and renames them into place, so a broken copy never looks whole and
a rerun sends only what is missing. Every failure of ssh itself becomes one line saying what
happened and what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

from runtime.errors import BckdError
from runtime.files import sha256_file, sha256_json
from runtime.remote import agent as agent_module
from runtime.remote.targets import Target

AGENT_SOURCE = Path(agent_module.__file__).read_bytes()
AGENT_HASH = hashlib.sha256(AGENT_SOURCE).hexdigest()[:16]
RC_AGENT_MISSING = 97
RC_SSH = 255

# Runs the agent if this version of it is on the board, else exits 97 (then it is copied there).
_BOOT = ("import os,sys\n"
         "w=os.path.expanduser(sys.argv[1]);p=os.path.join(w,'agent-'+sys.argv[2]+'.py')\n"
         "if not os.path.isfile(p):sys.exit(97)\n"
         "sys.argv=[p,w]+sys.argv[3:]\n"
         "exec(compile(open(p,'rb').read(),p,'exec'),{'__name__':'__main__'})")
_PUT_AGENT = ("import os,sys\n"
              "w=os.path.expanduser(sys.argv[1]);os.makedirs(w,exist_ok=True)\n"
              "p=os.path.join(w,'agent-'+sys.argv[2]+'.py');t=p+'.part-%d'%os.getpid()\n"
              "d=sys.stdin.buffer.read()\n"
              "f=open(t,'wb');f.write(d);f.close();os.replace(t,p)")

CONNECT_TIMEOUT_S = 10
CALL_TIMEOUT_S = 120.0


@dataclass
class Stats:
    """Bytes this host sent to and received from the target, and the objects it sent."""
    bytes_sent: int = 0
    bytes_received: int = 0
    objects_sent: int = 0
    objects_skipped: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def control_dir() -> Path:
    """A private folder for the ssh master sockets (short: a socket path has ~100 bytes)."""
    d = Path(tempfile.gettempdir()) / f"bckd-ssh-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise BckdError(f"{d} is not a private folder of this user; remove it and rerun")
    return d


class Connection:
    """ssh to one :class:`Target`, running its agent; counts the bytes in :attr:`stats`."""

    def __init__(self, target: Target, *, multiplex: bool = True) -> None:
        self.target = target
        self.multiplex = multiplex
        self.stats = Stats()
        self._agent_ready = False
        self._info: dict | None = None

    # -- ssh -----------------------------------------------------------------------------------
    def ssh_argv(self, remote: Sequence[str]) -> list[str]:
        t = self.target
        argv = ["ssh", "-p", str(t.port), "-T"]
        for opt in t.ssh_options:  # the user's options first: ssh keeps the first value given
            argv += ["-o", opt]
        if t.identity:
            argv += ["-i", t.identity, "-o", "IdentitiesOnly=yes"]
        if t.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={t.known_hosts}"]
        argv += ["-o", "BatchMode=yes",
                 "-o", f"StrictHostKeyChecking={'accept-new' if t.accept_new_host_key else 'yes'}",
                 "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                 "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                 "-o", "LogLevel=ERROR"]
        if self.multiplex:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir()}/%C",
                     "-o", "ControlPersist=60"]
        argv += [f"{t.user}@{t.host}", "--", " ".join(shlex.quote(a) for a in remote)]
        return argv

    def ssh_error(self, stderr: str, rc: int) -> BckdError:
        """The one line for a failure of ssh itself (exit 255) or of the board's shell."""
        t = self.target
        where = f"target '{t.name}' ({t.user}@{t.host}:{t.port})"
        text = stderr.strip()
        last = text.splitlines()[-1] if text else f"exit status {rc}"
        low = text.lower()
        if "remote host identification has changed" in low or \
                ("host key" in low and "verification failed" in low and "mismatch" in low):
            msg = (f"the host key of {where} does not match the one in known_hosts: if the board "
                   f"was reinstalled, check its new key and replace the old one (ssh-keygen -R "
                   f"'[{t.host}]:{t.port}'); bckd does not talk to a host it cannot verify")
        elif "host key verification failed" in low or "no matching host key" in low:
            msg = (f"the host key of {where} is not known or does not match known_hosts"
                   f"{' ' + t.known_hosts if t.known_hosts else ''}: connect once with ssh and "
                   f"check the key, or re-add the target with --accept-new-host-key "
                   f"(a key that changed is never accepted)")
        elif rc in (126, 127):
            msg = (f"{where} cannot run its Python '{t.python}' ({last}): install python3 "
                   f"there or re-add the target with --python PATH")
        elif "permission denied" in low:
            msg = (f"{where} refused the login ({last}): install your public key there "
                   f"(ssh-copy-id -p {t.port} {t.user}@{t.host}) or pass --identity")
        elif "could not resolve hostname" in low:
            msg = f"cannot resolve the host of {where}: {last}"
        elif "connection refused" in low:
            msg = (f"nothing accepts ssh connections at {where} (connection refused): is the "
                   f"board up and sshd running?")
        elif "timed out" in low and "connect" in low:
            msg = f"cannot reach {where}: the connection timed out after {CONNECT_TIMEOUT_S} s"
        elif "no space left on device" in low:
            msg = (f"the disk of {where} is full ({last}); free space under "
                   f"{t.workdir} and rerun")
        else:
            msg = (f"the connection to {where} dropped or failed ({last}); rerun: what was "
                   f"copied whole stays on the board and is not sent again")
        return BckdError(msg)

    def _run(self, remote: Sequence[str], *, input: bytes | None = None,
             timeout: float = CALL_TIMEOUT_S) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(self.ssh_argv(remote), input=input, capture_output=True,
                                  timeout=timeout, stdin=None if input is not None else
                                  subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BckdError(f"target '{self.target.name}' did not answer within {timeout:g} s; "
                            f"check the connection and rerun") from None
        except FileNotFoundError:
            raise BckdError("the ssh client is not installed on this host: install OpenSSH "
                            "(apt-get install openssh-client)") from None
        if input:
            self.stats.bytes_sent += len(input)
        self.stats.bytes_received += len(proc.stdout)
        return proc

    # -- the agent -----------------------------------------------------------------------------
    def agent_argv(self, command: str, *args: str) -> list[str]:
        return [self.target.python, "-c", _BOOT, self.target.workdir, AGENT_HASH, command, *args]

    def ensure_agent(self) -> None:
        """Copy this version of the agent to the board if it is not there."""
        if self._agent_ready:
            return
        proc = self._run(self.agent_argv("scrub"))
        if proc.returncode == RC_AGENT_MISSING:
            put = self._run([self.target.python, "-c", _PUT_AGENT, self.target.workdir,
                             AGENT_HASH], input=AGENT_SOURCE)
            self._check(put)
            proc = self._run(self.agent_argv("scrub"))
        self._check(proc)
        self._agent_ready = True

    def _check(self, proc: subprocess.CompletedProcess) -> None:
        if proc.returncode:
            raise self.agent_error(proc.stderr.decode(errors="replace"), proc.returncode)

    def agent_error(self, stderr: str, rc: int) -> BckdError:
        t = self.target
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        said = next((ln.split("bckd-agent: ", 1)[1] for ln in reversed(lines)
                     if "bckd-agent: " in ln), None)
        if rc == agent_module.RC_NOSPACE and said:
            return BckdError(f"target '{t.name}': {said}; free space there and rerun (what was "
                             f"copied whole is kept)")
        if rc == agent_module.RC_MISMATCH and said:
            return BckdError(f"target '{t.name}': {said}, not this host's {host_build()[:12]}: "
                             f"run 'bckd target check {t.name} --install' to update it")
        if rc == agent_module.RC_NOBCKD:
            return BckdError(f"target '{t.name}' has no bckd installed: run 'bckd target check "
                             f"{t.name} --install'")
        if rc == agent_module.RC_TIMEOUT and said:
            return BckdError(f"target '{t.name}': {said}; raise --remote-timeout or check the "
                             f"board")
        if said:
            return BckdError(f"target '{t.name}': {said}")
        return self.ssh_error(stderr, rc)

    def call(self, command: str, *args: str, input: bytes | None = None,
             timeout: float = CALL_TIMEOUT_S) -> bytes:
        """Run one agent command; its stdout, or one clear line on failure."""
        self.ensure_agent()
        proc = self._run(self.agent_argv(command, *args), input=input, timeout=timeout)
        self._check(proc)
        return proc.stdout

    def info(self, fresh: bool = False) -> dict:
        """What the board has (``agent info``), asked once per connection unless ``fresh``."""
        if fresh or self._info is None:
            self._info = json.loads(self.call("info"))
        return self._info

    # -- copies --------------------------------------------------------------------------------
    def push_objects(self, files: Mapping[str, Path], *,
                     chunk_hook: Callable[[int], None] | None = None) -> int:
        """Send the files (sha256 -> path) the board does not have; returns the bytes sent.

        Each object lands whole or not at all, so after a broken copy a rerun sends the rest.
        ``chunk_hook(bytes_so_far)`` is called after each block written (progress, tests).
        """
        if not files:
            return 0
        wanted = "".join(f"{h}\n" for h in sorted(files)).encode()
        missing = [h for h in self.call("missing", input=wanted).decode().split() if h]
        self.stats.objects_skipped += len(files) - len(missing)
        if not missing:
            return 0
        argv = self.ssh_argv(self.agent_argv("put"))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        counter = _Counter(proc.stdin, chunk_hook)
        err: list[bytes] = []
        out: list[bytes] = []
        readers = [threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True),
                   threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)]
        for r in readers:
            r.start()
        broken = False
        try:
            with tarfile.open(fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for h in missing:
                    path = files[h]
                    info = tarfile.TarInfo(h)
                    info.size = path.stat().st_size
                    info.mode = 0o644
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
        except (OSError, ValueError):  # the pipe broke: ssh or the board went away
            broken = True
        try:
            proc.stdin.close()
        except OSError:
            broken = True
        try:
            proc.wait(timeout=CALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BckdError(f"target '{self.target.name}' stopped answering during a copy; "
                            f"rerun to send the rest") from None
        for r in readers:
            r.join(timeout=5)
        self.stats.bytes_sent += counter.n
        stderr = b"".join(err).decode(errors="replace")
        if broken or proc.returncode != 0:
            raise self.agent_error(stderr, proc.returncode if proc.returncode else RC_SSH)
        self.stats.objects_sent += len(missing)
        return counter.n

    def push_tree(self, files: Mapping[str, Path],
                  chunk_hook: Callable[[int], None] | None = None) -> str:
        """Make the folder {relative path: local file} exist on the board; returns its path.

        It is addressed by the hash of its manifest, so an unchanged folder costs one small
        call and sends no byte.
        """
        manifest = {rel: hash_file(path) for rel, path in sorted(files.items())}
        tree = sha256_json(manifest)
        there = self.call("tree", tree, "--check").decode().strip()
        if there:
            self.stats.objects_skipped += len(set(manifest.values()))
            return there
        self.push_objects({h: files[rel] for rel, h in manifest.items()}, chunk_hook=chunk_hook)
        return self.call("tree", tree, input=json.dumps(manifest).encode()).decode().strip()

    def fetch_job(self, job: str, dest: Path) -> list[Path]:
        """Bring the board's ``jobs/JOB/out`` into the local folder ``dest`` (which must exist)."""
        self.ensure_agent()
        proc = subprocess.Popen(self.ssh_argv(self.agent_argv("pack", job)),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        counter = _Counter(proc.stdout)
        err: list[bytes] = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
        reader.start()
        got: list[Path] = []
        try:
            with tarfile.open(fileobj=counter, mode="r|") as tar:
                for member in tar:
                    rel = member.name
                    if not member.isfile() or rel.startswith("/") or ".." in rel.split("/"):
                        raise BckdError(f"target '{self.target.name}' sent an unsafe file "
                                        f"name '{rel[:80]}'; nothing was kept")
                    out = dest / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    with open(out, "wb") as f:
                        while block := src.read(1 << 20):
                            f.write(block)
                    got.append(out)
        except tarfile.ReadError:
            pass  # the exit status below says why
        proc.wait(timeout=CALL_TIMEOUT_S)
        reader.join(timeout=5)
        self.stats.bytes_received += counter.n
        if proc.returncode != 0:
            raise self.agent_error(b"".join(err).decode(errors="replace"), proc.returncode)
        return got

    def close(self) -> None:
        """Stop the multiplexed master connection, if one runs."""
        if self.multiplex:
            argv = self.ssh_argv(["true"])
            subprocess.run(argv[:-2] + ["-O", "exit", argv[-2]], capture_output=True,
                           timeout=15)


class _Counter:
    """A file-like wrapper that counts the bytes through it."""

    def __init__(self, f: IO[bytes], hook: Callable[[int], None] | None = None) -> None:
        self.f, self.hook, self.n = f, hook, 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.n += len(data)
        if self.hook is not None:
            self.hook(self.n)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.n += len(data)
        return data

    def flush(self) -> None:
        self.f.flush()


_HASHES: dict[tuple[str, int, int], str] = {}


def hash_file(path: Path) -> str:
    """sha256 of a file, remembered for this process by (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def package_root() -> Path:
    """The folder holding bckd's packages (runtime/, calib/, export/, distill/)."""
    return Path(agent_module.__file__).resolve().parents[2]


PACKAGES = ("runtime", "calib", "export", "distill")


def package_files() -> dict[str, Path]:
    """bckd's Python files, by their path inside the wheel."""
    root = package_root()
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[path.relative_to(root).as_posix()] = path
    return out


_BUILD: list[str] = []


def host_build() -> str:
    """This host's bckd build id: the sha256 of its files (the version alone misses edits)."""
    if not _BUILD:
        _BUILD.append(sha256_json({rel: hash_file(p) for rel, p in package_files().items()}))
    return _BUILD[0]


def stream_remote(argv: list[str], *, timeout: float, rewrite: Mapping[str, str],
                  out: IO[str] | None = None, err: IO[str] | None = None) -> tuple[int, str]:
    """Run an ssh command, passing its stdout and stderr through live with the board's paths
    replaced by the user's; returns (exit status, its stderr)."""
    out = out or sys.stdout
    err = err or sys.stderr
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    kept: list[str] = []

    def pump(src: IO[bytes], dst: IO[str], keep: bool) -> None:
        pending = b""
        while True:
            block = os.read(src.fileno(), 65536)
            if not block:
                break
            pending += block
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
            if cut < 0:
                continue
            text, pending = pending[:cut + 1].decode(errors="replace"), pending[cut + 1:]
            emit(_rewrite(text, rewrite), dst, keep)
        if pending:
            emit(_rewrite(pending.decode(errors="replace"), rewrite), dst, keep)

    def emit(text: str, dst: IO[str], keep: bool) -> None:
        if keep:  # stderr: ssh's and the agent's own lines become bckd's one line instead
            kept.append(text)
            text = "".join(ln for ln in text.splitlines(keepends=True)
                           if not ln.startswith(_QUIET))
        if text:
            dst.write(text)
            dst.flush()

    threads = [threading.Thread(target=pump, args=(proc.stdout, out, False), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, True), daemon=True)]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = agent_module.RC_TIMEOUT
        kept.append(f"bckd-agent: no answer within {timeout:g} s\n")
    for t in threads:
        t.join(timeout=5)
    return rc, "".join(kept)


_QUIET = ("bckd-agent: ", "ssh: ", "client_loop: ", "Connection to ", "Connection closed",
          "kex_exchange_identification", "Host key verification failed", "@@@",
          "Warning: Permanently added", "mux_client_", "Control socket")


def _rewrite(text: str, mapping: Mapping[str, str]) -> str:
    for remote, local in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(remote, local)
    return text
