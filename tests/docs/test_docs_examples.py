"""Docs are tests: every ```python block in README.md and docs/*.md runs, as written.

Rules (also stated in docs/quickstart.md, "Tests and benchmarks"):

- A block fenced as ```python runs. Any other language (```bash, ```text,
  ```pycon, ...) does not; that is how a page marks shell commands, output
  samples and anything else that must not run. A block with no language at
  all must not be Python (checked below), so no example can hide there.
- The blocks of one page run in order in one namespace, as a reader pastes
  them into one session, in a fresh temporary working directory.
- The only thing swapped is the model source: ``mlx_lm.load(...)`` loads
  the tiny test llama instead of what the example names. The swap is the
  ``tiny_model_for_docs`` fixture of ``tests/docs/doc_models.py``; each test
  asserts that the example went through it.
- A page whose examples talk to ``blockpool serve`` at its documented
  address (``127.0.0.1:8080``) runs as its reader runs it: the server is
  started as the page says, with the same one swap (``--model`` is the tiny
  model's directory), and the blocks run against it. On Linux both run in
  a private network namespace (``unshare -rn``), so the documented port is
  free whatever else runs on the machine.
- Where a page states a result (which cache an agent resumed from, what is
  prefilled, that output equals mlx-lm's), ``CHECKS`` below verifies it on
  what the example left behind.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import mlx_lm
import pytest
from doc_models import doc_model_dir, tiny_model_for_docs  # noqa: F401 - fixtures, used by name

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")


def fenced_blocks(page: Path) -> list[tuple[int, str, str]]:
    """``(line, language, code)`` for every fenced block of a markdown page (1-based line of the fence)."""
    blocks, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, language = opening["fence"], (opening["info"].split() or [""])[0].lower()
        body, j = [], i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip().strip(fence[0])
        ):
            body.append(lines[j])
            j += 1
        blocks.append((i + 1, language, textwrap.dedent("\n".join(body))))
        i = j + 1
    return blocks


def python_pages() -> list[Path]:
    return [page for page in PAGES if any(lang == "python" for _, lang, _ in fenced_blocks(page))]


#: Where ``blockpool serve`` listens by default; a page whose examples use it needs a server.
SERVER_ADDRESS = "127.0.0.1:8080"


def needs_server(page: Path) -> bool:
    return any(lang == "python" and SERVER_ADDRESS in code for _, lang, code in fenced_blocks(page))


_SERVED_PAGE = """
import contextlib, io, json, subprocess, sys, time, traceback, urllib.request
model_dir, cache_dir, log_path, blocks_path = sys.argv[1:5]
with open(log_path, "ab") as log:
    command = [sys.executable, "-m", "blockpool", "serve", "--model", model_dir, "--cache-dir", cache_dir]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
try:
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit("the server did not start: see " + log_path)
        try:
            if urllib.request.urlopen("http://%s/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.2)
    out, namespace = io.StringIO(), {"__name__": "__main__"}
    with contextlib.redirect_stdout(out):
        for name, code in json.load(open(blocks_path)):
            exec(compile(code, name, "exec"), namespace)
    print(json.dumps({"out": out.getvalue()}))
finally:
    server.terminate()
    server.wait(60)
""".replace("%s", SERVER_ADDRESS)


def run_served_page(page: Path, model_dir: Path, tmp_path: Path) -> str:
    """Run a page's blocks in a child process next to ``blockpool serve --model <tiny model>``; their stdout."""
    blocks = [
        (f"{page.relative_to(ROOT)}:{line}", code) for line, lang, code in fenced_blocks(page) if lang == "python"
    ]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(_SERVED_PAGE)
    log = tmp_path / "server.log"
    command = [
        sys.executable,
        str(tmp_path / "runner.py"),
        str(model_dir),
        str(tmp_path / "agents"),
        str(log),
        str(tmp_path / "blocks.json"),
    ]
    if (
        shutil.which("unshare")
        and shutil.which("ip")
        and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    ):
        command = ["unshare", "-rn", "sh", "-c", "ip link set lo up && exec " + shlex.join(command)]
    else:
        host, port = SERVER_ADDRESS.split(":")
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                pytest.skip(
                    f"{SERVER_ADDRESS} is taken and there are no network namespaces to give the example its own"
                )
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    server_log = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n--- server log ---\n{server_log}"
    return json.loads(result.stdout.strip().splitlines()[-1])["out"]


# ------------------------------------------------------------------ what the pages claim, checked


def check_readme(namespace: dict, out: str) -> None:
    lines = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("planner", "critic")]
    assert len(lines) == 6, out  # two agents, three turns: one line per completion
    sources = [line[1] for line in lines]
    assert sources[:2] == ["cold", "cold"] and set(sources[2:]) <= {"pool", "shared"}, sources  # later turns resume
    assert all(len(messages) == 7 for messages in namespace["chats"].values())


