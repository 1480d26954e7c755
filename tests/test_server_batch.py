"""The server with several requests generating at once (serve/scheduler.py), driven by
the official `openai` client against servers running in this process (so that the
tests can record each row's denoiser and replay it alone).

- One request at a time, the batched server's replies are the serial server's, token
  for token, draft stream included (same floats by construction: a batch of one steps
  the row's own denoiser, and a seed's KeyStream draws what mx.random.seed draws).
- Concurrent requests: each row is recorded and replayed on a cold solo denoiser
  (tests/teacher_forcing.py): a batched matmul may round differently, so exact tokens
  are not asserted, but every decision that is certain under the measured difference is.
- A disconnect mid-batch, the queue bound and its 503, a request arriving mid-reply.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
import mlx.core as mx  # noqa: E402
import requests  # noqa: E402
import teacher_forcing as tf  # noqa: E402
from servers import ask_at_once, served_in_process  # noqa: E402

import mlx_diffgemma as md  # noqa: E402
from mlx_diffgemma.generation.denoiser import MLXDenoiser  # noqa: E402
from mlx_diffgemma.generation.fast import FastDenoiser  # noqa: E402
from mlx_diffgemma.serve import scheduler as sched  # noqa: E402
from mlx_diffgemma.serve.engine import Engine  # noqa: E402

pytestmark = pytest.mark.slow  # starts servers and many clients

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "mlx_diffgemma" / "assets" / "toy-sudoku" / "mlx"
HELDOUT = json.loads((TOY / "heldout.json").read_text())["puzzles"]


class SerialEngine(Engine):
    """The engine with requests run one at a time through the chat session: the server
    as it was before requests ran in batches."""

    def _setup(self, *args, **kw):
        super()._setup(*args, **kw)
        self.scheduler = None


def _served(engine_cls=Engine, seeded_noise=False, **kw):
    return served_in_process(engine_cls, seeded_noise, **kw)


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _ask(puzzle):
    return [{"role": "user", "content": puzzle}]


def _health(url):
    return requests.get(url + "/health", timeout=10).json()


# -- a batch of one is the serial server ------------------------------------------------------


REQUESTS = [  # (puzzle, seed, extra body)
    (0, 3, {}),
    (1, 11, {"max_denoising_steps": 12, "stream_drafts": True}),
    (2, 5, {"mode": "fast", "stream_drafts": True}),
    (3, 8, {"mode": "fast", "max_denoising_steps": 20}),
]


def _chunks(url, puzzle, seed, extra):
    stream = _client(url).chat.completions.create(
        model="toy-sudoku", messages=_ask(HELDOUT[puzzle]["puzzle"]), seed=seed, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    out = []
    for ch in stream:
        d = ch.model_dump()
        out.append((d["choices"], d.get("usage"), d.get("draft")))
    return out


def test_one_request_at_a_time_is_the_serial_server_token_for_token():
    """Seeded (mx.random: the production path), reference and fast mode, the draft stream
    included: every chunk equal."""
    replies = {}
    for name, cls in (("serial", SerialEngine), ("batched", Engine)):
        with _served(cls, cache_entries=0) as srv:
            replies[name] = [_chunks(srv.url, *r) for r in REQUESTS]
            health = _health(srv.url)
        assert health["max_batch"] == (1 if name == "serial" else 4)
    for serial, batched in zip(replies["serial"], replies["batched"]):
        assert len(serial) > 3 and batched == serial
    assert any(draft for reply in replies["batched"] for _, _, draft in reply)


# -- concurrent requests, each held to its solo run -------------------------------------------


@contextmanager
def _recorded(monkeypatch):
    """Per row: its prompt split and settings, and its reference-mode steps as
    teacher_forcing records (its prompt first); fast rows' batched forwards are checked
    against their solo forward on the spot. Yields (rows, records, fast steps checked)."""
    rows, records, fast_checked = {}, {}, []
    start = sched.Scheduler._start_drafting

    def start_drafting(self, row):
        start(self, row)
        denoiser = self.drafter.rows[row.uid].denoiser
        rows[id(denoiser)] = (row.job.split, row.job.opts.settings)
        records[id(denoiser)] = [tf.Encode(list(row.job.split.ids[: row.job.split.stable]))]

    with monkeypatch.context() as m:
        m.setattr(sched.Scheduler, "_start_drafting", start_drafting)
        tf.record_rows(m, MLXDenoiser, records)
        tf.check_batched_forwards(m, FastDenoiser, fast_checked)
        yield rows, records, fast_checked


def _replay_all(rows, records, model, min_rows):
    replayed = 0
    for key, (split, settings) in rows.items():
        if settings.mode != "reference":
            continue
        cold = MLXDenoiser(model, settings.gen, noise=md.SeededNoise(settings.seed))
        report = tf.replay(cold, records[key], md.SeededNoise(settings.seed), from_numpy=mx.array)
        report.check(1e-3)
        replayed += 1
    assert replayed >= min_rows


def test_concurrent_clients_each_get_their_solo_reply(monkeypatch):
    """Six clients at once (different puzzles, seeds, step counts, modes, streaming or
    not): each gets its puzzle's solution; each reference row replays alone on a cold
    cache with every certain decision its own, each fast row's forward is its solo one."""
    model, _ = md.load("toy-sudoku")
    puzzles = [p for p in HELDOUT if p["blanks"] <= 6][:6]
    extras = [{}, {"max_denoising_steps": 16}, {"mode": "fast"}, {"max_denoising_steps": 32},
              {"mode": "fast", "max_denoising_steps": 24}, {}]
    with _recorded(monkeypatch) as (rows, records, fast_checked), \
            _served(seeded_noise=True, cache_entries=0) as srv:
        results = ask_at_once(lambda: _client(srv.url), [p["puzzle"] for p in puzzles], 40, extras)
        health = _health(srv.url)
    assert results == {i: p["solution"] for i, p in enumerate(puzzles)}
    assert health["mean_batch"] > 1.5 and health["completed"] == 6, health
    # Every fast row's batched forward is held to its solo one as it happens; whether a
    # fast row shares a tick at all depends on timing (test_batch.py batches them for sure).
    assert len(rows) == 6
    _replay_all(rows, records, model, min_rows=4)


