"""blockpool.prompt: every prompt form users pass, against what mlx-lm makes of it, and every refusal."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import stream_generate
from mlx_lm.utils import load_tokenizer

import tiny_models
from blockpool import InvalidRequestError
from blockpool.demo_model import EOS
from blockpool.prompt import as_id_list, chat_messages, to_token_ids

MESSAGES = [{"role": "system", "content": "you plan"}, {"role": "user", "content": "the agent reads a file"}]
TOOLS = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
# Renders tools, and fails (as many real templates do) on a role it does not know.
STRICT_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{% if think %}<think>{% endif %}"
)


@pytest.fixture(scope="module")
def model_and_tokenizer(load_tiny):
    return load_tiny("llama")


@pytest.fixture(scope="module")
def tokenizer(model_and_tokenizer):
    return model_and_tokenizer[1]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Variants of the tiny model's tokenizer: one that adds BOS, one with a strict template, one with none."""
    base = tiny_models.write_model_dir(tmp_path_factory.mktemp("base"), "llama")
    dirs = {}
    for name in ("bos", "strict", "no_template"):
        path = tmp_path_factory.mktemp(name)
        for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            shutil.copy(base / f, path / f)
        config = json.loads((path / "tokenizer_config.json").read_text())
        if name == "bos":  # a post-processor that prepends BOS, as Llama tokenizers do
            tok = json.loads((path / "tokenizer.json").read_text())
            bos_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == EOS)
            tok["post_processor"] = {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": EOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {EOS: {"id": EOS, "ids": [bos_id], "tokens": [EOS]}},
            }
            (path / "tokenizer.json").write_text(json.dumps(tok))
        elif name == "strict":
            config["chat_template"] = STRICT_TEMPLATE
        else:
            del config["chat_template"]
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[name] = path
    return dirs


def mlx_lm_prompt_ids(model, tokenizer, prompt) -> list[int]:
    """The prompt ids mlx-lm's stream_generate feeds the model (seen by a logits processor)."""
    seen = []

    def record(tokens, logits):
        if not seen:
            seen.append(tokens.tolist())
        return logits

    for _ in stream_generate(model, tokenizer, prompt, max_tokens=1, logits_processors=[record]):
        pass
    return seen[0]


# ------------------------------------------------------------------ text


@pytest.mark.parametrize("text", ["the agent reads a file", f"{EOS}the agent", " leading space", "é中文 and\nnewlines"])
def test_text_is_encoded_as_mlx_lm_encodes_it(model_and_tokenizer, tokenizer_dirs, text):
    model, tokenizer = model_and_tokenizer
    bos_tokenizer = load_tokenizer(tokenizer_dirs["bos"])
    for tok in (tokenizer, bos_tokenizer):
        ids = to_token_ids(tok, text)
        assert ids == mlx_lm_prompt_ids(model, tok, text)
        assert all(type(t) is int for t in ids)


def test_bos_is_added_once_and_never_when_resuming(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["bos"])
    bos = tok.convert_tokens_to_ids(EOS)
    plain = to_token_ids(tok, "the agent")
    assert plain[0] == bos and plain[1] != bos
    assert to_token_ids(tok, EOS + "the agent") == plain  # text that starts with BOS gets no second one
    resumed = to_token_ids(tok, "the agent", resume=True)
    assert resumed == plain[1:] and bos not in resumed


def test_token_id_forms_are_all_accepted(tokenizer):
    ids = [5, 17, 300, 0, 511]
    for form in (
        ids,
        tuple(ids),
        range(3, 9),
        mx.array(ids),
        mx.array(ids, dtype=mx.int64),
        mx.array(ids, dtype=mx.uint32),
        np.array(ids),
        np.array(ids, dtype=np.int32),
        [np.int64(t) for t in ids],
        mx.arange(12)[::3],  # a strided view
    ):
        got = to_token_ids(tokenizer, form)
        assert got == [int(t) for t in (form.tolist() if hasattr(form, "tolist") else form)]
        assert all(type(t) is int for t in got)


