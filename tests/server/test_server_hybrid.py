"""``blockpool serve`` on a hybrid model (gated delta net + attention): mlx-lm's output, and the agent's
second turn resumes from its recurrent checkpoint instead of prefilling its history again."""

from __future__ import annotations

import copy

import pytest
from server_process import ServerProcess

from blockpool.demo_model import write_model_dir
from conftest import Reference
from family_configs import FAMILY_CONFIGS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    path = write_model_dir(tmp_path_factory.mktemp("qwen3_5-serve"), copy.deepcopy(FAMILY_CONFIGS["qwen3_5"]))
    base = tmp_path_factory.mktemp("serve-hybrid")
    server = ServerProcess.blockpool(path, base / "cache", base / "server.log").start()
    yield server, Reference(path)
    server.stop(timeout=60)


def test_a_hybrid_agent_resumes_its_second_turn(hybrid):
    server, reference = hybrid
    client = server.openai()
    messages = [{"role": "user", "content": "the agent reads a file and writes a plan"}]
    first = client.chat.completions.create(model="default_model", messages=messages, max_tokens=12, user="h")
    text, _ = reference.chat(messages, 12)
    assert first.choices[0].message.content == text
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "go on"}]
    second = client.chat.completions.create(model="default_model", messages=messages, max_tokens=12, user="h")
    assert second.choices[0].message.content == reference.chat(messages, 12)[0]
    assert second.usage.prompt_tokens_details.cached_tokens > 0
