"""The board side of a bckd target: a standard-library script the host copies to the board.

The host runs it over ssh as ``PYTHON agent-<hash>.py WORKDIR COMMAND [ARGS]``; it never listens
on a socket. Everything it keeps lives under WORKDIR:

* ``objects/<sha256>``: files by content hash, each written to a ``.part`` name, checked against
  its hash and renamed into place, so an interrupted copy never leaves a file that looks complete,
  and a rerun sends only the objects that are missing;
* ``trees/<sha256>/``: a folder (an artifact with its card, a dataset) made of hard links to the
  objects from a manifest, built under a ``.part`` name and renamed when whole;
* ``lib/<build>/``: an installed torch-free bckd (a wheel unpacked), ``lib/current`` names it;
* ``jobs/<id>/``: one remote command's working folder; ``out/`` is what the host brings back.

Exit codes the host reads: 0 ok; 1 the bckd command's own error (its line is on stderr);
:data:`RC_NOSPACE` the board's disk is full; :data:`RC_MISMATCH` the installed bckd is not the
host's; :data:`RC_NOBCKD` no bckd installed; :data:`RC_TIMEOUT` the command ran past its limit;
:data:`RC_BAD` a malformed request.
"""
import errno
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile

RC_BAD, RC_NOSPACE, RC_MISMATCH, RC_NOBCKD, RC_TIMEOUT = 90, 91, 92, 93, 94
CHUNK = 1 << 20


def fail(rc, message):
    sys.stderr.write("bckd-agent: " + message + "\n")
    sys.stderr.flush()
    sys.exit(rc)


def nospace(where, exc):
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    fail(RC_NOSPACE, "no space left on the board's disk under %s (%s; %d bytes free)"
         % (where, exc.strerror or exc, free))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def is_hash(text):
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


