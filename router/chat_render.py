"""Rendering chats as the engine does, without running the template on every request.

The router renders each chat body with the tokenizer's own chat template
(``apply_chat_template(..., tokenize=False)``) to find the text the engine tokenizes. Jinja
costs about 2 us per message, so an agent's history of hundreds of messages, re-sent every
turn, costs the routing loop 0.1-0.5 ms a request before anything else happens.

Most chat templates are a sequence of per-message segments: an opening that depends on the
role, the content (as it is or trimmed), a closing, and after the last message the
generation prompt. ``SegmentTemplate.derive`` learns those strings from the template
itself, by rendering probe conversations with sentinel contents, and then renders a chat
as a string join. It is used only for a template that passes every check:

1. **Content is only printed.** In the template's syntax tree, a message's ``content``
   (and any variable set from it) appears only in output, string concatenation, or the
   ``trim`` filter: never in a condition, a test, a call or another filter, so no branch
   of the template depends on what a message says. Templates that call anything but
   ``raise_exception`` (``strftime_now`` prints today's date) are refused too.
2. **Every probe agrees.** Every sequence of the roles system, user, assistant and tool
   up to four messages, and longer random ones, with contents that have and lack edge
   whitespace and an empty content, with and without the generation prompt: the segment
   rendering must equal ``apply_chat_template`` character for character, and the template
   must accept them all (a template that rejects some role orders, through
   ``raise_exception``, keeps rendering through Jinja, which raises as the engine would).

Anything else (a template that fails a check, a body with chat-template options beyond
``add_generation_prompt``, messages that are not plain role/content pairs) renders
through Jinja, as before. ``ChatRenderer`` picks per request.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router._fast import speedups

logger = logging.getLogger("kvroute.tokenization")
#: The C check of a chat's roles (None: the Python loop in ``ChatRenderer.covers``).
_roles_within = getattr(speedups, "roles_within", None)

ROLES = ("system", "user", "assistant", "tool")
#: Probe conversations: every role sequence up to this length, then random longer ones.
EXHAUSTIVE_PROBE_MESSAGES = 4
RANDOM_PROBES = 64
RANDOM_PROBE_MAX_MESSAGES = 12
#: Content strings of the probes: plain, edge whitespace of each kind, empty, inner blanks.
PROBE_CONTENTS = ("kvroute probe", "  padded both  ", "\ntrailing newline\n", "", "inner\n\n blank  lines",
                  "\tTab led", "x")
#: The sentinels the segments are found by (letters only: no template trims or splits them).
SENTINELS = ("KVROUTEsentinelALPHA", "KVROUTEsentinelBRAVO")
#: Filters and calls a segment template may apply to content, or call at all.
CONTENT_FILTERS = frozenset({"trim"})
ALLOWED_CALLS = frozenset({"raise_exception"})


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


@dataclass(frozen=True, slots=True)
class SegmentTemplate:
    """A chat template as per-message segments: ``first[role]`` and ``later[role]`` are
    each message's (opening, closing) around its content when it is the first message or
    a later one, ``strip`` whether the content is trimmed, ``generation`` what the
    generation prompt appends. ``render`` is O(total characters), one join."""

    first: dict[str, tuple[str, str]]
    later: dict[str, tuple[str, str]]
    strip: bool
    generation: str

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """The chat text, as the template renders it; ``KeyError`` for a role it was not
        derived for."""
        return self._join(messages, self.first, add_generation_prompt)

    def render_later(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        """What ``messages`` add when they follow at least one earlier message: ``render(
        earlier + messages, g) == render(earlier, False) + render_later(messages, g)``
        (each message renders on its own). ``KeyError`` for a role it was not derived for."""
        return self._join(messages, self.later, add_generation_prompt)

    def _join(self, messages: Sequence[Mapping[str, str]], segments: dict[str, tuple[str, str]],
              add_generation_prompt: bool) -> str:
        """The messages rendered in one join, the first with ``segments`` (``first`` or
        ``later``), the rest with ``later``."""
        parts: list[str] = []
        append = parts.append
        strip = self.strip
        for message in messages:
            opening, closing = segments[message["role"]]
            content = message["content"]
            append(opening)
            append(content.strip() if strip else content)
            append(closing)
            segments = self.later
        if add_generation_prompt:
            append(self.generation)
        return "".join(parts)

    @classmethod
    def derive(cls, tokenizer: Any) -> SegmentTemplate | None:
        """The segments of ``tokenizer``'s chat template, or None when it is not one of
        segments (see the module docstring) or fails a probe."""
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            return None
        try:
            if not content_only_printed(template):
                return None
            found = cls._from_sentinels(tokenizer)
            if found is None or not found._agrees_with(tokenizer):
                return None
            return found
        except Exception:  # noqa: BLE001 - any template that does not render the probes
            return None

    @classmethod
    def _from_sentinels(cls, tokenizer: Any) -> SegmentTemplate | None:
        a, b = SENTINELS
        first: dict[str, tuple[str, str]] = {}
        for role in ROLES:
            text = _render(tokenizer, [{"role": role, "content": a}], False)
            if text.count(a) != 1:
                return None
            i = text.index(a)
            first[role] = (text[:i], text[i + len(a):])
        lead = first["user"][0] + a + first["user"][1]
        later: dict[str, tuple[str, str]] = {}
        for role in ROLES:
            text = _render(tokenizer, [{"role": "user", "content": a}, {"role": role, "content": b}], False)
            if not text.startswith(lead) or text.count(b) != 1:
                return None
            rest = text[len(lead):]
            j = rest.index(b)
            later[role] = (rest[:j], rest[j + len(b):])
        plain = _render(tokenizer, [{"role": "user", "content": a}], False)
        prompted = _render(tokenizer, [{"role": "user", "content": a}], True)
        if not prompted.startswith(plain):
            return None
        padded = _render(tokenizer, [{"role": "user", "content": f" \n{a}\n "}], False)
        opening, closing = first["user"]
        if padded == opening + f" \n{a}\n " + closing:
            strip = False
        elif padded == opening + a + closing:
            strip = True
        else:
            return None
        return cls(first, later, strip, prompted[len(plain):])

    def _agrees_with(self, tokenizer: Any) -> bool:
        rng = random.Random(0)
        sequences: list[tuple[str, ...]] = []
        for n in range(1, EXHAUSTIVE_PROBE_MESSAGES + 1):
            sequences += itertools.product(ROLES, repeat=n)
        sequences += [tuple(rng.choice(ROLES) for _ in range(rng.randint(EXHAUSTIVE_PROBE_MESSAGES + 1,
                                                                         RANDOM_PROBE_MAX_MESSAGES)))
                      for _ in range(RANDOM_PROBES)]
        for k, roles in enumerate(sequences):
            messages = [{"role": role, "content": PROBE_CONTENTS[(k + i) % len(PROBE_CONTENTS)]}
                        for i, role in enumerate(roles)]
            for generation in (True, False):
                if self.render(messages, generation) != _render(tokenizer, messages, generation):
                    return False
        return True


def content_only_printed(template: str) -> bool:
    """Whether, in ``template``'s syntax tree, message content (any ``.content`` /
    ``['content']``, and every variable set from an expression that holds one) is only
    printed, concatenated or trimmed, and the template calls nothing but
    ``raise_exception``. Conservative: any other use refuses the template."""
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tree = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    for call in tree.find_all(nodes.Call):
        if not (isinstance(call.node, nodes.Name) and call.node.name in ALLOWED_CALLS):
            return False

    def is_content(node: nodes.Node, tainted: set[str]) -> bool:
        if isinstance(node, nodes.Getitem):
            return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
        if isinstance(node, nodes.Getattr):
            return node.attr == "content"
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in tainted

    def uses_ok(node: nodes.Node, tainted: set[str], allowed: bool) -> bool:
        """Walk ``node``: a content expression may appear only where ``allowed`` (inside
        output, concatenation or trim, reached through such nodes only)."""
        if is_content(node, tainted):
            return allowed
        if isinstance(node, nodes.Output):
            return all(uses_ok(child, tainted, True) for child in node.nodes)
        if isinstance(node, (nodes.Add, nodes.Concat)):
            return all(uses_ok(child, tainted, allowed) for child in node.iter_child_nodes())
        if isinstance(node, nodes.Filter) and node.name in CONTENT_FILTERS and not node.args and not node.kwargs:
            return uses_ok(node.node, tainted, allowed)
        if isinstance(node, nodes.Assign):
            return uses_ok(node.node, tainted, True)
        return all(uses_ok(child, tainted, False) for child in node.iter_child_nodes())

    # Variables set from content are content too: grow the set to a fixed point.
    tainted: set[str] = set()
    while True:
        grown = set(tainted)
        for assign in tree.find_all(nodes.Assign):
            if isinstance(assign.target, nodes.Name) and any(
                    is_content(n, tainted) for n in [assign.node, *assign.node.find_all(nodes.Expr)]):
                grown.add(assign.target.name)
            elif not isinstance(assign.target, nodes.Name) and any(
                    is_content(n, tainted) for n in [assign.node, *assign.node.find_all(nodes.Expr)]):
                return False  # a tuple target or namespace attribute: not followed
        if grown == tainted:
            break
        tainted = grown
    return uses_ok(tree, tainted, False)


class ChatRenderer:
    """Renders a chat for the router as ``tokenizer``'s template does: through its
    ``SegmentTemplate`` (``segments``, None when the template is not one) for plain
    messages and the default options, else through ``apply_chat_template``. Holds the
    tokenizer and the derived segments (derived once, at construction: a few hundred
    renders of short probes)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.segments = SegmentTemplate.derive(tokenizer)
        if self.segments is None:
            logger.info("chat template of %s renders through Jinja on every request",
                        getattr(tokenizer, "name_or_path", "?"))

    def by_segments(self, options: Mapping[str, Any], plain: bool) -> bool:
        """Whether a chat with these options renders through the segments (when every
        role it has was derived). ``plain``: every message is a ``{"role", "content"}``
        pair of strings and nothing else."""
        return self.segments is not None and plain and len(options) == 2 and not options["continue_final_message"]

    def covers(self, messages: Sequence[Mapping[str, str]]) -> bool:
        """Whether the segments were derived for every role of ``messages`` (plain ones):
        then they render it, and the template cannot reject it. O(messages)."""
        roles = self.segments.later if self.segments is not None else {}
        if _roles_within is not None:
            within = _roles_within(messages, roles)  # one pass in C (None: not its case)
            if within is not None:
                return within
        return all(message["role"] in roles for message in messages)

    def render(self, messages: list[dict[str, str]], options: Mapping[str, Any], plain: bool) -> str:
        """The chat text the engine tokenizes. ``plain``: every message is a
        ``{"role", "content"}`` pair of strings and nothing else."""
        segments = self.segments
        if self.by_segments(options, plain):
            try:
                return segments.render(messages, options["add_generation_prompt"])
            except KeyError:  # a role the probes did not cover: the template decides
                pass
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **options)
