"""A concurrent multi-agent chat workload against an OpenAI-compatible server, timed as a client sees it.

Each agent is a thread that holds a conversation: a shared system prompt,
then ``turns`` user messages, each sent with the whole conversation so far
(as agent frameworks do) and streamed back. Agents run concurrently; an
agent's turns run one after another. Recorded: the wall time of the whole
workload, each request's time to first token (the first chunk carrying
text), every answer, so that two servers can be checked for the same text
and a server for mlx-lm's text, and each request's prompt and cached
tokens as the server's usage reports them (``prefilled_tokens``: what it
computed).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "server"))
from server_process import ServerProcess  # noqa: E402  (the server tests' subprocess harness)

__all__ = ["ServerProcess", "ChatWorkload", "WorkloadResult", "system_prompt"]


def system_prompt(words: int, tag: str) -> str:
    """A system prompt of about ``words`` words, starting with ``tag`` (so rounds share nothing)."""
    body = " ".join(f"rule {i}: keep notes, cite files, answer briefly." for i in range(words // 7 + 1))
    return f"{tag}. {body}"


@dataclass
class WorkloadResult:
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    answers: dict[tuple[str, int], str] = field(default_factory=dict)
    conversations: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens the server computed rather than took from its cache, over every request."""
        return sum(self.prompt_tokens) - sum(self.cached_tokens)


@dataclass
class ChatWorkload:
    """``agents`` agents x ``turns`` turns of ``max_tokens`` tokens each, after one shared system prompt."""

    agents: int = 6
    turns: int = 3
    max_tokens: int = 16
    system_words: int = 700
    logit_bias: dict[str, float] | None = None  # e.g. to keep EOS out, so every answer has max_tokens tokens

    def run(self, server: ServerProcess, tag: str, timeout: float = 300) -> WorkloadResult:
        """Run the whole workload once against ``server``; ``tag`` makes its prompts unique."""
        system = system_prompt(self.system_words, tag)
        result = WorkloadResult(0.0)
        lock = threading.Lock()

        def agent(index: int) -> None:
            client = server.openai()
            name = f"{tag}-agent-{index}"
            messages = [{"role": "system", "content": system}]
            for turn in range(self.turns):
                messages.append(
                    {
                        "role": "user",
                        "content": f"agent {index}, turn {turn}: what does the next step change in the parser?",
                    }
                )
                sent = time.perf_counter()
                first, parts, usage = None, [], None
                try:
                    stream = client.chat.completions.create(
                        model="default_model",
                        messages=messages,
                        max_tokens=self.max_tokens,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_headers={"X-Agent-Id": name},
                        **({"logit_bias": self.logit_bias} if self.logit_bias else {}),
                    )
                    for chunk in stream:
                        usage = chunk.usage or usage
                        text = chunk.choices[0].delta.content if chunk.choices else None
                        if text:
                            first = first or time.perf_counter()
                            parts.append(text)
                except Exception as e:  # counted as lost
                    with lock:
                        result.errors.append(f"{name} turn {turn}: {type(e).__name__}: {e}")
                    return
                answer = "".join(parts)
                with lock:
                    result.conversations[(name, turn)] = [dict(m) for m in messages]
                    result.answers[(name, turn)] = answer
                    if first is not None:
                        result.ttft_s.append(first - sent)
                    if usage is not None:
                        result.prompt_tokens.append(usage.prompt_tokens)
                        details = usage.prompt_tokens_details
                        result.cached_tokens.append((details.cached_tokens or 0) if details else 0)
                messages.append({"role": "assistant", "content": answer})

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(self.agents)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        result.wall_s = time.perf_counter() - start
        if any(t.is_alive() for t in threads):
            result.errors.append(f"the workload did not finish within {timeout} s")
        return result
