"""Resuming a conversation where its last turn left off: O(new messages) per request.

An agent or a long chat re-sends its whole history on every turn: 100k-400k characters of
which only the last message or two are new. The piece cache (``router.tokenization``)
already saves the tokenizer's work on the old text, but every request still walks all of
it: render, hash and look up every piece, join the ids, chain every block key. This module
remembers, per conversation, where the last turn ended, so the next one only renders,
tokenizes and keys what it adds.

**What is remembered.** After a chat request's ids are known, ``ConversationMemo`` keeps a
``ChatPrefix``: its messages (role and content strings), the token ids of those messages
as the chat template renders them (without the generation prompt), and the chained block
keys of those ids' full blocks. It is filed under its last message (the key namespace's
seed, the message's position, role, length and first and last 32 characters: a key
built in O(1), never by hashing a message's whole text). The next turn looks up its own
messages from the last one back (the hit is usually two messages back), checks that every
remembered message, the last one included, equals its own (a string comparison: no digest
whose collision could hand one conversation another's ids), renders only the messages
after it (and the
generation prompt), tokenizes that text through the piece cache (the pool for what is new)
and continues the key chain from the remembered last key.

**Why it is exact.** The renderer must be a segment template (``router.chat_render``):
each message renders on its own, so ``render(m[0..k]) == render(m[0..j]) +
render_later(m[j+1..k])``. And the text after the remembered messages must start with a
split token ``t`` (every later message's opening and the generation prompt do, in
Llama-3, ChatML and the tiny model's templates) such that no added token occurrence can
straddle that boundary: no added token contains ``t``, and none ends with a proper prefix of
``t`` (``boundary_tokens_safe``). Then the tokenizer's cut at added tokens, which
``router.tokenization`` relies on, splits the whole text exactly there, the pieces on each
side are those of each side alone, and ``ids(whole) == ids(remembered) + ids(rest)``. A
template or tokenizer that breaks either condition gets no memo (every request takes the
full path, as before). ``tests/test_conversations.py`` checks the identity against the
tokenizer's own encoding of the whole text with hypothesis, for the three shipped
templates.

**Bounds.** An LRU bounded by bytes (the messages' characters, the ids, 48 bytes per key,
and fixed overheads per message and entry). A turn that extends a remembered prefix
replaces it, so a linear conversation holds one entry; a branch (an edited or regenerated
turn) keeps its own until evicted. A lookup builds a key per message it walks back over
(O(1) each, whatever the message's length: a fresh request's strings have no cached
hash, and hashing a 100k-character history walked back in full on a miss cost about as
much as the rest of the decision) and compares the remembered messages: O(characters)
in C, about a memory copy's cost.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router._fast import slot_maker, speedups
from router.errors import ConfigError
from router.prefix_tree import HeldPrefix

DEFAULT_MEMO_BYTES = 128 << 20
#: Bytes counted per remembered key (the list slot and the int object it shares with the
#: request's keys), per message (its slots in the roles and contents lists and the string
#: headers; the strings' text is counted by the rendered characters) and per entry (the
#: dict slot and key tuple with its two 32-character slices, the entry object, the ids
#: bytes' header).
KEY_BYTES = 48
MESSAGE_BYTES = 160
ENTRY_OVERHEAD_BYTES = 416

#: The C comparison of a history with a remembered one (None: the Python code in ``begins``).
_messages_begin = getattr(speedups, "messages_begin", None)
_role = operator.itemgetter("role")
_content = operator.itemgetter("content")

#: What a conversation's last remembered message is filed under: its position, role,
#: content length and first and last ``MEMO_KEY_CHARS`` characters, in the seed's
#: namespace; hashed to an int in C (``speedups.memo_key``) for a list of plain messages,
#: else the tuple ``(seed, position, role, length, head, tail)``.
MemoKey = int | tuple[int, int, str, int, str, str]
MEMO_KEY_CHARS = 32

#: The C key and walk (None: the Python ones).
_c_memo_key = getattr(speedups, "memo_key", None)
_c_memo_find = getattr(speedups, "memo_find", None)


def memo_key(messages: Sequence[Mapping[str, str]], at: int, seed: int) -> MemoKey:
    """O(1) in the message's length: a hit is only a candidate, whose messages
    ``ChatPrefix.begins`` then compares in full (so two messages sharing a key, which
    the 64-bit hash allows, cost a comparison, never a wrong resume)."""
    if _c_memo_key is not None:
        key = _c_memo_key(messages, at, seed)
        if key is not None:
            return key
    message = messages[at]
    content = message["content"]
    return seed, at, message["role"], len(content), content[:MEMO_KEY_CHARS], content[-MEMO_KEY_CHARS:]


@dataclass(slots=True, eq=False)
class ChatPrefix:
    """A remembered conversation prefix: its messages' ``roles`` and ``contents`` (the
    strings; never mutated); the packed token ids of them as rendered (no generation
    prompt), which are the first ``id_bytes`` of ``ids``; the chained keys of their full
    blocks, the first ``key_count`` of ``keys`` (in the namespace of the seed it is filed
    under); and the rendered characters they stand for. ``ids`` and ``keys`` are the
    remembered request's own (its generation prompt's ids and keys after those), shared
    rather than copied: a 100k-character history is 100 KB of ids and 1,600 keys, and a
    copy is a page-faulting allocation on every turn. Nobody mutates them.

    ``holder``, the one field set after it is made: the ``router.prefix_tree.HeldPrefix`` (the
    replica's ``hold_mark``, the time from which the tree had all ``key_count`` keys
    there, that count) of the replica the request was routed to, or None; the next turn's
    match skips those keys for that replica while ``PrefixTree.held_bit`` says nothing
    removed them."""

    roles: list[str]
    contents: list[str]
    ids: bytes
    id_bytes: int
    keys: list[int]
    key_count: int
    chars: int
    holder: HeldPrefix | None = None

    @property
    def size(self) -> int:
        return (len(self.ids) + KEY_BYTES * len(self.keys) + self.chars + MESSAGE_BYTES * len(self.roles)
                + ENTRY_OVERHEAD_BYTES)

    def tail(self, start: int, after: bytes) -> bytes:
        """``(own ids + after)[start:]`` for ``start <= id_bytes`` without copying the own
        ids before ``start`` (the blocks the prefix's keys already stand for)."""
        return b"".join((memoryview(self.ids)[start:self.id_bytes], after))

    def begins(self, messages: Sequence[Mapping[str, str]]) -> bool:
        """Whether ``messages`` begin with these (all of them: the key it was found under
        holds only part of the last one). O(characters): string comparisons, run by
        ``map`` and list equality in C (an agent's history has hundreds of messages)."""
        n = len(self.contents)
        if len(messages) < n:
            return False
        if _messages_begin is not None:
            same = _messages_begin(messages, self.roles, self.contents, n)  # None: not its case
            if same is not None:
                return same
        head = messages[:n]
        return list(map(_content, head)) == self.contents[:n] and list(map(_role, head)) == self.roles[:n]


@dataclass(frozen=True, slots=True)
class ChatResume:
    """A chat request resumed from a remembered prefix, or about to be remembered:
    ``messages`` (all of them), ``key`` (to store it under), ``parent`` the key of the
    prefix it resumed from (None: not resumed; it is dropped when this one is stored),
    ``prefix`` that prefix (None: the request's text is the whole chat), ``text`` what the
    request tokenizes (the messages after the prefix and the generation prompt, or the
    whole chat), ``generation_ids`` the ids the generation prompt adds at its end (empty
    without one), which the remembered prefix leaves out, and ``chars`` the rendered
    characters of all the messages (without the generation prompt)."""

    messages: Sequence[Mapping[str, str]]
    key: MemoKey
    parent: MemoKey | None
    prefix: ChatPrefix | None
    text: str
    generation_ids: bytes
    chars: int

    def join(self, ids: bytes) -> bytes:
        """The whole prompt's ids: the remembered prefix's, then ``ids`` (those of
        ``text``). One copy."""
        prefix = self.prefix
        if prefix is None:
            return ids
        return b"".join((memoryview(prefix.ids)[:prefix.id_bytes], ids))

    @property
    def base_chars(self) -> int:
        return self.prefix.chars if self.prefix is not None else 0

    def remembered(self, ids: bytes, keys: list[int], block_bytes: int) -> ChatPrefix:
        """The prefix to remember for this request, whose whole prompt's ids are ``ids``
        (with the generation prompt's at their end) and keys ``keys``: its messages' ids
        and the keys of their full blocks (a prefix of ``keys``)."""
        own = len(ids) - len(self.generation_ids)
        messages = self.messages
        return ChatPrefix(list(map(_role, messages)), list(map(_content, messages)), ids, own, keys,
                          own // block_bytes, self.chars)


#: ``ChatResume(...)`` with every field positional, without the frozen dataclass's
#: ``__init__`` (one per chat request; ``router._fast.slot_maker``).
_new_resume = slot_maker(ChatResume, ("messages", "key", "parent", "prefix", "text", "generation_ids", "chars"))


@dataclass(slots=True)
class MemoStats:
    """Counters of a ``ConversationMemo`` (cumulative, except ``entries`` and ``bytes``)."""

    hits: int = 0
    misses: int = 0
    stored: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    resumed_chars: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def boundary_tokens_safe(boundary: Sequence[str], matched: Sequence[str]) -> bool:
    """Whether no occurrence of a ``matched`` token (every added token the tokenizer
    matches in raw text) can straddle the start of a ``boundary`` token ``t``: no matched
    token other than ``t`` contains ``t``, and no matched token (``t`` included) ends with
    a proper prefix of ``t``. Then a text that continues with ``t`` is cut exactly
    before it, whatever precedes it. O(boundary x matched x token length^2), once."""
    for t in boundary:
        if not t:
            return False
        for x in matched:
            if x != t and t in x:
                return False
            for k in range(1, min(len(x), len(t))):
                if x.endswith(t[:k]):
                    return False
    return True


class ConversationMemo:
    """``MemoKey`` (a conversation's last remembered message) -> ``ChatPrefix``, least
    recently used first, bounded by ``max_bytes`` (``ChatPrefix.size`` each; an entry
    larger than the bound is not kept). ``find`` is O(characters) (module docstring);
    ``put`` is O(1) amortised. One per routing service; used on its event loop only (no
    lock)."""

    def __init__(self, max_bytes: int = DEFAULT_MEMO_BYTES) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigError("conversation_memo_bytes", f"must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._map: OrderedDict[MemoKey, ChatPrefix] = OrderedDict()
        self.stats = MemoStats()

    def find(self, messages: Sequence[Mapping[str, str]],
             seed: int) -> tuple[int, ChatPrefix | None, MemoKey | None]:
        """The longest remembered prefix of ``messages`` (in ``seed``'s namespace):
        ``(i, prefix, its key)`` when ``messages[0..i]`` are remembered, else ``(-1,
        None, None)``. A hit becomes the most recently used."""
        entries = self._map
        start = len(messages) - 1
        if _c_memo_find is not None:
            # The keys built and looked up in C, from the last message back; None: a
            # message that is not plain, and the walk below goes on from there.
            while start >= 0 and (walked := _c_memo_find(messages, seed, entries, start)) is not None:
                i, key, found = walked
                if found is None:
                    start = -1
                elif found.begins(messages):
                    return self._hit(i, found, key)
                else:
                    start = i - 1
        get = entries.get
        for i in range(start, -1, -1):
            key = memo_key(messages, i, seed)
            found = get(key)
            if found is not None and found.begins(messages):
                return self._hit(i, found, key)
        self.stats.misses += 1
        return -1, None, None

    def _hit(self, i: int, found: ChatPrefix, key: MemoKey) -> tuple[int, ChatPrefix, MemoKey]:
        self._map.move_to_end(key)
        self.stats.hits += 1
        self.stats.resumed_chars += found.chars
        return i, found, key

    def put(self, key: MemoKey, prefix: ChatPrefix, replaces: MemoKey | None = None) -> None:
        """Remember ``prefix`` under ``key``; drop ``replaces`` (the prefix it extends: a
        linear conversation keeps one entry). Evicts from the cold end to the bound."""
        stats = self.stats
        if replaces is not None and replaces != key:
            self._drop(replaces)
        self._drop(key)
        size = prefix.size
        if size <= self.max_bytes:
            self._map[key] = prefix
            stats.bytes += size
            stats.stored += 1
            while stats.bytes > self.max_bytes:
                _, cold = self._map.popitem(last=False)
                stats.bytes -= cold.size
                stats.evictions += 1
        stats.entries = len(self._map)

    def _drop(self, key: MemoKey) -> None:
        old = self._map.pop(key, None)
        if old is not None:
            self.stats.bytes -= old.size
            self.stats.entries = len(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: MemoKey) -> bool:
        return key in self._map

    def check_invariants(self) -> None:
        total = sum(p.size for p in self._map.values())
        assert total == self.stats.bytes, (total, self.stats.bytes)
        assert total <= self.max_bytes
        assert self.stats.entries == len(self._map)


class ChatResumer:
    """Decides, per chat request, what to tokenize: the whole rendered chat, or only what
    follows its longest remembered prefix. Holds the memo, the segment template, the
    generation prompt's ids, and the tokenizer facts the exactness argument needs (module
    docstring). ``ChatResumer.build`` returns None when they do not hold."""

    def __init__(self, memo: ConversationMemo, segments: Any, generation_ids: bytes) -> None:
        self.memo = memo
        self.segments = segments
        self.generation_ids = generation_ids

    @classmethod
    def build(cls, prompts: Any, max_bytes: int) -> ChatResumer | None:
        """For ``prompts`` (a ``PromptTokenizer``): None when the memo is off
        (``max_bytes`` 0), the tokenizer does not tokenize piece by piece, its template is
        not a segment template, or a later message's opening or the generation prompt does
        not start with a split token that nothing can straddle."""
        if max_bytes <= 0 or not prompts.incremental:
            return None
        segments = prompts.renderer.segments
        if segments is None:
            return None
        boundary = []
        for text in [opening for opening, _ in segments.later.values()] + (
                [segments.generation] if segments.generation else []):
            first = prompts.pieces(text[:64])[:1] if text else []
            starts = [t for t in prompts.split_tokens if text.startswith(t)]
            if not first or type(first[0]) is not int or len(starts) != 1:
                return None
            boundary.append(starts[0])
        if not boundary_tokens_safe(sorted(set(boundary)), list(prompts.matched_tokens)):
            return None
        generation_ids = prompts.encode(segments.generation, False) if segments.generation else b""
        return cls(ConversationMemo(max_bytes), segments, generation_ids)

    def resume(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, seed: int,
               full_text: str | None = None) -> ChatResume | None:
        """What to tokenize for this chat (plain messages, default options), or None when
        a role has no segments (the request takes the full path). ``full_text``: the
        whole rendering, when the caller has it (a miss tokenizes it)."""
        at, prefix, parent = self.memo.find(messages, seed)
        key = memo_key(messages, len(messages) - 1, seed)
        segments = self.segments
        generation, generation_chars = (self.generation_ids, len(segments.generation)) if add_generation_prompt \
            else (b"", 0)
        try:
            if prefix is None:
                text = full_text if full_text is not None else segments.render(messages, add_generation_prompt)
                return _new_resume(messages, key, None, None, text, generation, len(text) - generation_chars)
            text = segments.render_later(messages[at + 1:], add_generation_prompt)
        except KeyError:
            return None
        return _new_resume(messages, key, parent, prefix, text, generation,
                          prefix.chars + len(text) - generation_chars)
