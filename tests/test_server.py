"""`mlx-diffgemma serve` driven by the official `openai` client.

Most tests start the real command on a free localhost port with the packaged toy-sudoku
model (a trained 4x4 Sudoku solver: each reply is checkable). The prompt-cache test runs
the same server in this process, so that it can record the warm request's denoiser steps.

Warm against cold cache: the 2nd and 3rd requests of a growing conversation reuse the
cache the earlier ones left and encode only the new tokens, so their floats differ in
the last bits from a cold cache that encodes the whole prompt in one call, and exact
token equality between the two would be unfair (CI runs on several CPUs). The warm
request is therefore recorded step by step and replayed on a cold cache
(tests/teacher_forcing.py): same logits to float tolerance and every decision that is
certain under that difference. Requests whose floats are the same by construction (the
same request twice on the same cache path) are compared exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
import requests  # noqa: E402
from servers import ask_at_once, served_in_process, stop_server  # noqa: E402
from servers import start_server as _start  # noqa: E402

pytestmark = pytest.mark.slow  # starts servers

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "mlx_diffgemma" / "assets" / "toy-sudoku" / "mlx"
HELDOUT = json.loads((TOY / "heldout.json").read_text())["puzzles"]
PUZZLE, SOLUTION = HELDOUT[0]["puzzle"], HELDOUT[0]["solution"]


@pytest.fixture(scope="module")
def server():
    proc, url = _start("--max-body-mb", "1")
    try:
        yield url
    finally:
        stop_server(proc)


def _client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"),
                         max_retries=0, timeout=60, **kw)


def _ask(puzzle):
    return [{"role": "user", "content": puzzle}]


def test_models_health_and_context_from_config(server):
    config = json.loads((TOY / "config.json").read_text())
    models = _client(server).models.list().data
    assert [m.id for m in models] == ["toy-sudoku"]
    assert models[0].model_extra["context_length"] == config["text_config"]["max_position_embeddings"]
    health = requests.get(server + "/health", timeout=10).json()
    assert health["status"] == "ok"


def test_chat_and_completions_plain_and_streaming(server):
    c = _client(server)
    r = c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), seed=3, max_tokens=24)
    assert r.choices[0].message.content == SOLUTION
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 42 and r.usage.completion_tokens == 17  # 16 digits + <turn|>

    stream = c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), seed=3,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == SOLUTION and finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 17

    # Fast mode per request (an extra field, as the diffusion knobs are).
    r = c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), seed=3, max_tokens=24,
                                  extra_body={"mode": "fast"})
    assert r.choices[0].message.content == SOLUTION and r.choices[0].finish_reason == "stop"
    # Same request twice: the second finds its prompt in the cache (up to "<|turn>model\n").
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32

    prompt = f"<bos><|turn>user\n{PUZZLE}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    r = c.completions.create(model="toy-sudoku", prompt=prompt, seed=3)
    assert r.choices[0].text == SOLUTION and r.choices[0].finish_reason == "stop"
    parts = list(c.completions.create(model="toy-sudoku", prompt=prompt, seed=3, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == SOLUTION


def test_stop_and_max_tokens(server):
    c = _client(server)
    r = c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), seed=3,
                                  stop=[SOLUTION[5:8]])
    assert r.choices[0].message.content == SOLUTION[:5] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), seed=3, max_tokens=6)
    assert r.choices[0].message.content == SOLUTION[:6] and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6


def test_eight_concurrent_clients_each_get_their_answer(server):
    puzzles = [p for p in HELDOUT if p["blanks"] <= 6][:8]
    assert len({p["solution"] for p in puzzles}) > 1
    results = ask_at_once(lambda: _client(server), [p["puzzle"] for p in puzzles], join_s=120)
    assert results == {i: p["solution"] for i, p in enumerate(puzzles)}


def _long_request(**kw):
    # No EOS and no early stop: 10 canvases of 48 steps each, long enough to walk out of.
    return dict(model="toy-sudoku", messages=_ask(PUZZLE), max_tokens=240, stream=True,
                extra_body=dict(ignore_eos=True, confidence_threshold=1e-9, **kw))


def test_client_disconnect_cancels_generation_and_frees_the_slot(server):
    before = requests.get(server + "/health", timeout=10).json()
    c = _client(server)
    stream = c.chat.completions.create(**_long_request(stream_drafts=True))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        health = requests.get(server + "/health", timeout=10).json()
        if health["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert health["cancelled"] == before["cancelled"] + 1
    tic = time.time()
    r = c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), seed=3)
    assert r.choices[0].message.content == SOLUTION and time.time() - tic < 10


def test_draft_stream_shows_each_denoising_step(server):
    chunks = list(_client(server).chat.completions.create(
        model="toy-sudoku", messages=_ask(PUZZLE), seed=3, stream=True,
        extra_body={"stream_drafts": True, "max_denoising_steps": 8}))
    drafts = [ch.model_extra["draft"] for ch in chunks if "draft" in (ch.model_extra or {})]
    assert drafts and [d["step"] for d in drafts] == list(range(1, len(drafts) + 1))
    assert all(d["canvas_index"] == 0 for d in drafts) and len(drafts) <= 8
    assert drafts[-1]["text"] == SOLUTION  # the last step's canvas is what gets committed
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == SOLUTION


def _raw_post(url, data, headers=None):
    return requests.post(url + "/v1/chat/completions", data=data, timeout=30,
                         headers={"Content-Type": "application/json", **(headers or {})})


def _assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


BAD_PARAMS = [
    ({"temperature": 0}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0.5}, "top_p"),
    ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"mode": "turbo"}, "mode"),
    ({"max_denoising_steps": 0}, None),
    ({"entropy_bound": "x"}, "entropy_bound"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
]


def test_every_bad_request_gets_a_4xx_and_the_server_keeps_serving(server):
    ok = {"model": "toy-sudoku", "messages": _ask(PUZZLE)}
    _assert_error(_raw_post(server, b"{not json"), 400)
    _assert_error(_raw_post(server, b"[1, 2]"), 400)
    _assert_error(_raw_post(server, json.dumps(dict(ok, model="gpt-4"))), 404, "model")
    for extra, param in BAD_PARAMS:
        _assert_error(_raw_post(server, json.dumps(dict(ok, **extra))), 400, param)
    err = _assert_error(_raw_post(server, json.dumps(dict(ok, messages=_ask("1" * 600)))), 400)
    assert err["code"] == "context_length_exceeded"
    big = json.dumps(dict(ok, messages=_ask("x" * (2 << 20))))
    _assert_error(_raw_post(server, big), 413)
    _assert_error(requests.get(server + "/v1/nothing", timeout=10), 404)

    c = _client(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=_ask(PUZZLE))
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), temperature=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="toy-sudoku", prompt="1" * 600)
    r = c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), seed=3,
                                  temperature=0.5)
    assert r.choices[0].message.content == SOLUTION


# -- in-process: the prompt cache against a cold cache, and the API key ------------------------


@pytest.fixture(scope="module")
def local_server():
    with served_in_process(seeded_noise=True, api_key="sekret", cache_entries=2) as srv:
        yield srv


def test_api_key_is_required_when_set(local_server):
    url = local_server.url
    with pytest.raises(openai.AuthenticationError):
        _client(url, api_key="wrong").models.list()
    _assert_error(requests.get(url + "/v1/models", timeout=10), 401)
    assert requests.get(url + "/health", timeout=10).status_code == 200
    assert _client(url, api_key="sekret").models.list().data[0].id == "toy-sudoku"


def test_growing_conversation_reuses_the_cache_and_gives_the_cold_reply(local_server, monkeypatch):
    import mlx.core as mx
    from teacher_forcing import recording, replay

    import mlx_diffgemma as md
    from mlx_diffgemma.chat.prompt import split_prompt
    from mlx_diffgemma.generation.denoiser import MLXDenoiser

    c = _client(local_server.url, api_key="sekret")
    model, tok = md.load("toy-sudoku")
    gen = model.generation_defaults.with_overrides(max_new_tokens=24)
    messages, held = [], 0
    for turn, p in enumerate(HELDOUT[:3]):
        messages.append({"role": "user", "content": p["puzzle"]})
        with recording(monkeypatch, MLXDenoiser) as record:
            r = c.chat.completions.create(model="toy-sudoku", messages=messages, seed=7 + turn,
                                          max_tokens=24)
        split = split_prompt(tok, messages)
        cached = r.usage.prompt_tokens_details.cached_tokens
        assert r.usage.prompt_tokens == len(split.ids)
        assert cached == held and (turn == 0 or cached > 0)
        held = split.stable  # what this request leaves in the cache
        # The same request on a cold cache that encodes the whole prompt in one call.
        cold = MLXDenoiser(model, gen, noise=md.SeededNoise(7 + turn))
        cold.encode(split.ids[: split.stable])
        replay(cold, record, md.SeededNoise(7 + turn), from_numpy=mx.array).check(1e-3)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    health = requests.get(local_server.url + "/health", timeout=10).json()
    assert health["prompt_cache"]["entries"] == 1  # each turn's state replaced the last


def test_a_request_builds_its_generation_config_once(local_server, monkeypatch):
    """The body is resolved into Settings at the edge; the engine, the session, the loop
    and the draft stream take it as it is."""
    from mlx_diffgemma.models.config import GenerationConfig

    built = []
    check = GenerationConfig.__post_init__
    monkeypatch.setattr(GenerationConfig, "__post_init__", lambda self: (built.append(self), check(self)))
    c = _client(local_server.url, api_key="sekret")
    stream = c.chat.completions.create(model="toy-sudoku", messages=_ask(PUZZLE), max_tokens=24, seed=3,
                                       temperature=0.9, stream=True, extra_body={"stream_drafts": True})
    chunks = list(stream)
    assert len(chunks) > 3 and len(built) == 1
    assert (built[0].max_new_tokens, built[0].t_max) == (24, pytest.approx(0.8 * 0.9))


# -- tool calls and thinking (the toy cannot call tools: parsed on rendered text) --------------

TOOL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|turn>system\n{% for t in tools %}<|tool>declaration:{{ t['function']['name'] }}"
    "{{ t['function']['description'] }}<tool|>{% endfor %}<turn|>\n{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{% if m['role'] == 'tool' %}<|turn>user\n<|tool_response>response:{{ m['name'] }}"
    "{value:<|\"|>{{ m['content'] }}<|\"|>}<tool_response|><turn|>\n"
    "{% else %}<|turn>{{ role }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<|tool_call>call:{{ c['function']['name'] }}{{ '{' }}"
    "{% for k, v in c['function']['arguments'].items() %}{{ k }}:"
    "{% if v is string %}<|\"|>{{ v }}<|\"|>{% else %}{{ v }}{% endif %}"
    "{% if not loop.last %},{% endif %}{% endfor %}{{ '}' }}<tool_call|>{% endfor %}<turn|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n<|channel>thought\n<channel|>{% endif %}"
)
MARKERS = ["<|tool_call>", "<tool_call|>", '<|"|>', "<|tool>", "<tool|>", "<tool_response|>"]


@pytest.fixture(scope="module")
def tool_tokenizer(ckpt_factory, tmp_path_factory):
    """The tiny checkpoint's tokenizer with Gemma 4's tool markers as special tokens and
    a template that renders tools, tool calls and tool results in Gemma 4's format."""
    import shutil

    from tokenizers import AddedToken, Tokenizer

    from mlx_diffgemma.models.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tools")
    for f in ckpt_factory("tiny").iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, path / f.name)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    raw.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
    raw.save(str(path / "tokenizer.json"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    decoder = cfg.get("added_tokens_decoder", {})
    decoder.update({str(raw.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                              "rstrip": False, "normalized": False,
                                              "single_word": False} for t in MARKERS})
    cfg["added_tokens_decoder"] = decoder
    cfg["chat_template"] = TOOL_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return load_tokenizer(path)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object"}}}


def test_tool_calls_rendered_by_the_template_parse_into_openai_tool_calls(tool_tokenizer):
    from mlx_diffgemma.chat.prompt import split_prompt
    from mlx_diffgemma.models.tokenizer import encode_text, render
    from mlx_diffgemma.serve.openai import chat_messages
    from mlx_diffgemma.serve.replies import ReplyParser

    tok = tool_tokenizer
    assert tok.tool_parser is not None  # mlx-lm inferred Gemma 4's parser from the template
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris, FR", "days": 3})}}
    convo = chat_messages({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]})
    text = render(tok, convo, add_generation_prompt=True, tools=[WEATHER])
    assert "<|tool>declaration:get_weather" in text and "response:get_weather{value:" in text
    reply = text.split("<|turn>model\n")[1].split("<turn|>")[0] + "<turn|>"
    ids = encode_text(tok, reply)
    # Decoding with special tokens skipped (as the chat does) eats the string delimiters.
    assert '<|"|>' not in tok.decode(ids, skip_special_tokens=True)
    parsed = ReplyParser(tok, [WEATHER]).parse(ids)
    assert parsed.content == "" and len(parsed.tool_calls) == 1
    fn = parsed.tool_calls[0]["function"]
    assert fn["name"] == "get_weather" and json.loads(fn["arguments"]) == {"city": "Paris, FR", "days": 3}

    thinking = encode_text(tok, "<|channel>thought\nlook it up<channel|>It is " + reply)
    parsed = ReplyParser(tok, [WEATHER]).parse(thinking)
    assert (parsed.reasoning, parsed.content, len(parsed.tool_calls)) == ("look it up", "It is ", 1)
    # Tools are part of the stable, cacheable prompt.
    split = split_prompt(tok, convo, tools=[WEATHER])
    assert tok.decode(split.ids[: split.stable]).count("declaration:get_weather") == 1
