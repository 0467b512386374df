"""``record``: the routed traffic written as a Mooncake-compatible trace with keyed block
ids (``router.record``), and replayed by the simulator as it is. The Serve plug-in's and
the gateway's recording are tested in tests/test_serve_router.py and tests/test_gateway.py."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from router.errors import ConfigError
from router.record import RecordConfig, TraceRecorder, record_config
from router.service import RoutingService
from tests.helpers import wait_for

SECRET = "00112233445566778899aabbccddeeff"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _chats(conversations: int = 6, turns: int = 4, salt: str | None = None) -> list[dict]:
    """Chat bodies, turn by turn, each conversation's history growing (one system prompt
    shared by all)."""
    bodies = []
    for turn in range(turns):
        for c in range(conversations):
            messages = [{"role": "system", "content": "You are a careful assistant. " * 20}]
            for t in range(turn + 1):
                messages.append({"role": "user", "content": f"conversation {c} question {t}: " + "detail " * 60})
                if t < turn:
                    messages.append({"role": "assistant", "content": f"answer {c}.{t} " * 40})
            body = {"model": "m", "messages": messages, "session_id": f"user-{c}", "max_tokens": 32 + c}
            if salt is not None:
                body["cache_salt"] = salt
            bodies.append(body)
    return bodies


def _route(service: RoutingService, bodies: list[dict], replicas=("r0", "r1", "r2")) -> list:
    """Route ``bodies`` through the service's front-door sequence (parse, tokenized,
    keyed, rank, routed), completing each; the core's requests, in order."""
    service.set_replicas(list(replicas))
    requests = []

    async def run():
        for i, body in enumerate(bodies):
            fields = service.parse(body)
            found = await service.tokenized(fields, 0.0, ids_wanted=False)
            request = service.keyed(fields, found, f"req-{i}")
            tiers = service.rank(request, list(replicas), 0.0)
            service.routed(request.request_id, tiers[0][0])
            service.completed(request.request_id)
            requests.append(request)

    asyncio.run(run())
    return requests


def _recording_service(path: Path, **record) -> RoutingService:
    return RoutingService({"policy": "cache_aware", "record": {"path": str(path), "secret": SECRET, **record}})


# -- configuration -------------------------------------------------------------------------
def test_a_bad_record_option_fails_at_start_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.delenv("KVROUTE_RECORD_SECRET", raising=False)
    path = str(tmp_path / "t.jsonl")
    for bad, field in (({"path": ""}, "record.path"), ({"path": "/nonexistent-dir/x.jsonl"}, "record.path"),
                       ({"path": path, "colour": 1}, "record.colour"),
                       ({"path": path, "secret": "not hex"}, "record.secret"),
                       ({"path": path, "secret": "abcd"}, "record.secret"),
                       ({"path": path, "secret_file": str(tmp_path / "missing")}, "record.secret_file"),
                       ({"path": path, "max_bytes": 100}, "record.max_bytes"),
                       ({"path": path, "backups": True}, "record.backups"),
                       ({"path": path, "max_queued": 0}, "record.max_queued"),
                       (["a list"], "record")):
        with pytest.raises(ConfigError) as exc:
            RoutingService({"record": bad})
        assert exc.value.field == field, (bad, exc.value)
    monkeypatch.setenv("KVROUTE_RECORD_SECRET", "zz")
    with pytest.raises(ConfigError) as exc:
        record_config({"path": path})
    assert exc.value.field == "KVROUTE_RECORD_SECRET"


def test_the_secret_comes_from_the_option_the_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("KVROUTE_RECORD_SECRET", raising=False)
    path = str(tmp_path / "t-{pid}.jsonl")
    assert record_config({"path": path, "secret": SECRET}).secret == bytes.fromhex(SECRET)
    key_file = tmp_path / "key"
    key_file.write_text("ab" * 32 + "\n")
    assert record_config({"path": path, "secret_file": str(key_file)}).secret == b"\xab" * 32
    monkeypatch.setenv("KVROUTE_RECORD_SECRET", "cd" * 16)
    config = record_config(path)  # a bare path is the path
    assert config.secret == b"\xcd" * 16 and config.secret_given
    assert config.path == str(tmp_path / f"t-{os.getpid()}.jsonl")
    monkeypatch.delenv("KVROUTE_RECORD_SECRET")
    drawn = record_config({"path": path})
    assert not drawn.secret_given and len(drawn.secret) == 32


# -- what is written -----------------------------------------------------------------------
def test_each_routed_request_is_one_mooncake_line_with_keyed_ids_and_no_prompt(tmp_path):
    path = tmp_path / "trace.jsonl"
    service = _recording_service(path)
    bodies = _chats()
    requests = _route(service, bodies)
    service.close()
    lines = _lines(path)
    assert len(lines) == len(bodies)
    raw_keys = {key for request in requests for key in request.keys}
    text = path.read_text()
    for line, request, body in zip(lines, requests, bodies):
        assert {"timestamp", "input_length", "output_length", "hash_ids", "block_size", "session", "tenant",
                "replica", "unix_ms"} <= set(line)
        assert line["input_length"] == request.prompt_tokens and line["block_size"] == request.block_tokens
        assert line["output_length"] == body["max_tokens"]
        assert len(line["hash_ids"]) == len(request.keys)
        assert not raw_keys & set(line["hash_ids"])  # keyed: no raw router key is written
        assert line["replica"] in ("r0", "r1", "r2")
    assert "user-" not in text and "question" not in text and "careful" not in text
    assert [line["timestamp"] for line in lines] == sorted(line["timestamp"] for line in lines)
    # The structure survives: a conversation's turns share their leading ids, and every
    # request shares the system prompt's first block.
    sessions = Counter(line["session"] for line in lines)
    assert len(sessions) == 6 and set(sessions.values()) == {4}
    assert len({line["hash_ids"][0] for line in lines}) == 1
    by_session: dict[str, list[list[int]]] = {}
    for line in lines:
        by_session.setdefault(line["session"], []).append(line["hash_ids"])
    for turns in by_session.values():
        for earlier, later in zip(turns, turns[1:]):
            assert later[:len(earlier) - 1] == earlier[:-1]
    assert len({line["tenant"] for line in lines}) == 1


