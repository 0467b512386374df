"""router.chat_render: segment rendering equals the template, for every shipped template,
and templates it cannot render exactly are refused (and render through Jinja).

* Property: for the tiny model's template and the benchmark tokenizers' Llama-3 and ChatML
  templates, ``ChatRenderer.render`` of any conversation (any roles, including ones the
  probes never saw, any text, special-token text and edge whitespace included, with and
  without the generation prompt) equals ``apply_chat_template`` exactly.
* Refusals: templates whose output depends on what a message says (a condition on its
  content, a filter other than trim), on the time (``strftime_now``), on a position the
  segments cannot express, or that reject some role orders, are not segment templates;
  their renderer still renders exactly, through Jinja.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.chat_render import ChatRenderer, content_only_printed
from tests.helpers import shipped_tokenizer_path

transformers = pytest.importorskip("transformers")

DEFAULT_OPTIONS = {"add_generation_prompt": True, "continue_final_message": False}


@pytest.fixture(scope="module", params=["tiny", "llama3", "chatml"])
def shipped(request):
    return transformers.AutoTokenizer.from_pretrained(str(shipped_tokenizer_path(request.param)))


@pytest.fixture(scope="module")
def shipped_renderer(shipped):
    """The shipped tokenizer's renderer, its segments derived once per template."""
    return ChatRenderer(shipped)


@pytest.fixture(scope="module")
def llama3():
    return transformers.AutoTokenizer.from_pretrained(str(shipped_tokenizer_path("llama3")))


def _jinja(hf, messages, generation=True):
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


_part = st.one_of(st.text(st.one_of(st.sampled_from(list("ab \n\t\r<>|_é日😀")),
                                    st.characters(codec="utf-8", exclude_categories=("Cs",))), max_size=12),
                  st.sampled_from(["<|eot_id|>", "<|im_end|>", "<|im_start|>", "  ", "\n\n", "{{", "%}",
                                   "KVROUTEsentinelALPHA"]))
_text = st.lists(_part, max_size=5).map("".join)
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                            "content": _text}), min_size=1, max_size=8)


def test_shipped_templates_are_segment_templates(shipped_renderer):
    assert shipped_renderer.segments is not None


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(messages=_messages, generation=st.booleans())
def test_segments_render_as_the_template(shipped, shipped_renderer, messages, generation):
    options = {"add_generation_prompt": generation, "continue_final_message": False}
    assert shipped_renderer.render(messages, options, True) == _jinja(shipped, messages, generation)


def test_roles_and_options_the_segments_do_not_cover_go_through_jinja(llama3):
    renderer = ChatRenderer(llama3)
    odd = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": " hi "}]
    assert renderer.render(odd, DEFAULT_OPTIONS, True) == _jinja(llama3, odd)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    continued = {"add_generation_prompt": False, "continue_final_message": True}
    assert renderer.render(chat, continued, True) == llama3.apply_chat_template(chat, tokenize=False, **continued)
    assert not renderer.render(chat, continued, True).endswith("<|eot_id|>")
    # A chat_template_kwargs option: the template decides what it means.
    assert renderer.render(chat, {**DEFAULT_OPTIONS, "enable_thinking": False}, True) == _jinja(llama3, chat)


BASE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{CONTENT}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _with_template(hf, template):
    clone = transformers.AutoTokenizer.from_pretrained(hf.name_or_path)
    clone.chat_template = template
    return clone


@pytest.mark.parametrize("content, printed_only", [
    ("{{ message['content'] }}", True),
    ("{{ message.content | trim }}", True),
    ("{{ '[' + message['content'] + ']' }}", True),
    ("{% set c = message['content'] | trim %}{{ c }}", True),
    # What a message says changes what is printed: refused.
    ("{% if '</think>' in message['content'] %}{{ message['content'].split('</think>')[-1] }}"
     "{% else %}{{ message['content'] }}{% endif %}", False),
    ("{{ message['content'] | upper }}", False),
    ("{% set c = message['content'] %}{% if c %}{{ c }}{% endif %}", False),
    ("{{ message['content'] if message['content'] is string else '' }}", False),
    ("{{ message['content'] }}{{ strftime_now('%d %b %Y') }}", False),
])
def test_content_only_printed(content, printed_only):
    assert content_only_printed(BASE.replace("{CONTENT}", content)) is printed_only


@pytest.mark.parametrize("template", [
    # The content decides: a condition on it.
    BASE.replace("{CONTENT}", "{% if message['content'] %}{{ message['content'] }}{% else %}(empty){% endif %}"),
    # Today's date.
    "{{ strftime_now('%Y') }}" + BASE.replace("{CONTENT}", "{{ message['content'] }}"),
    # Rejects some role orders (the engine answers those 400; Jinja must say so here too).
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "[{{ message['role'] }}]{{ message['content'] }}{% endfor %}",
    # The last message is printed differently: not a segment of its role.
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}"
    "{% if not loop.last %}</{{ message['role'] }}>{% endif %}{% endfor %}",
    # The third message onward is wrapped differently.
    "{% for message in messages %}{% if loop.index0 >= 2 %}*{% endif %}{{ message['role'] }}:"
    "{{ message['content'] }};{% endfor %}",
])
def test_templates_that_are_not_segments_are_refused_and_render_through_jinja(llama3, template):
    hf = _with_template(llama3, template)
    renderer = ChatRenderer(hf)
    assert renderer.segments is None
    chat = [{"role": "user", "content": "one"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "three"}]
    assert renderer.render(chat, DEFAULT_OPTIONS, True) == _jinja(hf, chat)


def test_a_segment_template_with_a_first_message_rule(llama3):
    """ChatML's default system message when the first is not one: a first-message segment."""
    template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}"
                + BASE.replace("{CONTENT}", "{{ message['content'] | trim }}"))
    hf = _with_template(llama3, template)
    renderer = ChatRenderer(hf)
    assert renderer.segments is not None and renderer.segments.strip
    for chat in ([{"role": "user", "content": " a "}], [{"role": "system", "content": "s"},
                                                        {"role": "user", "content": "u\n"}]):
        assert renderer.render(chat, DEFAULT_OPTIONS, True) == _jinja(hf, chat)