class Workdir:
    def __init__(self, root):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.objects = os.path.join(self.root, "objects")
        self.trees = os.path.join(self.root, "trees")
        self.lib = os.path.join(self.root, "lib")
        self.jobs = os.path.join(self.root, "jobs")

    def ensure(self):
        try:
            for d in (self.objects, self.trees, self.lib, self.jobs):
                os.makedirs(d, exist_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                nospace(self.root, exc)
            raise

    def current_build(self):
        try:
            with open(os.path.join(self.lib, "current")) as f:
                build = f.read().strip()
        except OSError:
            return None
        return build if os.path.isdir(os.path.join(self.lib, build)) else None


# -- commands --------------------------------------------------------------------------------
def cmd_info(wd, args):
    """What the board has, as one JSON object on stdout."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except Exception:
            return None

    build = wd.current_build()
    bckd = None
    if build:
        try:
            with open(os.path.join(wd.lib, build, "BCKD_BUILD.json")) as f:
                bckd = json.load(f)
        except (OSError, ValueError):
            bckd = {"build": build}
    trtexec = shutil.which("trtexec")
    for candidate in ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec"):
        if not trtexec and os.access(candidate, os.X_OK):
            trtexec = candidate
    gpus = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    model = None
    try:
        with open("/proc/device-tree/model", "rb") as f:
            model = f.read().rstrip(b"\0").decode(errors="replace")
    except OSError:
        pass
    l4t = None
    try:
        with open("/etc/nv_tegra_release") as f:
            l4t = f.readline().strip()
    except OSError:
        pass
    dla = sorted(n for n in os.listdir("/dev") if n.startswith("nvhost-nvdla")) \
        if os.path.isdir("/dev") else []
    try:
        free = shutil.disk_usage(wd.root).free
    except OSError:
        free = None
    info = {
        "hostname": platform.node(), "machine": platform.machine(), "system": platform.system(),
        "python": platform.python_version(), "python_executable": sys.executable,
        "cpu_count": os.cpu_count(), "workdir": wd.root, "free_bytes": free,
        "bckd": bckd,
        "packages": {name: version(name) for name in (
            "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt",
            "pycuda", "cuda-python", "pycocotools", "faster-coco-eval", "jetson-stats")},
        "trtexec": trtexec, "tegrastats": shutil.which("tegrastats"),
        "gpus": gpus, "dla_cores": len(dla), "device_model": model, "l4t": l4t,
    }
    json.dump(info, sys.stdout)
    sys.stdout.write("\n")


def cmd_missing(wd, args):
    """stdin: object hashes, one a line; stdout: those the board does not have."""
    for line in sys.stdin:
        h = line.strip()
        if not is_hash(h):
            fail(RC_BAD, "not a sha256: %r" % h[:80])
        if not os.path.isfile(os.path.join(wd.objects, h)):
            sys.stdout.write(h + "\n")


def cmd_put(wd, args):
    """stdin: a tar stream whose members are named by their sha256; each lands whole or not."""
    count = 0
    try:
        with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or not is_hash(name):
                    fail(RC_BAD, "unexpected tar member %r" % name[:80])
                final = os.path.join(wd.objects, name)
                part = os.path.join(wd.objects, ".part-%s-%d" % (name, os.getpid()))
                src = tar.extractfile(member)
                h = hashlib.sha256()
                try:
                    with open(part, "wb") as f:
                        for block in iter(lambda: src.read(CHUNK), b""):
                            h.update(block)
                            f.write(block)
                        f.flush()
                        os.fsync(f.fileno())
                    if h.hexdigest() != name:
                        fail(RC_BAD, "object %s arrived with another hash" % name[:12])
                    os.chmod(part, 0o444)  # trees hard-link it: nothing may write through
                    os.replace(part, final)
                finally:
                    if os.path.exists(part):
                        os.unlink(part)
                count += 1
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            nospace(wd.objects, exc)
        raise
    except tarfile.ReadError as exc:
        fail(RC_BAD, "the copy stream broke off (%s); rerun to send the rest" % exc)
    sys.stdout.write("%d\n" % count)


def _safe_rel(rel):
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        fail(RC_BAD, "unsafe path in manifest: %r" % rel[:80])
    return os.path.join(*parts)


def cmd_tree(wd, args):
    """args: TREEHASH [--check]; stdin: manifest JSON {relative path: sha256}. Prints the
    tree's path; with --check only when it exists already."""
    tree = args[0]
    if not is_hash(tree):
        fail(RC_BAD, "not a sha256: %r" % tree[:80])
    final = os.path.join(wd.trees, tree)
    if args[1:] == ["--check"]:  # is it there already? (then nothing needs sending)
        if os.path.isdir(final):
            sys.stdout.write(final + "\n")
        return
    manifest = json.load(sys.stdin)
    if not os.path.isdir(final):
        part = os.path.join(wd.trees, ".part-%s-%d" % (tree, os.getpid()))
        remove_tree(part)
        try:
            for rel, h in sorted(manifest.items()):
                src = os.path.join(wd.objects, h)
                if not is_hash(h) or not os.path.isfile(src):
                    fail(RC_BAD, "object %s of %s is not on the board" % (h[:12], rel))
                dst = os.path.join(part, _safe_rel(rel))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            os.makedirs(part, exist_ok=True)
            os.replace(part, final)
        except OSError as exc:
            remove_tree(part)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                nospace(wd.trees, exc)
            if not os.path.isdir(final):  # another process may have won the rename
                raise
        finally:
            if os.path.isdir(part):
                remove_tree(part)
    sys.stdout.write(final + "\n")


def cmd_install(wd, args):
    """args: WHEEL_SHA BUILD VERSION: unpack the wheel into lib/BUILD and make it current."""
    wheel, build, version = args[:3]
    src = os.path.join(wd.objects, wheel)
    if not is_hash(wheel) or not os.path.isfile(src):
        fail(RC_BAD, "the wheel %s is not on the board" % wheel[:12])
    final = os.path.join(wd.lib, build)
    try:
        if not os.path.isdir(final):
            part = os.path.join(wd.lib, ".part-%s-%d" % (build, os.getpid()))
            remove_tree(part)
            try:
                with zipfile.ZipFile(src) as z:
                    for name in z.namelist():
                        _safe_rel(name.rstrip("/"))
                    z.extractall(part)
                with open(os.path.join(part, "BCKD_BUILD.json"), "w") as f:
                    json.dump({"build": build, "version": version, "wheel": wheel,
                               "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                              f)
                os.replace(part, final)
            finally:
                remove_tree(part)
        tmp = os.path.join(wd.lib, ".current-%d" % os.getpid())
        with open(tmp, "w") as f:
            f.write(build + "\n")
        os.replace(tmp, os.path.join(wd.lib, "current"))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            nospace(wd.lib, exc)
        raise
    sys.stdout.write(final + "\n")


def cmd_exec(wd, args):
    """args: JOB BUILD TIMEOUT -- bckd arguments. Runs ``python -m runtime.cli`` in jobs/JOB.

    Refuses when the installed bckd is not BUILD; kills the command after TIMEOUT seconds.
    """
    job, build, timeout = args[0], args[1], float(args[2])
    argv = args[4:] if len(args) > 3 and args[3] == "--" else args[3:]
    current = wd.current_build()
    if current is None:
        fail(RC_NOBCKD, "no bckd is installed under %s" % wd.lib)
    if build != "-" and current != build:
        fail(RC_MISMATCH, "the board runs bckd build %s" % current[:12])
    jobdir = os.path.join(wd.jobs, job)
    try:
        os.makedirs(os.path.join(jobdir, "out"), exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            nospace(wd.jobs, exc)
        raise
    env = dict(os.environ)
    lib = os.path.join(wd.lib, current)
    env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("BCKD_CACHE", os.path.join(wd.root, "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli"] + argv, cwd=jobdir, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    # The host going away closes our stdout: the command must not outlive it.
    signal.signal(signal.SIGHUP, lambda *a: _kill(proc))
    signal.signal(signal.SIGTERM, lambda *a: _kill(proc))
    while True:
        try:
            rc = proc.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                _kill(proc)
                fail(RC_TIMEOUT, "the command ran past %g s and was stopped" % timeout)
    sys.exit(rc)


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def cmd_pack(wd, args):
    """args: JOB: jobs/JOB/out as a tar stream on stdout (what the host brings back)."""
    out = os.path.join(wd.jobs, args[0], "out")
    if not os.path.isdir(out):
        fail(RC_BAD, "no job %s on the board" % args[0][:40])
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as tar:
        for base, dirs, files in os.walk(out):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(base, name)
                if os.path.islink(path):
                    continue
                tar.add(path, arcname=os.path.relpath(path, out), recursive=False)
    sys.stdout.buffer.flush()


def cmd_clean(wd, args):
    """args: JOB: remove its working folder."""
    remove_tree(os.path.join(wd.jobs, args[0]))


def cmd_scrub(wd, args):
    """Remove leftovers of interrupted copies (``.part`` names whose writer is gone)."""
    n = 0
    for d in (wd.objects, wd.trees, wd.lib):
        for name in os.listdir(d):
            if name.startswith(".part-") and not _alive(name.rsplit("-", 1)[-1]):
                path = os.path.join(d, name)
                if os.path.isdir(path):
                    remove_tree(path)
                else:
                    os.unlink(path)
                n += 1
    sys.stdout.write("%d\n" % n)


def _alive(pid):
    """Whether the process that wrote a .part name still runs (then it is not a leftover)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) writes no more
        with open("/proc/%d/stat" % int(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


COMMANDS = {"info": cmd_info, "missing": cmd_missing, "put": cmd_put, "tree": cmd_tree,
            "install": cmd_install, "exec": cmd_exec, "pack": cmd_pack, "clean": cmd_clean,
            "scrub": cmd_scrub}


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        fail(RC_BAD, "usage: agent.py WORKDIR {%s} ..." % ",".join(sorted(COMMANDS)))
    wd = Workdir(argv[0])
    wd.ensure()
    COMMANDS[argv[1]](wd, argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