def test_another_secret_or_tenant_gives_other_ids_the_same_secret_the_same(tmp_path):
    runs = {}
    for name, secret, salt in (("a", SECRET, None), ("b", SECRET, None), ("c", "ff" * 16, None),
                               ("d", SECRET, "tenant-2")):
        path = tmp_path / f"{name}.jsonl"
        service = RoutingService({"record": {"path": str(path), "secret": secret}})
        _route(service, _chats(conversations=2, turns=1, salt=salt))
        service.close()
        runs[name] = _lines(path)
    ids = {name: [line["hash_ids"] for line in lines] for name, lines in runs.items()}
    assert ids["a"] == ids["b"]  # two routers of one deployment: their files merge
    assert not {i for l in ids["a"] for i in l} & {i for l in ids["c"] for i in l}
    assert not {i for l in ids["a"] for i in l} & {i for l in ids["d"] for i in l}  # tenants never share
    assert runs["a"][0]["tenant"] != runs["d"][0]["tenant"]
    assert runs["a"][0]["session"] != runs["c"][0]["session"]


def test_files_rotate_at_their_bound(tmp_path):
    path = tmp_path / "trace.jsonl"
    service = _recording_service(path, max_bytes=4096, backups=2)
    _route(service, _chats(conversations=10, turns=6))
    service.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["trace.jsonl", "trace.jsonl.1", "trace.jsonl.2"], names
    longest = max(len(line) for p in tmp_path.iterdir() for line in p.read_text().splitlines(keepends=True))
    assert all(p.stat().st_size <= 4096 + longest for p in tmp_path.iterdir())
    assert service.recorder.written == 60 and service.recorder.dropped == 0


def test_a_full_queue_drops_and_counts_and_the_metric_says_so(tmp_path):
    recorder = TraceRecorder(RecordConfig(str(tmp_path / "t.jsonl"), b"k" * 16, True, max_queued=2))
    release, busy = threading.Event(), threading.Event()
    line = recorder.line

    def slow_line(item):
        busy.set()
        release.wait(30)
        return line(item)

    recorder.line = slow_line
    recorder.record([1, 2], 40, 16, None, None, None, "r0")
    assert busy.wait(30)  # the writer holds the first record
    for _ in range(5):
        recorder.record([1, 2, 3], 50, 16, 8, "s", 7, "r1")
    assert recorder.stats() == {"written": 0, "dropped": 3, "queued": 2}
    release.set()
    assert wait_for(lambda: recorder.written == 3, timeout=30)
    recorder.close()
    lines = _lines(tmp_path / "t.jsonl")
    assert [line["output_length"] for line in lines] == [256, 8, 8]  # the default when none was asked

    service = _recording_service(tmp_path / "s.jsonl")
    _route(service, _chats(conversations=1, turns=1))
    assert wait_for(lambda: service.recorder.written == 1, timeout=30)
    service.recorder.dropped_full = 2
    seen = {}
    service.metrics._metrics["kvroute_router_trace_records"].inc = \
        lambda value, tags=None: seen.__setitem__(tags["result"], value)
    service.flush_metrics()
    assert seen == {"written": 1, "dropped": 2}
    service.close()


def test_the_simulator_replays_a_recorded_trace_as_it_is(tmp_path):
    from router.cli import main
    from simulator.workloads import ideal_hit_rate, load_trace, mooncake_block_tokens

    path = tmp_path / "trace.jsonl"
    service = _recording_service(path)
    requests = _route(service, _chats(conversations=8, turns=5))
    service.close()
    loaded = load_trace(str(path))
    assert mooncake_block_tokens(str(path)) == requests[0].block_tokens
    assert len(loaded) == len(requests) and len({r.session_id for r in loaded}) == 8
    assert [r.prompt_tokens for r in loaded] == [r.prompt_tokens for r in requests]
    # The keyed ids keep exactly the sharing of the router's keys.
    seen, hits, total = set(), 0, 0
    for request in requests:
        keys = list(request.keys)
        total += len(keys)
        for key in keys:
            if key not in seen:
                break
            hits += 1
        seen.update(keys)
    assert ideal_hit_rate(loaded, requests[0].block_tokens)["full_blocks"] == pytest.approx(hits / total)
    out = tmp_path / "sim.json"
    assert main(["simulate", "--trace", str(path), "--policy", "cache_aware", "--replicas", "3",
                          "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["block_size"] == requests[0].block_tokens
    assert doc["results"][0]["requests"] == len(requests)
