"""`mlx-diffgemma serve` at its edges, through raw HTTP and the official `openai` client:
a huge prompt refused at once and without a memory spike, request bodies that are valid
JSON but no request (text that is no text, nesting without end), the API key's scheme,
tool messages, images refused for what is wrong with them, /health while a request runs,
a speculative server's draft steps, and SIGTERM with a stream open.

The memory test measures the server process itself (Linux /proc): its resident size
idle, its peak while refusing a 15 MiB body (VmHWM, reset through clear_refs, and a
sampler beside it) and after.
"""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
import requests  # noqa: E402
from PIL import Image  # noqa: E402
from servers import REPO, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow  # starts servers

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOY = REPO / "mlx_diffgemma" / "assets" / "toy-sudoku" / "mlx"
TARGET = REPO / "benchmarks" / "toy-sudoku-target"
PUZZLE, SOLUTION = "1.3.34..2.4.4.1.", "1234342121434312"
MIB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("served-images")
    Image.new("RGB", (32, 32), "red").save(d / "red.png")
    (d / "cut.png").write_bytes((d / "red.png").read_bytes()[:60])
    (d / "notes.png").write_text("not an image at all")
    return d


@pytest.fixture(scope="module")
def server(images):
    proc, url = start_server("--api-key", KEY, "--image-dir", str(images), "--max-context", "100000")
    try:
        yield proc, url
    finally:
        stop_server(proc)


def _post(url: str, body, path: str = "/v1/chat/completions", headers=None, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url + path, data=data, timeout=180,
                         headers={"Content-Type": "application/json", **AUTH, **(headers or {})}, **kw)


def _error(resp, status: int, param=None, code=None) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code, err
    return err["message"]


def _ask(content) -> dict:
    return {"model": "toy-sudoku", "messages": [{"role": "user", "content": content}], "seed": 3}


def _still_serves(url: str) -> None:
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    r = c.chat.completions.create(**_ask(PUZZLE))
    assert r.choices[0].message.content == SOLUTION


# -- a prompt far over the context -------------------------------------------------------------


