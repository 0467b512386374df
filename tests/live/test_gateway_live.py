"""Live: ``kvroute gateway`` (the real command, a child process) in front of two real
``vllm serve`` CPU servers of the tiny model, with prefix caching and KV events on.

Checks what users see: answers identical to a direct call, streams passed through,
repeat prefixes sent back to the worker that caches them and confirmed by its KV events
(the first worker's through a ``kvroute relay`` sidecar: router keys only, over CURVE),
the ingress's 4xx for bad input, a worker added at run time getting traffic, a worker
killed with requests in flight losing none of them, and SIGTERM draining a stream before
the gateway exits. Every wait is on an observable condition with a generous deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")
pytest.importorskip("aiohttp")

from engines.vllm_server import VLLMServer  # noqa: E402
from tests.helpers import wait_for  # noqa: E402

pytestmark = pytest.mark.live
BLOCK = 32  # vLLM's CPU attention takes multiples of 32
SYSTEM = "You are the kvroute gateway's test assistant. Answer briefly and precisely. " * 12


def _post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _chat(text: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
            "max_tokens": 8, "temperature": 0, **extra}


class CommandProcess:
    """``python -m router.cli COMMAND ...`` in its own session, its output in a file (a
    pipe nobody reads would fill and block it), started once ``pattern`` shows in that
    output (its match kept as ``found``)."""

    def __init__(self, command: str, args: list[str], pattern: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix=f"kvroute-{command}-", suffix=".log", delete=False)
        self.process = subprocess.Popen([sys.executable, "-m", "router.cli", command, *args],
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            self.found = re.search(pattern, self.output())
            if self.found:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{command} did not start:\n" + self.output())

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)


class GatewayProcess(CommandProcess):
    """``kvroute gateway ...`` with its listening line parsed."""

    def __init__(self, args: list[str]) -> None:
        super().__init__("gateway", args, r"listening on (http://\S+) \(admin: (http://\S+)\)")
        self.url, self.admin = self.found.group(1), self.found.group(2)

    def workers(self) -> dict[str, dict]:
        return {w["url"]: w for w in _get(self.admin + "/admin/workers")["workers"]}

    def state(self) -> dict:
        return _get(self.admin + "/admin/workers")


@pytest.fixture(scope="module")
def servers(tiny_model_path):
    started = [VLLMServer(tiny_model_path, block_size=BLOCK, kv_blocks=512).start() for _ in range(2)]
    try:
        for server in started:
            server.wait_ready(900)
        yield started
    finally:
        for server in started:
            server.stop()


class RelayProcess(CommandProcess):
    """``kvroute relay ...`` beside a worker, its gateway worker option parsed."""

    def __init__(self, server: VLLMServer, keys: str) -> None:
        super().__init__("relay", ["--upstream", server.kv_endpoint, "--upstream-replay", server.replay_endpoint,
                                   "--bind", "tcp://127.0.0.1:0", "--replay-bind", "tcp://127.0.0.1:0",
                                   "--keys", keys, "--model", "tiny", "--block-size", str(BLOCK)],
                         r"gateway worker option: (\S+)")
        self.worker_option = self.found.group(1)


@pytest.fixture(scope="module")
def gateway(servers, tiny_model_path, tmp_path_factory):
    first, second = servers
    # The first worker's KV events come through a relay sidecar: the gateway holds the
    # deployment's keys and subscribes to the relay, never to vLLM's own publisher.
    keys = str(tmp_path_factory.mktemp("relay") / "relay.keys")
    subprocess.run([sys.executable, "-m", "router.cli", "relay-keys", keys], check=True, capture_output=True)
    relay = RelayProcess(first, keys)
    # The second worker joins later, through the admin listener (test_a_worker_added...).
    gw = GatewayProcess(["--worker", f"{first.url},{relay.worker_option}", "--relay-keys", keys,
                         "--tokenizer", str(tiny_model_path), "--block-size", str(BLOCK), "--port", "0",
                         "--admin-port", "0"])
    gw.relay_keys, gw.relay_option = keys, relay.worker_option  # for the rotation test
    try:
        assert wait_for(lambda: gw.workers()[first.url]["admitted"], timeout=120, interval=0.2)
        yield gw
    finally:
        gw.stop()
        relay.stop(signal.SIGTERM)


def test_answers_equal_a_direct_call_and_bad_input_gets_the_ingress_4xx(gateway, servers):
    body = _chat("What is a prefix cache?")
    status, via, headers = _post(gateway.url + "/v1/chat/completions", body)
    assert status == 200 and headers["x-kvroute-worker"] == servers[0].url
    _, direct, _ = _post(servers[0].url + "/v1/chat/completions", body)
    assert via["choices"][0]["message"] == direct["choices"][0]["message"]
    assert _get(gateway.url + "/v1/models")["data"][0]["id"] == "tiny"
    for bad, status_want, words in [({"model": "tiny"}, 400, "messages"), (_chat("x", model="gpt-9"), 404, "gpt-9"),
                                    (_chat("x", max_tokens=-1), 400, "max_tokens")]:
        status, data, _ = _post(gateway.url + "/v1/chat/completions", bad)
        assert status == status_want and words in data["error"]["message"], data


def test_streams_pass_through_event_by_event(gateway, servers):
    body = _chat("Count to ten.", stream=True, max_tokens=24, ignore_eos=True)
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    events = []
    with urllib.request.urlopen(request, timeout=300) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
    assert events[-1] == b"[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
              if json.loads(e)["choices"]]
    assert len(deltas) >= 10  # one event per token or so, not one buffered blob
    _, direct, _ = _post(servers[0].url + "/v1/chat/completions", {**body, "stream": False})
    assert "".join(deltas) == direct["choices"][0]["message"]["content"]


def test_kv_events_confirm_what_the_gateway_routed(gateway, servers):
    for i in range(3):
        _post(gateway.url + "/v1/chat/completions", _chat(f"Question {i}: what is routing?"))

    def confirmed() -> bool:
        row = gateway.workers()[servers[0].url]
        tree = row.get("tree") or {}
        return tree.get("blocks", 0) > 0 and tree.get("speculative", 1) == 0
    assert wait_for(confirmed, timeout=60, interval=0.2), gateway.workers()[servers[0].url]
    assert gateway.state()["kv_events"].get("events", 0) > 0
    # Live on the SUB socket, not only caught up through the replay endpoint's probes.
    assert gateway.workers()[servers[0].url]["kv_stream"]["messages"] > 0
    # Through the relay: the worker's stream is the relay's (router keys, over CURVE).
    assert gateway.workers()[servers[0].url]["kv_events"] != servers[0].kv_endpoint


def test_a_stranger_gets_nothing_and_a_key_rotation_keeps_the_tree_confirmed(gateway, servers, tmp_path):
    """Beside the gateway, a subscriber with another deployment's keys (told the relay's
    public key) receives nothing. Then the operator rotates the key file both the relay
    sidecar and the gateway read: both reload it, the gateway reconnects without clearing
    that worker, and new requests are confirmed by events through the new keys."""
    from router.kv_events import KVEventSubscriber, ReplicaEndpoint
    from router.kv_relay import RelayKeys

    url = servers[0].url
    option = dict(part.split("=", 1) for part in gateway.relay_option.split(","))
    other = tmp_path / "other.keys"
    RelayKeys.generate().write(other)
    overheard: list = []
    stranger = KVEventSubscriber("stranger", ReplicaEndpoint(option["kv_events"], option["replay"], block_size=BLOCK,
                                                             model="tiny", server_key=option["relay_key"]),
                                 lambda replica, event: overheard.append(event), relay_keys=str(other),
                                 replay_timeout_s=0.5).start()

    def stream() -> dict:
        return gateway.workers()[url]["kv_stream"]

    def confirmed_after(events: int):
        def check() -> bool:
            tree = gateway.workers()[url].get("tree") or {}
            return stream()["events"] > events and tree.get("blocks", 0) > 0 and tree.get("speculative", 1) == 0
        return check

    try:
        before = stream()
        _post(gateway.url + "/v1/chat/completions", _chat("Before rotation: what does a relay carry?"))
        assert wait_for(confirmed_after(before["events"]), timeout=60, interval=0.2), gateway.workers()[url]
        subprocess.run([sys.executable, "-m", "router.cli", "relay-keys", gateway.relay_keys, "--rotate"],
                       check=True, capture_output=True)
        assert wait_for(lambda: stream().get("rekeys", 0) > before.get("rekeys", 0), timeout=60, interval=0.2)
        rotated = stream()
        for i in range(3):
            _post(gateway.url + "/v1/chat/completions", _chat(f"After rotation {i}: what does a relay carry?"))
        assert wait_for(confirmed_after(rotated["events"]), timeout=60, interval=0.2), gateway.workers()[url]
        after = stream()
        assert after["restarts"] == before["restarts"] and after["lost"] == before["lost"]  # nothing cleared
        assert not overheard and stranger.stats.messages == 0
    finally:
        stranger.stop()


def test_a_worker_added_at_run_time_gets_traffic_and_prefixes_stick(gateway, servers):
    first, second = servers
    request = urllib.request.Request(gateway.admin + "/admin/workers", method="POST",
                                     data=json.dumps({"worker": second.worker_arg()}).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 201
    assert wait_for(lambda: gateway.workers()[second.url]["admitted"], timeout=120, interval=0.2)
    served: dict[int, list] = {}
    for turn in range(3):
        for session in range(8):  # 8 distinct long prefixes: cache_aware spreads them
            prompt = f"Session {session}. " + f"Context of session {session}. " * 60 + "Turn. " * turn
            status, _, headers = _post(gateway.url + "/v1/completions",
                                       {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0,
                                        "user": f"session-{session}"})
            assert status == 200
            served.setdefault(session, []).append(headers["x-kvroute-worker"])
    workers_used = {url for urls in served.values() for url in urls}
    assert second.url in workers_used, served
    # Each session stays with the worker that caches it (its prefix and its session id).
    # The policy may still move one when a worker's reported load says so (the engines'
    # /metrics lag the gateway's own counts by up to a scrape), so: nearly all stay.
    staying = sum(1 for urls in served.values() if len(set(urls)) == 1)
    assert staying >= 7, served


def test_a_worker_killed_with_requests_in_flight_loses_none(gateway, servers):
    first, second = servers
    assert wait_for(lambda: all(w["admitted"] for w in gateway.workers().values()), timeout=120, interval=0.2)
    # Distinct long prompts, all at once: the policy spreads them over both workers.
    bodies = [{"model": "tiny", "prompt": f"Document {i}. " + f"Body of document {i}. " * 60, "max_tokens": 600,
               "ignore_eos": True, "temperature": 0} for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as executor:
        futures = [executor.submit(_post, gateway.url + "/v1/completions", b, 900) for b in bodies]
        # Kill once the gateway has requests in flight on the victim (observable, not timed).
        assert wait_for(lambda: gateway.workers()[second.url]["in_flight"] > 0, timeout=120, interval=0.02)
        second.kill()
        results = [f.result() for f in futures]
    assert [status for status, _, _ in results] == [200] * len(bodies), (results, gateway.output()[-3000:])
    # Every request answered in full, once. The victim may have finished one between the
    # gateway's report and the kill (a lone request decodes 600 tokens of the tiny model
    # in well under a second on a fast machine); those it had not were retried on the
    # survivor, which answered them in full.
    where = [r[2]["x-kvroute-worker"] for r in results]
    assert all(r[1]["usage"]["completion_tokens"] == 600 for r in results), where
    assert set(where) <= {first.url, second.url} and first.url in where, where
    assert gateway.state()["retries"] >= 1, (where, gateway.output()[-3000:])
    assert wait_for(lambda: not gateway.workers()[second.url]["admitted"], timeout=60, interval=0.2)


def test_sigterm_drains_a_stream_then_exits(gateway, servers):
    body = _chat("Tell a long story.", stream=True, max_tokens=400, ignore_eos=True)
    request = urllib.request.Request(gateway.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        first = resp.readline()
        assert first.startswith(b"data: ")
        os.killpg(gateway.process.pid, signal.SIGTERM)
        # Not accepting any more, while this stream goes on.
        port = int(gateway.url.rsplit(":", 1)[1])
        assert wait_for(lambda: _refused(port), timeout=60, interval=0.05)
        rest = resp.read()
    assert rest.strip().endswith(b"data: [DONE]")
    assert rest.count(b"data: ") >= 100
    assert gateway.process.wait(120) == 0


def _refused(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return True
    return False

