"""Reading and writing request traces: the Mooncake format and kvroute's own JSONL.

Both loaders read the whole file (a list of ``SimRequest``; memory O(requests + content)),
skip blank lines, and raise ``WorkloadError`` naming ``path:line`` and the field on the
first bad line. Requests are numbered in arrival order; a file whose arrival times go
backwards is sorted by time (stable, so equal times keep file order).
The JSONL format is documented in docs/workloads.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator

import xxhash

from simulator.workloads.model import CHARS_PER_TOKEN, Segments, SimRequest, WorkloadError, _is_int

MOONCAKE_BLOCK_TOKENS = 512
_U64 = 1 << 64
_U32 = 1 << 32


def _records(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; invalid JSON or a non-object is an error."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=lineno) from None
            if not isinstance(obj, dict):
                raise WorkloadError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
            yield lineno, obj


def _number(obj: dict, field: str, path, line: int, *, minimum: float = 0.0) -> float:
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value < math.inf:
        raise WorkloadError(f"must be a finite number >= {minimum:g}, got {value!r}", path=path, line=line, field=field)
    return float(value)


def _integer(obj: dict, field: str, path, line: int, *, minimum: int) -> int:
    value = obj[field]
    if not _is_int(value) or value < minimum:
        raise WorkloadError(f"must be an integer >= {minimum}, got {value!r}", path=path, line=line, field=field)
    return value


def _require(obj: dict, fields: Iterable[str], path, line: int) -> None:
    for field in fields:
        if field not in obj:
            raise WorkloadError("missing", path=path, line=line, field=field)


def _numbered(rows: list[tuple[float, int, object, object, str | None]]) -> list[SimRequest]:
    """Sort (arrival, prompt tokens, output tokens, content, session) rows by arrival if
    needed (stable) and number them."""
    if any(rows[i][0] > rows[i + 1][0] for i in range(len(rows) - 1)):
        rows.sort(key=lambda row: row[0])
    return [SimRequest(i, *row) for i, row in enumerate(rows)]


# --- Mooncake -------------------------------------------------------------------------------

def _tail_segment_id(line: int) -> int:
    # Tokens the hash_ids do not describe get an id of their own per line: 64-bit hashes
    # with the top bit set, far from the trace's small sequential ids.
    return xxhash.xxh3_64_intdigest(b"kvroute-mooncake-tail:%d" % line) | (1 << 63)


def _block_size(obj: dict, path, line: int) -> int:
    size = obj.get("block_size", MOONCAKE_BLOCK_TOKENS)
    if not _is_int(size) or size < 1:
        raise WorkloadError(f"must be an integer >= 1, got {size!r}", path=path, line=line, field="block_size")
    return size


def mooncake_block_tokens(path) -> int:
    """Tokens per hash id of a Mooncake-format trace: its first record's ``block_size``
    (a trace kvroute recorded, ``router.record``), else Mooncake's 512."""
    for line, obj in _records(path):
        return _block_size(obj, path, line)
    return MOONCAKE_BLOCK_TOKENS


