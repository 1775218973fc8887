"""No way in or down for a stranger: API keys, foreign web pages, slow and stalled clients, a connection limit."""

from __future__ import annotations

import socket
import time

import anthropic
import openai
import pytest
from server_process import ServerProcess, wait_until

pytestmark = pytest.mark.integration

KEY = "a-long-random-key"
HELLO = {"model": "default_model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
BEARER = {"Authorization": f"Bearer {KEY}"}
#: Headers that promise 500 bytes of body, and the first few of them.
PART_OF_A_BODY = (
    f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
).encode() + b'{"messages": '


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--api-key", KEY, "--header-timeout", "1", "--body-timeout", "1", "--max-connections", "12")


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection (recv gives b"") within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------- the key


@pytest.mark.parametrize(
    "method, path", [("GET", "/v1/models"), ("GET", "/v1/agents"), ("POST", "/v1/chat/completions")]
)
def test_without_the_key_every_route_but_health_is_401(server, method, path):
    status, body = server.request(method, path, HELLO if method == "POST" else None)
    assert status == 401 and body["error"]["type"] == "authentication_error", body
    assert server.last_headers.get("www-authenticate") == "Bearer"
    assert server.request("GET", "/health")[0] == 200


def test_a_wrong_key_is_401_in_anthropics_shape_on_messages(server):
    status, body = server.request("POST", "/v1/messages", HELLO, headers={"x-api-key": "wrong"})
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"


def test_the_official_clients_send_the_key_as_they_always_do(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(**HELLO).choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0).models.list()
    messages = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0).messages
    assert messages.create(**HELLO).stop_reason in ("end_turn", "max_tokens")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="nope", max_retries=0).messages.create(**HELLO)


def test_the_key_can_come_from_the_environment(model_dir, tmp_path):
    server = ServerProcess.blockpool(model_dir, tmp_path / "cache", tmp_path / "log")
    server.env["BLOCKPOOL_API_KEY"] = KEY
    server.start()
    try:
        assert server.request("GET", "/v1/models")[0] == 401
        assert server.request("GET", "/v1/models", headers=BEARER)[0] == 200
    finally:
        server.stop()


# ---------------------------------------------------------------- web pages


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1.evil.example:8080"])
def test_a_foreign_web_origin_is_refused_and_creates_no_agent(server, origin):
    headers = {**BEARER, "Origin": origin, "X-Agent-Id": "from-a-web-page"}
    status, body = server.request("POST", "/v1/chat/completions", HELLO, headers=headers)
    assert status == 403 and body["error"]["type"] == "permission_error", body
    _, agents = server.request("GET", "/v1/agents", headers=BEARER)
    assert all(row["id"] != "from-a-web-page" for row in agents["data"])


def test_a_local_origin_is_served(server):
    headers = {**BEARER, "Origin": "http://localhost:3000"}
    assert server.request("POST", "/v1/chat/completions", HELLO, headers=headers)[0] == 200


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"])
def test_a_body_that_is_not_json_by_content_type_is_415(server, kind):
    status, body = server.request("POST", "/v1/chat/completions", HELLO, headers={**BEARER, "Content-Type": kind})
    assert status == 415, body


# ---------------------------------------------------------------- slow clients


def test_a_connection_that_never_finishes_its_headers_is_closed(server):
    silent, partial = connect(server), connect(server)
    partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert closed_within(silent, 10) and closed_within(partial, 10)


def test_a_keep_alive_connection_stalling_in_its_second_request_is_closed(server):
    sock = connect(server)
    sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
    assert b"200 OK" in sock.recv(65536)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    assert closed_within(sock, 10)


def test_a_body_that_does_not_arrive_in_time_is_408(server):
    sock = connect(server)
    sock.sendall(PART_OF_A_BODY)
    sock.settimeout(10)
    assert b"408" in sock.recv(65536).split(b"\r\n")[0]


def test_a_client_gone_mid_body_is_one_info_line(server):
    before = server.log()
    for _ in range(5):
        sock = connect(server)
        sock.sendall(PART_OF_A_BODY)
        time.sleep(0.1)
        sock.close()
    wait_until(lambda: server.log().count("went away while sending") - before.count("went away while sending") == 5)
    new = server.log()[len(before) :]
    assert "Traceback" not in new and "ERROR" not in new, new


def test_stalled_clients_cannot_hold_the_server(server):
    # More stalled connections than --max-connections: while they are open new ones may get 503,
    # and once the header deadline closes them the server answers again.
    stalled = [connect(server) for _ in range(30)]
    for sock in stalled:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert all(closed_within(sock, 10) for sock in stalled)
    status, _ = server.request("POST", "/v1/chat/completions", HELLO, headers=BEARER)
    assert status == 200
    assert "Too many open files" not in server.log()


def test_past_max_connections_new_requests_get_503(server):
    held = [connect(server) for _ in range(14)]
    try:
        time.sleep(0.3)
        status, _ = server.request("GET", "/health")
        assert status == 503
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: server.request("GET", "/health")[0] == 200)


def test_a_body_over_32_mib_is_413(server):
    size = (32 << 20) + 1024
    sock = connect(server)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    )
    sock.sendall(head.encode())
    chunk = b" " * (1 << 20)
    try:
        for _ in range(size // len(chunk) + 1):
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed once past the limit
    sock.settimeout(10)
    assert b"413" in sock.recv(65536).split(b"\r\n")[0]
