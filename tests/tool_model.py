"""A tiny model trained, in seconds, to call tools and to think: the server's tool-call and reasoning tests.

Its tokenizer is the suite's byte-level BPE with five more special tokens
(``<tool_call>``, ``</tool_call>``, ``<think>``, ``</think>``, ``<|im_end|>``
as its end of turn), a chat template that renders tools, tool calls and tool
results as Qwen's does, and ``tool_parser_type: json_tools`` in its
``tokenizer_config.json``, so mlx-lm's ``load`` gives it a tool parser and
think markers. A 2-layer llama is then trained with Adam on a few
conversations (:data:`LESSONS`) until greedy decoding reproduces each answer;
the builder checks that it does, with mlx-lm's own generation, before any
test uses the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from blockpool import demo_model

END = "<|im_end|>"
SPECIAL = ["<|endoftext|>", "<|im_start|>", END, "<tool_call>", "</tool_call>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\ntools:"
    "{% for t in tools %} {{ t['function']['name'] }}{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{%- if m.get('content') %}{{ m['content'] }}{% endif %}"
    "{%- for c in m.get('tool_calls') or [] %}<tool_call>"
    '{"name": {{ c["function"]["name"] | tojson }}, "arguments": {{ c["function"]["arguments"] | tojson }}}'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m['role'] == 'tool' %}<|im_start|>tool\n{{ m['content'] }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{% endif %}"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOLS = [WEATHER_TOOL]

ASK = [{"role": "user", "content": "the weather in paris"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "paris"}}</tool_call>'
ASK_TWO = [{"role": "user", "content": "the weather in paris and rome"}]
CALL_TWO = (
    '<tool_call>{"name": "get_weather", "arguments": {"city": "paris"}}</tool_call>'
    '<tool_call>{"name": "get_weather", "arguments": {"city": "rome"}}</tool_call>'
)
CALL_MESSAGE = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny and 21 degrees"}
AFTER_RESULT = ASK + [CALL_MESSAGE, RESULT]
ANSWER = "it is sunny in paris"
PREAMBLE = [{"role": "user", "content": "check the weather for paris please"}]
PREAMBLE_ANSWER = "let me check. " + CALL
THINK_ASK = [{"role": "user", "content": "why do agents share blocks"}]
THOUGHT = "the pool holds one copy"
THINK_ANSWER = f"<think>{THOUGHT}</think>to save memory"

#: (messages, tools, the answer the model learns to give).
LESSONS = [
    (ASK, TOOLS, CALL),
    (ASK_TWO, TOOLS, CALL_TWO),
    (AFTER_RESULT, TOOLS, ANSWER),
    (PREAMBLE, TOOLS, PREAMBLE_ANSWER),
    (THINK_ASK, None, THINK_ANSWER),
]

CONFIG = {
    "model_type": "llama",
    "vocab_size": demo_model.VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=demo_model.VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_model.corpus() + [json.dumps(WEATHER_TOOL)] * 4, trainer)
    return tok.to_str()


def write_tool_model_dir(path: Path, steps: int = 400) -> Path:
    """Write the tool-calling model's directory, trained and checked; return its path.

    ``steps=0`` writes it untrained (its tokenizer, template and parser are all
    that the output-splitting unit tests need).
    """
    from mlx_lm import load

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_json = _tokenizer_json()
    (path / "tokenizer.json").write_text(tokenizer_json)
    ids = {t["content"]: t["id"] for t in json.loads(tokenizer_json)["added_tokens"]}
    (path / "config.json").write_text(json.dumps({**CONFIG, "eos_token_id": ids[END], "bos_token_id": ids[END]}))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": END,
        "bos_token": END,
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
        "tool_parser_type": "json_tools",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model_class, args_class = _get_classes(CONFIG)
    mx.random.seed(1)
    model = model_class(args_class.from_dict(CONFIG))  # mlx's default init: it trains faster than the scaled one
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    _, tokenizer = load(str(path))
    examples = []
    for messages, tools, answer in LESSONS:
        prompt = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        target = tokenizer.encode(answer + END, add_special_tokens=False)
        examples.append((prompt, target))
    if steps:
        _train(model, examples, steps)
        mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
        _check(path, examples)
    return path


def _train(model: nn.Module, examples: list[tuple[list[int], list[int]]], steps: int) -> None:
    width = max(len(p) + len(t) for p, t in examples)
    inputs, targets, masks = [], [], []
    for prompt, target in examples:
        sequence = prompt + target
        pad = width - len(sequence)
        inputs.append(sequence[:-1] + [0] * pad)
        targets.append(sequence[1:] + [0] * pad)
        masks.append([0] * (len(prompt) - 1) + [1] * len(target) + [0] * pad)
    x, y, m = mx.array(inputs), mx.array(targets), mx.array(masks, dtype=mx.float32)

    def loss_fn(model: nn.Module) -> mx.array:
        losses = nn.losses.cross_entropy(model(x), y, reduction="none")
        return (losses * m).sum() / m.sum()

    optimizer = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(steps):
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if loss.item() < 1e-3:
            break


def _check(path: Path, examples: list[tuple[list[int], list[int]]]) -> None:
    from mlx_lm import load

    from mlx_lm_reference import mlx_lm_tokens

    model, tokenizer = load(str(path))
    for prompt, target in examples:
        got = mlx_lm_tokens(model, tokenizer, prompt, max_tokens=len(target) + 2)
        if got != target:
            raise AssertionError(
                f"the tool model did not learn its lesson: {tokenizer.decode(got)!r} != {tokenizer.decode(target)!r}"
            )