def check_quickstart(namespace: dict, out: str) -> None:
    model, tokenizer = namespace["model"], namespace["tokenizer"]
    again = namespace["again"]
    # "only ' and then?' is prefilled": the history is resumed, the new text has no BOS.
    assert again.prompt_tokens == len(tokenizer.encode(" and then?", add_special_tokens=False))
    assert again.cached_tokens > 0
    assert out.split()[0] == "cold"  # the store's first turn for "a" starts cold
    assert namespace["text"] == mlx_lm.generate(model, tokenizer, "Hello", max_tokens=32)  # the drop-in equals mlx-lm


def check_agent_memory(namespace: dict, out: str) -> None:
    (line,) = out.splitlines()
    assert line.split()[:2] == ["coder", "cold"]
    assert (
        not any(Path("agents").glob("*.tmp")) and len(list(Path("agents").glob("*.safetensors"))) == 1
    )  # closed: persisted


def check_server(namespace: dict, out: str) -> None:
    turns = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"]) and "resumed;" in line]
    assert [t[0] for t in turns] == ["0", "1"], out
    assert int(turns[1][1]) > 0, out  # the second turn resumed the agent's cache


def check_models(namespace: dict, out: str) -> None:
    first, second = out.splitlines()
    layers = tuple(range(namespace["spec"].num_layers))
    assert first == f"True {layers}" and namespace["engine"].paged.layers == layers  # every layer pages
    assert second == "False turned off (paged=False)"


CHECKS: dict[str, Callable[[dict, str], None]] = {
    "README.md": check_readme,
    "quickstart.md": check_quickstart,
    "agent_memory.md": check_agent_memory,
    "server.md": check_server,
    "models.md": check_models,
}


# ------------------------------------------------------------------ the tests


def test_the_pages_with_examples_are_found():
    names = {page.name for page in python_pages()}
    assert {"README.md", "quickstart.md", "agent_memory.md"} <= names
    assert set(CHECKS) <= names


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: p.name)
def test_page_examples_run_as_written(page, tiny_model_for_docs, doc_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    if needs_server(page):
        out = run_served_page(page, doc_model_dir, tmp_path)
    else:
        for line, language, code in fenced_blocks(page):
            if language == "python":
                exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        out = capsys.readouterr().out
        assert tiny_model_for_docs, "the example loaded no model (the swap was not exercised)"
    check = CHECKS.get(page.name)
    if check is not None:
        check(namespace, out)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_blocks_without_a_language_are_not_python(page):
    for line, language, code in fenced_blocks(page):
        if language or not code.strip():
            continue
        try:
            compile(code, f"{page.name}:{line}", "exec")
        except SyntaxError:
            continue
        pytest.fail(
            f"{page.name}:{line}: a block without a language is valid Python; fence it as ```python (runs) or ```text"
        )


def test_fence_parser_on_a_sample(tmp_path):
    sample = tmp_path / "sample.md"
    sample.write_text("text\n```python\nx = 1\n```\n  ~~~bash\n  echo hi\n  ~~~\n````\n```\ninner\n````\n")
    assert fenced_blocks(sample) == [(2, "python", "x = 1"), (5, "bash", "echo hi"), (8, "", "```\ninner")]