def _status(pid: int, key: str) -> int:
    """VmRSS, VmHWM ... of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_a_15_mib_prompt_is_refused_at_once_without_a_memory_spike(server, endpoint):
    """The 400 context_length_exceeded comes before any tokenization: in under 2 s, the
    server's resident memory within 200 MB of its idle size at its peak and after."""
    proc, url = server
    _still_serves(url)  # warm: the model, its tokenizer and the template are in use
    text = "x" * (15 * MIB - 200)
    body = _ask(text) if endpoint == "chat" else {"model": "toy-sudoku", "prompt": text}
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    raw = json.dumps(body).encode()
    assert 14.9 * MIB < len(raw) < 15 * MIB + 1024
    time.sleep(0.5)
    idle = _status(proc.pid, "VmRSS")
    try:
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        hwm = True
    except OSError:
        hwm = False
    peak, done = [idle], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(_status(proc.pid, "VmRSS"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tic = time.perf_counter()
    resp = _post(url, raw, path)
    elapsed = time.perf_counter() - tic
    done.set()
    sampler.join()
    top = max(max(peak), _status(proc.pid, "VmHWM") if hwm else 0)
    after = _status(proc.pid, "VmRSS")
    print(f"refused in {elapsed:.3f} s; RSS idle {idle / MIB:.0f} MiB, peak {top / MIB:.0f} MiB, "
          f"after {after / MIB:.0f} MiB")
    message = _error(resp, 400, "messages" if endpoint == "chat" else "prompt", "context_length_exceeded")
    assert elapsed < 2.0
    assert top - idle < 200e6 and after - idle < 200e6
    assert message.startswith("prompt too long: at least ") and "exceed the 512-token context" in message
    _still_serves(url)


# -- bodies that are JSON but no request ---------------------------------------------------------


def test_text_that_is_no_text_and_endless_nesting_are_400s(server):
    _, url = server
    lone = b'{"model": "toy-sudoku", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    message = _error(_post(url, lone), 400, "messages")
    assert message.startswith("messages[0].content is not valid text: it holds a lone UTF-16 surrogate")
    _error(_post(url, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}'), 400, "stop")
    _error(_post(url, b'{"prompt": "\\udc00x"}', "/v1/completions"), 400, "prompt")
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "nests deeper than 64 levels" in _error(_post(url, deep), 400, None, "invalid_json")
    nested = {"type": "object"}
    for _ in range(70):
        nested = {"type": "object", "properties": {"x": nested}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": nested}}]
    _error(_post(url, dict(_ask(PUZZLE), tools=tools)), 400, None, "invalid_json")
    # With the official client (which cannot send a lone surrogate): the same 400, as an
    # exception naming the problem.
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="nests deeper than 64 levels"):
        c.chat.completions.create(model="toy-sudoku", messages=[{"role": "user", "content": PUZZLE}], tools=tools)
    _still_serves(url)


def test_a_tool_message_needs_its_call_id(server):
    _, url = server
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": PUZZLE}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "content": "42"}]
    message = _error(_post(url, {"messages": messages}), 400, "messages")
    assert message == "messages[2]: a tool message needs the tool_call_id of the call it answers"
    messages[2]["tool_call_id"] = "call_1"
    assert _post(url, {"messages": messages, "max_tokens": 4}).status_code == 200


def test_the_bearer_scheme_is_case_insensitive(server):
    _, url = server
    for scheme in ("bearer", "BEARER", "Bearer", "bEaReR"):
        r = requests.get(url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=30)
        assert r.status_code == 200, scheme
    for header in (f"Basic {KEY}", KEY, "Bearer wrong", f"Bearer{KEY}", ""):
        r = requests.get(url + "/v1/models", headers={"Authorization": header}, timeout=30)
        _error(r, 401, None, "invalid_api_key")


# -- images ----------------------------------------------------------------------------------------


def _image_request(url_or_path: str) -> dict:
    return _ask([{"type": "image_url", "image_url": {"url": url_or_path}}, {"type": "text", "text": "what?"}])


def test_images_are_refused_for_what_is_wrong_with_them(server, images):
    """toy-sudoku takes no images: a good file is refused saying so, and a bad one for
    its own problem, which a user can fix."""
    _, url = server
    png = base64.b64encode((images / "red.png").read_bytes()).decode()
    cases = {
        f"file://{images / 'red.png'}": "this model takes no images: its tokenizer has no <|image|> token",
        f"data:image/png;base64,{png}": "this model takes no images",
        str(images / "cut.png"): "is truncated or damaged",
        str(images / "notes.png"): "is not an image Pillow can read",
        str(images / "missing.png"): "image file not found",
        "data:image/png;base64,!!not base64!!": "data URL",
    }
    for source, expected in cases.items():
        message = _error(_post(url, _image_request(source)), 400, "messages", "invalid_image")
        assert expected in message and "use the tokenizer that ships" not in message, (source, message)
    _still_serves(url)


def test_generate_refuses_an_image_for_toy_sudoku_by_what_is_missing(images, capsys):
    from mlx_diffgemma import cli

    assert cli.main(["generate", "--model", "toy-sudoku", "--image", str(images / "red.png"), "-p", PUZZLE]) == 2
    err = capsys.readouterr().err
    assert "this model takes no images: its tokenizer has no <|image|> token" in err
    assert cli.main(["generate", "--model", "toy-sudoku", "--image", str(images / "cut.png"), "-p", PUZZLE]) == 2
    assert "is truncated or damaged" in capsys.readouterr().err


# -- /health, the log ------------------------------------------------------------------------------


def _long_stream(url: str, **extra):
    """A streaming request that runs for a while (no EOS, no early stop, many canvases)."""
    body = dict(_ask(PUZZLE), stream=True, max_tokens=440, ignore_eos=True, confidence_threshold=1e-9, **extra)
    return _post(url, body, stream=True)


def test_health_tells_the_running_request_from_the_waiting_ones(server):
    """Four long streams fill the four rows of the default --max-batch; a fifth waits."""
    proc, url = server
    streams = []
    for _ in range(4):
        streams.append(_long_stream(url))
        lines = streams[-1].iter_lines()
        next(line for line in lines if line.startswith(b"data:"))  # it runs
    streams.append(_long_stream(url))  # queued behind them
    deadline = time.time() + 30
    while time.time() < deadline:
        health = requests.get(url + "/health", timeout=10).json()
        if health["waiting"] == 1 and health["running"] == 4:
            break
        time.sleep(0.05)
    assert health["running"] == 4 and health["waiting"] == 1 and health["max_batch"] == 4, health
    for stream in streams:
        stream.close()
    while time.time() < deadline:
        health = requests.get(url + "/health", timeout=10).json()
        if health["running"] == health["waiting"] == 0:
            break
        time.sleep(0.05)
    assert health["running"] == health["waiting"] == 0, health
    # The --max-context over the model's was said at the start, not clamped in silence.
    assert any("a 100,000-token context was asked for, but the model's is 512 tokens: using 512" in line
               for line in proc.output)


def test_sigterm_ends_an_open_stream_with_an_error_and_says_so():
    proc, url = start_server("--api-key", KEY, "--max-batch", "1")  # the second request waits
    try:
        stream = _long_stream(url, stream_drafts=True)
        events = stream.iter_lines()
        first = [next(e for e in events if e.startswith(b"data:")) for _ in range(3)]
        waiting = {}
        queued = threading.Thread(target=lambda: waiting.update(r=_post(url, dict(_ask(PUZZLE), max_tokens=440,
                                                                            ignore_eos=True))))
        queued.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        rest = [e for e in events if e.startswith(b"data:")]
        queued.join(60)
        assert proc.wait(60) == 0, "".join(proc.output)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(first) == 3 and rest[-1] == b"data: [DONE]"
    error = json.loads(rest[-2][len(b"data: "):])["error"]
    assert error["code"] == "server_shutting_down" and "SIGTERM" in error["message"]
    _error(waiting["r"], 503, None, "server_shutting_down")
    log = "".join(proc.output)
    assert "SIGTERM: shutting down; 1 running and 1 waiting request(s) end with an error" in log
    assert "mlx-diffgemma serve: stopped" in log and "Traceback" not in log


# -- a speculative server -----------------------------------------------------------------------------


def test_speculative_drafts_count_the_draft_steps():
    """With --target and --draft-steps 3, each round's drafts say step 1, 2, ... up to 3,
    as the plain server's drafts count its denoising steps."""
    proc, url = start_server("--target", str(TARGET), "--draft-steps", "3", "--draft-tokens", "4")
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        chunks = list(c.chat.completions.create(
            model="toy-sudoku", messages=[{"role": "user", "content": PUZZLE}], stream=True, temperature=0,
            extra_body={"stream_drafts": True}))
    finally:
        stop_server(proc)
    drafts = [ch.model_extra["draft"] for ch in chunks if "draft" in (ch.model_extra or {})]
    assert drafts
    rounds = {}
    for d in drafts:
        rounds.setdefault(d["canvas_index"], []).append(d["step"])
    for steps in rounds.values():
        assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 3, rounds
