"""Infill on the surfaces, with the packaged toy-sudoku model (a trained 4x4 Sudoku solver:
every middle is checkable): `suffix` on /v1/completions through the official `openai`
client, llama.cpp's POST /infill over raw HTTP (plain and streamed, a long suffix cut to
its head), bad bodies as 400s with `param`, and `generate --suffix`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
import requests  # noqa: E402
from servers import start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow  # starts servers and the command line

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "mlx_diffgemma" / "assets" / "toy-sudoku" / "mlx"
HELDOUT = json.loads((TOY / "heldout.json").read_text())["puzzles"]
PUZZLE, SOLUTION = HELDOUT[0]["puzzle"], HELDOUT[0]["solution"]
PROMPT = f"<bos><|turn>user\n{PUZZLE}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
LENGTHS = [6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    try:
        yield url
    finally:
        stop_server(proc)


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_completions_suffix_returns_the_middle(server):
    c = _client(server)
    r = c.completions.create(model="toy-sudoku", prompt=PROMPT, suffix=SOLUTION[8:], seed=3,
                             extra_body={"infill_lengths": LENGTHS})
    assert r.choices[0].text == SOLUTION[:8] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 42
    parts = list(c.completions.create(model="toy-sudoku", prompt=PROMPT, suffix=SOLUTION[8:], seed=3,
                                      stream=True, extra_body={"infill_lengths": LENGTHS}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == SOLUTION[:8]
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "stop"


def test_drafts_keep_the_suffix_in_place_while_the_hole_settles(server):
    chunks = list(_client(server).completions.create(
        model="toy-sudoku", prompt=PROMPT, suffix=SOLUTION[8:], seed=3, stream=True,
        extra_body={"infill_lengths": LENGTHS, "stream_drafts": True}))
    drafts = [ch.model_extra["draft"] for ch in chunks if "draft" in (ch.model_extra or {})]
    assert {d["candidate_length"] for d in drafts} == set(LENGTHS)
    for d in drafts:
        n = d["candidate_length"]
        assert d["canvas_text"][n:n + 8] == SOLUTION[8:]
        assert d["fixed"] == [n <= i < n + 8 for i in range(24)]
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == SOLUTION[:8]


def test_llama_infill_endpoint_plain_and_streamed(server):
    body = {"input_prefix": PROMPT, "input_suffix": SOLUTION[8:], "seed": 3, "infill_lengths": LENGTHS,
            "top_k": 40, "samplers": ["top_k"], "cache_prompt": True, "n_predict": -1}
    r = requests.post(server + "/infill", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["content"] == SOLUTION[:8] and out["stop"] is True and out["stop_type"] == "eos"
    assert out["tokens_predicted"] == 8 and out["tokens_evaluated"] == 42 and out["truncated"] is False
    assert out["generation_settings"]["ignored"] == ["top_k", "samplers", "cache_prompt"]
    assert out["infill"]["length"] == 8 and sorted(map(int, out["infill"]["scores"])) == LENGTHS
    assert set(out["timings"]) == {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"}

    r = requests.post(server + "/infill", json=dict(body, stream=True), timeout=60, stream=True)
    events = [json.loads(line[len("data: "):]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in r.text
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == SOLUTION[:8]
    assert events[-1]["infill"]["length"] == 8

    # input_extra and prompt go into the encoder's text, before and after the prefix.
    extra = [{"filename": "a.txt", "text": "12"}]
    r = requests.post(server + "/infill", json=dict(body, input_extra=extra, prompt="3", infill_lengths=[8]),
                      timeout=60).json()
    assert r["tokens_evaluated"] == 42 + len("a.txt\n12\n") + 1 and r["tokens_predicted"] == 8


def test_an_infill_beside_running_replies_answers_as_alone(server):
    """On a server drafting up to 4 requests at once: an infill (POST /infill, and
    `suffix` on /v1/completions) sent while two long replies are being drafted answers
    what it answers on an idle server; the replies go on stepping while it runs (their
    draft chunks keep coming) and run to their full length."""
    assert requests.get(server + "/health", timeout=10).json()["max_batch"] == 4
    body = {"input_prefix": PROMPT, "input_suffix": SOLUTION[8:], "seed": 5, "infill_lengths": LENGTHS}
    c = _client(server)

    def completion():
        r = c.completions.create(model="toy-sudoku", prompt=PROMPT, suffix=SOLUTION[8:], seed=6,
                                 extra_body={"infill_lengths": LENGTHS})
        return r.choices[0].text, r.usage.completion_tokens

    alone = requests.post(server + "/infill", json=body, timeout=60).json()
    alone_completion = completion()
    arrivals, usages, started = [[], []], [None, None], [threading.Event(), threading.Event()]

    def long_reply(i):
        for ch in c.chat.completions.create(
                model="toy-sudoku", messages=[{"role": "user", "content": PUZZLE}], max_tokens=240,
                stream=True, seed=i, stream_options={"include_usage": True},
                extra_body=dict(ignore_eos=True, confidence_threshold=1e-9, stream_drafts=True)):
            arrivals[i].append(time.monotonic())
            usages[i] = ch.usage or usages[i]
            if ch.choices and ch.choices[0].delta.content:
                started[i].set()

    threads = [threading.Thread(target=long_reply, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)  # both replies are being drafted
    tic = time.monotonic()
    beside = requests.post(server + "/infill", json=body, timeout=120).json()
    toc = time.monotonic()
    beside_completion = completion()
    rows = requests.get(server + "/health", timeout=10).json()["rows"]
    for t in threads:
        t.join(180)
    assert rows >= 1, "the long replies ended before the infills: nothing ran beside them"
    assert beside["content"] == alone["content"] == SOLUTION[:8]
    assert beside["infill"] == alone["infill"] and beside["tokens_predicted"] == 8
    assert beside_completion == alone_completion == (SOLUTION[:8], 8)
    during = sum(tic < t < toc for a in arrivals for t in a)
    assert during >= 15, f"only {during} chunks of the long replies while the infill ran"
    assert [u.completion_tokens for u in usages] == [240, 240]


def test_an_infill_whose_client_leaves_is_dropped_beside_a_running_reply(server):
    """A streamed infill running beside a long reply: its client goes away, the infill
    is cancelled (its cache rolled back) and the reply runs on to its full length."""
    def health():
        return requests.get(server + "/health", timeout=10).json()

    before = health()
    usage, started = [], threading.Event()

    def long_reply():
        for ch in _client(server).chat.completions.create(
                model="toy-sudoku", messages=[{"role": "user", "content": PUZZLE}], max_tokens=240,
                stream=True, seed=3, stream_options={"include_usage": True},
                extra_body=dict(ignore_eos=True, confidence_threshold=1e-9)):
            usage.extend([ch.usage] if ch.usage else [])
            if ch.choices and ch.choices[0].delta.content:
                started.set()

    thread = threading.Thread(target=long_reply)
    thread.start()
    assert started.wait(60)
    body = {"input_prefix": PROMPT, "input_suffix": SOLUTION[8:], "stream": True, "stream_drafts": True,
            "infill_lengths": list(range(4, 20)), "max_denoising_steps": 64, "confidence_threshold": 1e-9}
    r = requests.post(server + "/infill", json=body, stream=True, timeout=60)
    deadline = time.monotonic() + 10
    while health()["rows"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health()["rows"] == 2
    r.close()
    while health()["cancelled"] == before["cancelled"] and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    thread.join(120)
    after = health()
    assert after["cancelled"] - before["cancelled"] == 1 and after["completed"] - before["completed"] == 1
    assert usage[-1].completion_tokens == 240 and after["rows"] == 0


def test_a_long_suffix_is_cut_on_infill_and_refused_on_completions(server):
    long = SOLUTION[8:] * 4
    r = requests.post(server + "/infill", json={"input_prefix": PROMPT, "input_suffix": long, "seed": 3,
                                                "infill_lengths": LENGTHS}, timeout=60).json()
    assert r["truncated"] is True and len(r["content"]) == r["infill"]["length"]
    r = requests.post(server + "/v1/completions", json={"prompt": PROMPT, "suffix": long,
                                                        "infill_lengths": LENGTHS}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "suffix" and err["code"] == "suffix_too_long"
    assert err["message"].startswith("the suffix is 32 tokens; a 24-token canvas holds at most 14 beside")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": PROMPT, "suffix": 5}, "suffix"),
    ("/v1/completions", {"prompt": PROMPT, "suffix": "1", "infill_lengths": [0]}, "infill_lengths"),
    ("/v1/completions", {"prompt": PROMPT, "suffix": "1", "infill_length": "8"}, "infill_length"),
    ("/v1/completions", {"prompt": PROMPT, "suffix": "1", "truncate_suffix": "yes"}, "truncate_suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PUZZLE}], "suffix": "1"}, "suffix"),
    ("/infill", {"input_prefix": PROMPT}, "input_suffix"),
    ("/infill", {"input_suffix": "1"}, "input_prefix"),
    ("/infill", {"input_prefix": PROMPT, "input_suffix": 3}, "input_suffix"),
    ("/infill", {"input_prefix": PROMPT, "input_suffix": "1", "n_predict": 0}, "n_predict"),
    ("/infill", {"input_prefix": PROMPT, "input_suffix": "1", "input_extra": "x"}, "input_extra"),
])
def test_bad_infill_requests_are_400_with_param(server, path, body, param):
    r = requests.post(server + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def _generate(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mlx_diffgemma.cli", "generate", "--model", "toy-sudoku",
                           "--seed", "0", *args], capture_output=True, text=True, env=env, cwd=str(REPO),
                          timeout=120)


def test_generate_suffix_prints_the_middle():
    chat = _generate("-p", PUZZLE, "--suffix", SOLUTION[8:], "--infill-lengths", "6-10")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == SOLUTION[:8] + "\n"
    reply = _generate("-p", PUZZLE, "--reply-prefix", SOLUTION[:4], "--suffix", SOLUTION[12:],
                      "--infill-lengths", "6,8,10")
    assert reply.stdout == SOLUTION[4:12] + "\n", reply.stderr
    raw = _generate("--raw", "-p", PROMPT, "--suffix", SOLUTION[8:], "--infill-lengths", "6-10")
    assert raw.stdout == SOLUTION[:8] + "\n", raw.stderr
    bad = _generate("-p", PUZZLE, "--suffix", "1" * 30, "--infill-lengths", "8")
    assert bad.returncode == 2 and "the suffix is 30 tokens" in bad.stderr
    bad = _generate("-p", PUZZLE, "--infill-lengths", "8")
    assert bad.returncode == 2 and "go with --suffix" in bad.stderr


def test_repl_infill_template_fills_the_next_reply():
    import io

    from rich.console import Console

    import mlx_diffgemma as md
    from mlx_diffgemma.chat.repl import run_repl
    from mlx_diffgemma.chat.session import ChatSession

    model, tok = md.load(TOY)
    session = ChatSession(model, tok, keep_history=False, seed=0)
    lines = iter([f"/infill {SOLUTION[:2]}{{{{}}}}{SOLUTION[12:]}", PUZZLE, "/infill a{{}}b{{}}",
                  "/infill x\\ny{{}}", "/infill", PUZZLE])

    def read():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    run_repl(session, Console(file=out, width=120), read=read)
    text = out.getvalue()
    assert "an infill template needs exactly one {{}} where the middle goes (found 2)" in text
    assert "infill template dropped" in text
    replies = [m["content"] for m in session.messages if m["role"] == "assistant"]
    assert replies[0].startswith(SOLUTION[:2]) and replies[0].endswith(SOLUTION[12:])
    assert replies[0] == SOLUTION  # the toy fills the hole with the solution's middle
    assert replies[1] == SOLUTION  # the template was dropped: a plain reply
    assert f"model › {SOLUTION}" in text