def load_mooncake(path, *, limit: int | None = None) -> list[SimRequest]:
    """Read a Mooncake trace (``timestamp`` ms, ``input_length``, ``output_length``,
    ``hash_ids``: one chained id per 512 prompt tokens). A trace kvroute recorded
    (``router.record``) also has ``block_size`` (tokens per id, the same on every line)
    and ``session`` (a digest: the request's ``session_id``); other fields are ignored.

    ``arrival_s = timestamp / 1000`` (not shifted); content is
    ``Segments([(hash_ids[0], 512), ..., (hash_ids[-1], input_length - 512*(n-1))])`` so the
    last block may be partial. When the numbers disagree, ``prompt_tokens`` stays
    ``input_length`` (the prefill work the trace records) and the ids are fitted to it:
    ids beyond ``ceil(input_length/512)`` are dropped; tokens beyond ``512 * len(hash_ids)``
    become one extra segment unique to the request (nothing is assumed shared that the trace
    does not say is shared). ``output_length`` 0 becomes 1 token (an engine always emits
    one). ``limit`` keeps the first ``limit`` requests of the file. O(file) time.
    """
    if limit is not None and (not _is_int(limit) or limit < 0):
        raise WorkloadError(f"must be an integer >= 0 or None, got {limit!r}", field="limit")
    size = None
    rows = []
    for line, obj in _records(path):
        if limit is not None and len(rows) >= limit:
            break
        _require(obj, ("timestamp", "input_length", "output_length", "hash_ids"), path, line)
        own = _block_size(obj, path, line)
        if size is None:
            size = own
        elif own != size:
            raise WorkloadError(f"must be the same on every line ({size} before), got {own}", path=path, line=line,
                                field="block_size")
        session = obj.get("session")
        if session is not None and not isinstance(session, str):
            raise WorkloadError(f"must be a string or null, got {session!r}", path=path, line=line, field="session")
        arrival = _number(obj, "timestamp", path, line) / 1000.0
        prompt = _integer(obj, "input_length", path, line, minimum=1)
        output = max(1, _integer(obj, "output_length", path, line, minimum=0))
        ids = obj["hash_ids"]
        if not isinstance(ids, list) or not all(_is_int(i) and 0 <= i < _U64 for i in ids):
            raise WorkloadError("must be a list of integers in [0, 2**64)", path=path, line=line, field="hash_ids")
        ids = ids[:-(-prompt // size)]
        pairs = [(block_id, size) for block_id in ids]
        covered = size * len(ids)
        if covered > prompt:
            pairs[-1] = (ids[-1], prompt - size * (len(ids) - 1))
        elif covered < prompt:
            pairs.append((_tail_segment_id(line), prompt - covered))
        rows.append((arrival, prompt, output, Segments(pairs), session))
    return _numbered(rows)


# --- kvroute JSONL --------------------------------------------------------------------------

JSONL_FIELDS = ("prompt", "prompt_token_ids", "segments", "output_tokens", "arrival_s", "session_id",
                "prompt_tokens")
_CONTENT_FIELDS = ("prompt", "prompt_token_ids", "segments")


def _content(obj: dict, path, line: int):
    present = [field for field in _CONTENT_FIELDS if field in obj]
    if len(present) != 1:
        raise WorkloadError(f"exactly one of {', '.join(_CONTENT_FIELDS)} is required, got "
                            f"{', '.join(present) or 'none'}", path=path, line=line, field="prompt")
    field = present[0]
    value = obj[field]
    if field == "prompt":
        if not isinstance(value, str) or not value:
            raise WorkloadError("must be a non-empty string", path=path, line=line, field=field)
        return value, -(-len(value) // CHARS_PER_TOKEN)
    if field == "prompt_token_ids":
        if not isinstance(value, list) or not value or not all(_is_int(t) and 0 <= t < _U32 for t in value):
            raise WorkloadError("must be a non-empty list of integers in [0, 2**32)", path=path, line=line,
                                field=field)
        return tuple(value), len(value)
    if not isinstance(value, list) or not value:
        raise WorkloadError("must be a non-empty list of [segment_id, tokens] pairs", path=path, line=line,
                            field=field)
    try:
        segments = Segments(value)
    except ValueError as exc:
        raise WorkloadError(str(exc), path=path, line=line, field=field) from None
    return segments, segments.tokens


def load_jsonl(path, *, arrivals: Iterable[float] | None = None) -> list[SimRequest]:
    """Read kvroute's JSONL trace format (docs/workloads.md): one object a line with exactly
    one of ``prompt`` (text), ``prompt_token_ids`` or ``segments``; ``output_tokens``
    (required, >= 1); optional ``arrival_s``, ``session_id``, ``prompt_tokens``.

    ``arrival_s`` must be on every line or on none. With none, arrival times come from
    ``arrivals`` (e.g. ``poisson_arrivals(...)``) when given, else every request arrives at
    0 (one batch); ``with_arrivals`` can assign them later. ``prompt_tokens`` overrides the
    4-characters-a-token estimate for text and must equal the count for token ids and
    segments. Unknown fields are errors (they are usually typos). O(file) time.
    """
    rows = []
    timed: bool | None = None
    for line, obj in _records(path):
        unknown = sorted(set(obj) - set(JSONL_FIELDS))
        if unknown:
            raise WorkloadError(f"unknown field; valid: {', '.join(JSONL_FIELDS)}", path=path, line=line,
                                field=unknown[0])
        content, counted = _content(obj, path, line)
        _require(obj, ("output_tokens",), path, line)
        output = _integer(obj, "output_tokens", path, line, minimum=1)
        prompt = counted
        if "prompt_tokens" in obj:
            prompt = _integer(obj, "prompt_tokens", path, line, minimum=1)
            if not isinstance(content, str) and prompt != counted:
                raise WorkloadError(f"is {prompt} but the content has {counted} tokens", path=path, line=line,
                                    field="prompt_tokens")
        has_time = "arrival_s" in obj
        if timed is None:
            timed = has_time
        elif timed != has_time:
            raise WorkloadError("must be given on every line or on none", path=path, line=line, field="arrival_s")
        arrival = _number(obj, "arrival_s", path, line) if has_time else 0.0
        session = obj.get("session_id")
        if session is not None and not isinstance(session, str):
            raise WorkloadError(f"must be a string, got {session!r}", path=path, line=line, field="session_id")
        rows.append((arrival, prompt, output, content, session))
    if not timed and arrivals is not None:
        times = iter(arrivals)
        last = 0.0
        for i, row in enumerate(rows):
            try:
                t = float(next(times))
            except StopIteration:
                raise WorkloadError(f"ran out of arrival times at request {i}", field="arrivals") from None
            if t < last:
                raise WorkloadError(f"arrival times must be non-decreasing: {t} after {last}", field="arrivals")
            last = t
            rows[i] = (t, *row[1:])
    return _numbered(rows)


def _record(request: SimRequest) -> dict:
    content = request.content
    obj: dict = {"arrival_s": request.arrival_s}
    if isinstance(content, Segments):
        obj["segments"] = [list(pair) for pair in content]
    elif isinstance(content, str):
        obj["prompt"] = content
    else:
        obj["prompt_token_ids"] = list(content)
    obj["prompt_tokens"] = request.prompt_tokens
    obj["output_tokens"] = request.output_tokens
    if request.session_id is not None:
        obj["session_id"] = request.session_id
    return obj


def save_jsonl(requests: Iterable[SimRequest], path) -> int:
    """Write ``requests`` in kvroute's JSONL format (every field, so ``load_jsonl`` gives
    back equal requests if they are in arrival order); returns the number written. Segment
    content is written as ``"segments": [[id, tokens], ...]``. Streams: O(1) memory beyond
    one request. Writes to ``path + ".tmp"`` and renames, so a failure leaves no half file."""
    tmp = f"{os.fspath(path)}.tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for request in requests:
            handle.write(json.dumps(_record(request), ensure_ascii=False, separators=(",", ":")))
            handle.write("\n")
            count += 1
    os.replace(tmp, path)
    return count


TRACE_FORMATS = ("mooncake", "jsonl")


def load_trace(path, fmt: str | None = None, **options) -> list[SimRequest]:
    """Load a trace as ``fmt`` ("mooncake" or "jsonl"), or detect it when ``fmt`` is None:
    a file whose first object has ``hash_ids`` is Mooncake, anything else kvroute JSONL.
    ``options`` go to the loader (``limit`` for Mooncake, ``arrivals`` for JSONL)."""
    if fmt is None:
        fmt = "jsonl"
        for _, obj in _records(path):
            fmt = "mooncake" if "hash_ids" in obj else "jsonl"
            break
    if fmt == "mooncake":
        return load_mooncake(path, **options)
    if fmt == "jsonl":
        return load_jsonl(path, **options)
    raise WorkloadError(f"unknown trace format {fmt!r}; valid: {', '.join(TRACE_FORMATS)}", field="fmt")
