"""Plain ``vllm serve`` OpenAI servers as child processes: what the gateway fronts.

Used by the gateway's live tests and by ``kvroute bench peers``. Each ``VLLMServer`` runs
vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) on loopback,
with prefix caching and, by default, KV events published on a loopback ZMQ port (plus a
replay endpoint), on the CPU build: ``VLLM_CPU_KVCACHE_SPACE`` and no OpenMP core pinning
as kvroute's engine deployment sets them. Nothing here is kvroute code in the request
path: these are the servers users run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

#: The environment of a CPU server unless the caller overrides it (see engines.openai_app):
#: a 1 GiB KV cache, no OpenMP core pinning, and one compute thread, as Ray gives an engine
#: replica of ``num_cpus=1`` (several servers on a small machine would otherwise each spin
#: a thread per core and starve one another: 0.5-0.8 s TTFT p50 instead of tens of ms for
#: three servers on 2 cores).
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
#: What ``fast_start`` adds (vLLM 0.32, CPU build): the model worker runs inside the engine
#: core's process instead of a process of its own (the ``uni`` executor; vLLM's CPU
#: platform turns ``uni`` back into ``mp`` unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
#: which does not change the OpenAI server, whose engine core stays a process of its own),
#: and no torch.compile warm-up (``--enforce-eager``, which kvroute's and Ray Serve LLM's
#: Serve engines use too). Measured with the tiny model on this 2-core machine
#: (``VLLMServer(...).start().wait_ready()``): 44.5 s to a healthy server before, 31 s
#: eager, 18.5 s eager with the worker in process. One worker and no core pinning
#: (``nobind``): the mp executor's reason on CPU (setting up OpenMP binding) does not apply.
FAST_START_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
FAST_START_ARGS = ["--enforce-eager", "--distributed-executor-backend", "uni"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports free now."""
    while True:
        base = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base


@dataclass
class VLLMServer:
    """One ``vllm serve`` process. ``start()`` launches it; ``wait_ready()`` polls
    ``/health`` until it answers (or the process dies: its log tail is in the error);
    ``stop()`` sends SIGTERM, then SIGKILL after ``grace_s``; ``kill()`` is SIGKILL at once.
    ``url``, ``kv_events`` and ``replay`` are what a gateway's ``--worker`` takes
    (``worker_arg``)."""

    model: str | Path
    served_name: str = "tiny"
    port: int = 0
    block_size: int = 32  # vLLM's CPU attention takes multiples of 32
    max_model_len: int = 2048
    kv_blocks: int | None = None
    kv_events: bool = True
    max_num_seqs: int = 64
    data_parallel_size: int = 1  # ranks of one server (each its own engine, KV cache and KV-event port)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    fast_start: bool = True  # FAST_START_ENV and FAST_START_ARGS
    cpus: frozenset[int] | None = None  # the CPUs it may run on (None: any), set before it starts
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    kv_port: int = 0
    replay_port: int = 0
    #: Restarts with fresh ports when a port picked as free was taken before the server bound
    #: it (``free_port`` releases its probe socket, so another process can get the port first).
    port_retries: int = 2
    _picked_ports: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def kv_endpoint(self) -> str | None:
        return f"tcp://127.0.0.1:{self.kv_port}" if self.kv_events else None

    @property
    def replay_endpoint(self) -> str | None:
        return f"tcp://127.0.0.1:{self.replay_port}" if self.kv_events else None

    def worker_arg(self) -> str:
        """This server as a gateway ``--worker`` value."""
        dp = f",dp={self.data_parallel_size}" if self.data_parallel_size > 1 else ""
        if not self.kv_events:
            return self.url + dp
        return f"{self.url},kv_events={self.kv_endpoint},replay={self.replay_endpoint}{dp}"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--block-size", str(self.block_size), "--max-model-len", str(self.max_model_len),
                "--max-num-seqs", str(self.max_num_seqs), "--enable-prefix-caching", "--seed", "0",
                "--disable-uvicorn-access-log"]
        if self.kv_blocks:
            args += ["--num-gpu-blocks-override", str(self.kv_blocks)]
        if self.data_parallel_size > 1:
            args += ["--data-parallel-size", str(self.data_parallel_size)]
        if self.kv_events:
            # vLLM's publisher binds only a wildcard (or ipc) endpoint and *connects* to a
            # host address (ZmqEventPublisher._is_bind_endpoint), where nothing would listen
            # for the router's SUB socket, which connects too: live events would never
            # flow, only the replay probes' catch-ups. Its replay socket always binds.
            args += ["--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{self.kv_port}",
                "replay_endpoint": self.replay_endpoint, "topic": ""})]
        if self.fast_start:
            args += FAST_START_ARGS
        return args + list(self.extra_args)

    def start(self) -> VLLMServer:
        if not (self.port or self.kv_port or self.replay_port):
            self._picked_ports = True  # ours to pick again (``wait_ready``)
        self.port = self.port or free_port()
        if self.kv_events:
            # Rank R publishes at each port + R (vLLM's offset_endpoint_port).
            self.kv_port = self.kv_port or free_ports(self.data_parallel_size)
            self.replay_port = self.replay_port or free_ports(self.data_parallel_size)
        env = {**os.environ, **DEFAULT_ENV, **(FAST_START_ENV if self.fast_start else {}), **self.env}
        log = tempfile.NamedTemporaryFile(prefix=f"vllm-serve-{self.port}-", suffix=".log", delete=False)
        self.log_path = Path(log.name)
        cpus = self.cpus
        # In the child before exec: the server and every process it starts keep the set.
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=pin)
        log.close()
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until ``/health`` answers. A server that exited because a port it was given was
        taken in the meantime ("Address already in use") is started again on fresh ports,
        ``port_retries`` times, when this object picked them."""
        deadline = time.monotonic() + timeout
        retries = self.port_retries
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if retries > 0 and self._picked_ports and "Address already in use" in self.log_tail(200):
                    retries -= 1
                    self.port = self.kv_port = self.replay_port = 0
                    self.start()
                    continue
                raise RuntimeError(f"vllm serve on port {self.port} exited ({self.process.returncode}):\n"
                                   f"{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve on port {self.port} not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
