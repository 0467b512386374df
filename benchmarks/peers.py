"""The peer gateways ``kvroute bench peers`` runs: SGLang's ``smg``, vLLM's ``vllm-router``
and ``sglang-router``, each installed from PyPI (pinned) into a virtualenv of its own under
``~/.cache/kvroute/peers/`` by the benchmark's set-up step. None is a kvroute dependency;
nothing of theirs is imported here: each runs as its own process, with its
``cache_aware`` policy, in front of the same ``vllm serve`` workers as kvroute's gateway.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

from router.errors import ConfigError

PEERS_DIR = Path(os.environ.get("KVROUTE_PEERS_DIR", "~/.cache/kvroute/peers")).expanduser()


@dataclass(frozen=True)
class Peer:
    """A peer gateway: its PyPI requirement, the console script it installs, and the words
    before the common flags (``launch`` for the SGLang routers)."""

    name: str
    requirement: str
    script: str
    subcommand: tuple[str, ...] = ()

    @property
    def venv(self) -> Path:
        return PEERS_DIR / self.name

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / self.script

    def installed(self) -> bool:
        stamp = self.venv / ".kvroute-installed"
        return self.executable.exists() and stamp.exists() and stamp.read_text().strip() == self.requirement

    def install(self, log=print) -> Path:
        """Create the virtualenv and ``pip install`` the pinned wheel (once)."""
        if self.installed():
            return self.executable
        log(f"installing {self.requirement} into {self.venv}")
        venv.EnvBuilder(with_pip=True, clear=True).create(self.venv)
        pip = [str(self.venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        result = subprocess.run([*pip, self.requirement], capture_output=True, text=True)
        if result.returncode != 0 or not self.executable.exists():
            raise RuntimeError(f"could not install {self.requirement}: {result.stderr[-2000:] or result.stdout[-2000:]}")
        (self.venv / ".kvroute-installed").write_text(self.requirement)
        return self.executable

    def command(self, *, workers: list[str], host: str, port: int, prometheus_port: int,
                policy: str = "cache_aware", extra: tuple[str, ...] = ()) -> list[str]:
        """The launch command: the flags the three share (see ``../shared/DESIGN.md``)."""
        return [str(self.executable), *self.subcommand, "--host", host, "--port", str(port),
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port),
                "--worker-urls", *workers, "--policy", policy, *extra]


PEERS: dict[str, Peer] = {
    "smg": Peer("smg", "smg==1.13.0", "smg", ("launch",)),
    "vllm-router": Peer("vllm-router", "vllm-router==0.1.17", "vllm-router"),
    "sglang-router": Peer("sglang-router", "sglang-router==0.3.2", "sglang-router", ("launch",)),
}


def peer(name: str) -> Peer:
    try:
        return PEERS[name]
    except KeyError:
        raise ConfigError("router", f"unknown peer {name!r} (peers: {', '.join(PEERS)})") from None


if __name__ == "__main__":  # python -m benchmarks.peers: install them all
    for p in PEERS.values():
        print(p.install(), file=sys.stderr)