def _long(url, **extra):
    """A streaming reply that runs for a while: no EOS, no early stop, 10 canvases."""
    return _client(url).chat.completions.create(
        model="toy-sudoku", messages=_ask(HELDOUT[0]["puzzle"]), max_tokens=240, stream=True,
        stream_options={"include_usage": True}, seed=extra.pop("seed", 1),
        extra_body=dict(ignore_eos=True, confidence_threshold=1e-9, **extra))


def test_a_disconnect_mid_batch_leaves_the_others_intact(monkeypatch):
    """Three long streams; one client goes away after three chunks: it is cancelled, the
    other two finish at full length, each its solo run (teacher-forced)."""
    model, _ = md.load("toy-sudoku")
    usage = {}
    with _recorded(monkeypatch) as (rows, records, _), _served(seeded_noise=True, cache_entries=0) as srv:
        before = _health(srv.url)

        def full(i):
            for ch in _long(srv.url, seed=60 + i, max_denoising_steps=16):
                if ch.usage is not None:
                    usage[i] = ch.usage.completion_tokens

        def leave():
            stream = _long(srv.url, seed=70, stream_drafts=True)
            for n, _ in enumerate(stream):
                if n == 3:
                    break
            stream.close()

        threads = [threading.Thread(target=full, args=(i,)) for i in range(2)] + [threading.Thread(target=leave)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        health = _health(srv.url)
    assert usage == {0: 240, 1: 240}
    assert health["cancelled"] == before["cancelled"] + 1 and health["completed"] == before["completed"] + 2
    assert health["mean_batch"] > 1.5, health
    finished = {k: v for k, v in rows.items() if sum(isinstance(e, tf.Step) for e in records[k]) > 100}
    assert len(finished) == 2
    _replay_all(finished, records, model, min_rows=2)


# -- the queue bound and a request arriving mid-reply -----------------------------------------


def test_a_full_queue_answers_503_with_retry_after_and_the_server_keeps_serving():
    with _served(cache_entries=0, max_batch=1, max_queue=1) as srv:
        running = _long(srv.url)
        next(iter(running))
        waiting = _long(srv.url)  # queued: the one row is taken
        deadline = time.time() + 30
        while _health(srv.url)["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert _health(srv.url)["waiting"] == 1
        body = {"model": "toy-sudoku", "messages": _ask(HELDOUT[1]["puzzle"])}
        raw = requests.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert raw.status_code == 503 and raw.headers["Retry-After"] == "1"
        err = raw.json()["error"]
        assert err["code"] == "server_busy" and "1 requests are waiting for one of 1 slots" in err["message"]
        with pytest.raises(openai.InternalServerError) as e:
            _client(srv.url).chat.completions.create(**body, stream=True)
        assert e.value.status_code == 503
        running.close()
        waiting.close()
        r = _client(srv.url).chat.completions.create(**body, seed=2)
        assert r.choices[0].message.content == HELDOUT[1]["solution"]


def test_a_request_arriving_mid_reply_is_answered_before_the_reply_ends():
    with _served(cache_entries=0) as srv:
        long_done = []
        long_thread = threading.Thread(target=lambda: long_done.append([c for c in _long(srv.url)]))
        long_thread.start()
        deadline = time.time() + 30
        while _health(srv.url)["running"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        r = _client(srv.url).chat.completions.create(model="toy-sudoku", messages=_ask(HELDOUT[2]["puzzle"]),
                                                     seed=4)
        assert not long_done, "the short request waited for the long reply"
        long_thread.join(180)
    assert r.choices[0].message.content == HELDOUT[2]["solution"]
    assert long_done and long_done[0][-1].usage.completion_tokens == 240


def test_stop_strings_and_max_tokens_end_their_own_rows_only():
    """Beside a long stream, a reply cut by a stop string and one cut by max_tokens end
    at their own step with their own finish reasons; the long one runs to full length."""
    p = HELDOUT[0]
    with _served(cache_entries=0) as srv:
        long_done = []
        long_thread = threading.Thread(target=lambda: long_done.append([c for c in _long(srv.url, seed=9)]))
        long_thread.start()
        c = _client(srv.url)
        stopped = c.chat.completions.create(model="toy-sudoku", messages=_ask(p["puzzle"]), seed=3,
                                            stop=[p["solution"][5:8]])
        cut = c.chat.completions.create(model="toy-sudoku", messages=_ask(p["puzzle"]), seed=3, max_tokens=6)
        assert not long_done
        long_thread.join(180)
    assert stopped.choices[0].message.content == p["solution"][:5]
    assert stopped.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == p["solution"][:6] and cut.choices[0].finish_reason == "length"
    assert long_done[0][-1].usage.completion_tokens == 240
