"""Stored remote targets: ``bckd target add NAME ssh://user@host[:port]``.

A target is a name for an ssh destination and where bckd lives on it. No secret is stored:
the system ssh authenticates with the user's keys, agent and ``~/.ssh/config``; the file keeps
only paths (an identity file, a known_hosts file) and options. The registry is
``$BCKD_CONFIG_DIR/targets.json`` (default ``~/.config/bckd``), written atomically.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runtime.errors import BckdError
from runtime.files import atomic_write_json

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Target:
    name: str
    user: str
    host: str
    port: int = 22
    python: str = "python3"
    workdir: str = "~/.bckd"
    identity: str | None = None         # ssh -i
    known_hosts: str | None = None      # -o UserKnownHostsFile
    accept_new_host_key: bool = False   # StrictHostKeyChecking=accept-new instead of yes
    ssh_options: list[str] = field(default_factory=list)  # extra -o KEY=VALUE

    @property
    def url(self) -> str:
        port = "" if self.port == 22 else f":{self.port}"
        return f"ssh://{self.user}@{self.host}{port}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_url(url: str) -> tuple[str, str, int]:
    """``ssh://user@host[:port]`` -> (user, host, port); one clear line when it is not that."""
    parts = urlsplit(url)
    usage = f"a target is ssh://user@host[:port], got '{url}'"
    if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise BckdError(usage)
    if parts.password is not None:
        raise BckdError(f"'{url}' holds a password; bckd stores no secrets: use an ssh key "
                        "(ssh-copy-id) and give ssh://user@host[:port]")
    if not parts.username:
        raise BckdError(f"{usage} (the user is missing)")
    try:
        port = parts.port or 22
    except ValueError:
        raise BckdError(f"{usage} (the port is not a number from 1 to 65535)") from None
    return parts.username, parts.hostname, port


def config_dir() -> Path:
    return Path(os.environ.get("BCKD_CONFIG_DIR") or Path.home() / ".config" / "bckd")


def registry_path() -> Path:
    return config_dir() / "targets.json"


def load_targets() -> dict[str, Target]:
    path = registry_path()
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {name: Target(**t) for name, t in raw.get("targets", {}).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise BckdError(f"{path} is not a bckd target registry ({exc}); fix or remove it") from None


def save_targets(targets: dict[str, Target]) -> Path:
    path = registry_path()
    return atomic_write_json(path, {"targets": {n: t.to_dict() for n, t in sorted(targets.items())}})


def add_target(name: str, url: str, *, python: str | None = None, workdir: str | None = None,
               identity: str | None = None, known_hosts: str | None = None,
               accept_new_host_key: bool = False, ssh_options: list[str] | None = None,
               force: bool = False) -> Target:
    if not NAME_RE.match(name):
        raise BckdError(f"target name '{name}' must be letters, digits, '.', '_' or '-' "
                        "(up to 64, starting with a letter or digit)")
    user, host, port = parse_url(url)
    for opt in ssh_options or []:
        if "=" not in opt:
            raise BckdError(f"--ssh-option takes KEY=VALUE (as ssh -o does), got '{opt}'")
    targets = load_targets()
    if name in targets and not force:
        raise BckdError(f"target '{name}' exists ({targets[name].url}); pass --force to "
                        "replace it or 'bckd target remove' it first")
    for label, path in (("--identity", identity), ("--known-hosts", known_hosts)):
        if path and not Path(path).expanduser().is_file():
            raise BckdError(f"{label} {path} is not a file")
    t = Target(name=name, user=user, host=host, port=port, python=python or "python3",
               workdir=workdir or "~/.bckd",
               identity=str(Path(identity).expanduser().resolve()) if identity else None,
               known_hosts=str(Path(known_hosts).expanduser().resolve()) if known_hosts else None,
               accept_new_host_key=accept_new_host_key, ssh_options=list(ssh_options or []))
    targets[name] = t
    save_targets(targets)
    return t


def get_target(name: str) -> Target:
    targets = load_targets()
    if name not in targets:
        known = ", ".join(sorted(targets)) or "none yet"
        raise BckdError(f"no target named '{name}' (known: {known}); add it with 'bckd target "
                        f"add {name} ssh://user@host'")
    return targets[name]


def remove_target(name: str) -> None:
    targets = load_targets()
    get_target(name)
    del targets[name]
    save_targets(targets)