def test_vocab_bound_is_the_given_size_else_the_tokenizer(tokenizer):
    assert to_token_ids(tokenizer, [len(tokenizer) - 1]) == [len(tokenizer) - 1]
    with pytest.raises(InvalidRequestError, match=r"\[0, 512\)"):
        to_token_ids(tokenizer, [len(tokenizer)])
    assert to_token_ids(tokenizer, [600], vocab_size=1024) == [600]
    with pytest.raises(InvalidRequestError, match=r"\[0, 100\)"):
        to_token_ids(tokenizer, [5, 100], vocab_size=100)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (b"hello", "bytes prompt is ambiguous"),
        (bytearray(b"hello"), "bytearray prompt is ambiguous"),
        (memoryview(b"hello"), "memoryview prompt is ambiguous"),
        ("", "empty"),
        ([], "empty"),
        ((), "empty"),
        (mx.array([], dtype=mx.int32), "empty"),
        ("a\ud800b", "not valid Unicode"),
        ("\udfff", "not valid Unicode"),
        ([1, True, 3], "must be ints"),
        ([1.0, 2.0], "must be ints"),
        ([1, "2"], "must be ints"),
        ([1, None], "must be ints"),
        ([-1, 4], r"must be in \[0, 512\)"),
        ([4, 512], r"must be in \[0, 512\)"),
        ([2**70], r"must be in \[0, 512\)"),
        (mx.array([1.0, 2.0]), "must be integers"),
        (mx.array([True, False]), "must be integers"),
        (mx.array([[1, 2]]), "must be 1-D"),
        (mx.array(3), "must be 1-D"),
        (np.array([1.5]), "must be integers"),
        (np.array([True]), "must be integers"),
        (np.array([[1, 2]]), "must be 1-D"),
        (None, "got NoneType"),
        (7, "got int"),
        ({1, 2}, "got set"),
        ({"role": "user", "content": "hi"}, "got dict"),  # one message, not a list of them
    ],
)
def test_malformed_prompts_are_refused(tokenizer, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        to_token_ids(tokenizer, prompt)


def test_resume_text_and_template_arguments_need_the_right_prompt(tokenizer):
    with pytest.raises(InvalidRequestError, match="chat messages only"):
        to_token_ids(tokenizer, "hello", tools=TOOLS)
    with pytest.raises(InvalidRequestError, match="chat messages only"):
        to_token_ids(tokenizer, [1, 2], chat_template_kwargs={"x": 1})
    with pytest.raises(InvalidRequestError, match="cannot be appended"):
        to_token_ids(tokenizer, MESSAGES, resume=True)
    with pytest.raises(InvalidRequestError, match="vocab_size"):
        to_token_ids(tokenizer, [1], vocab_size=0)


# ------------------------------------------------------------------ chat


def test_chat_messages_render_with_the_template(tokenizer):
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert to_token_ids(tokenizer, MESSAGES) == expected
    assert to_token_ids(tokenizer, tuple(MESSAGES)) == expected


def test_content_parts_are_joined_as_mlx_lm_server_joins_them(tokenizer):
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "you "}, {"type": "text", "text": "plan"}]},
        {"role": "user", "content": [{"type": "text", "text": "the agent reads a file"}]},
    ]
    original = json.dumps(parts)
    assert to_token_ids(tokenizer, parts) == to_token_ids(tokenizer, MESSAGES)
    assert json.dumps(parts) == original  # the caller's messages are not changed


def test_tool_calls_without_content_and_extra_keys_reach_the_template(tokenizer):
    messages = [
        {"role": "user", "content": "read it"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "function": {"name": "read_file", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "file text", "tool_call_id": "1"},
    ]
    assert chat_messages(messages)[1] == {**messages[1], "content": ""}
    expected = tokenizer.apply_chat_template(chat_messages(messages), add_generation_prompt=True)
    assert to_token_ids(tokenizer, messages) == expected


def test_tools_and_template_arguments_go_to_the_template(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["strict"])
    with_tools = to_token_ids(tok, MESSAGES, tools=TOOLS)
    assert with_tools == tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True)
    assert "read_file" in tok.decode(with_tools) and with_tools != to_token_ids(tok, MESSAGES)
    thinking = to_token_ids(tok, MESSAGES, chat_template_kwargs={"think": True})
    assert tok.decode(thinking).endswith("<|im_start|>assistant\n<think>")
    no_prompt = to_token_ids(tok, MESSAGES, chat_template_kwargs={"add_generation_prompt": False})
    assert not tok.decode(no_prompt).endswith("assistant\n")


def test_a_failing_template_gives_its_reason(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["strict"])
    with pytest.raises(InvalidRequestError, match="chat template failed.*unknown role critic"):
        to_token_ids(tok, [{"role": "critic", "content": "hi"}])


def test_no_chat_template_is_refused(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["no_template"])
    with pytest.raises(InvalidRequestError, match="no chat template"):
        to_token_ids(tok, MESSAGES)
    assert to_token_ids(tok, "the agent")  # text still works


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "hi"}, "not a dict"], "message 1 must be a dict"),
        ([{"content": "hi"}], "non-empty string 'role'"),
        ([{"role": "", "content": "hi"}], "non-empty string 'role'"),
        ([{"role": 3, "content": "hi"}], "non-empty string 'role'"),
        ([{"role": "user", "content": 5}], "'content' must be a string or a list of text parts"),
        ([{"role": "user", "content": b"hi"}], "'content' must be a string or a list of text parts"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "only text parts.*'image_url'",
        ),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "only text parts.*'input_audio'"),
        ([{"role": "user", "content": ["hi"]}], "part 0: expected a dict"),
        ([{"role": "user", "content": [{"type": "text"}]}], "'text' must be a string"),
        ([{"role": "user", "content": "a\ud800"}], "chat message 0 is not valid Unicode"),
        ([{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}], "not valid Unicode"),
    ],
)
def test_malformed_messages_are_refused(tokenizer, messages, message):
    with pytest.raises(InvalidRequestError, match=message):
        to_token_ids(tokenizer, messages)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tools": "read_file"}, "tools must be a list"),
        ({"tools": [1]}, "tools must be a list"),
        ({"tools": {"type": "function"}}, "tools must be a list"),
        ({"chat_template_kwargs": {"tokenize": False}}, "may not set"),
        ({"chat_template_kwargs": {"tools": TOOLS}}, "use tools="),
        ({"chat_template_kwargs": ["x"]}, "must be a dict"),
    ],
)
def test_bad_template_arguments_are_refused(tokenizer, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        to_token_ids(tokenizer, MESSAGES, **kwargs)


def test_as_id_list_with_only_required_arguments():
    assert as_id_list(mx.array([3, 4])) == [3, 4]
    assert chat_messages([{"role": "user", "content": None}]) == [{"role": "user", "content": ""}]


def test_a_plain_hugging_face_tokenizer_gives_the_same_ids(tokenizer):
    """Its apply_chat_template returns a BatchEncoding (transformers 5), not a list: the ids are the same."""
    raw = tokenizer._tokenizer
    for prompt in ("the agent reads", MESSAGES, [5, 6, 7]):
        assert to_token_ids(raw, prompt) == to_token_ids(tokenizer, prompt)
