"""`mlx-diffgemma serve` as a real process on a free localhost port, for the server tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_server(*extra, model: str = "toy-sudoku", timeout: float = 90):
    """(process, base URL) of `serve --model MODEL --port 0 EXTRA...`, once it listens.
    Its output (stdout and stderr) keeps being read into `process.output`, a list of
    lines."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_diffgemma.cli", "serve", "--model", model, "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO))
    proc.output = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        proc.output.append(line)
        if "listening on " in line:
            url = line.rsplit("listening on ", 1)[1].strip()
            threading.Thread(target=lambda: proc.output.extend(proc.stdout), daemon=True).start()
            return proc, url
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(proc.output))


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ask_at_once(client, puzzles, seed: int = 0, extras=None, join_s: float = 180):
    """Each puzzle sent by a client thread of its own, all at once (odd ones streamed);
    returns {i: reply text}. `client()` makes an `openai` client; `extras[i]`: request
    i's extra body."""
    results = {}

    def ask(i, puzzle):
        r = client().chat.completions.create(
            model="toy-sudoku", messages=[{"role": "user", "content": puzzle}], seed=seed + i,
            stream=bool(i % 2), extra_body=extras[i] if extras else None)
        if i % 2:
            results[i] = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)
        else:
            results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(puzzles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    return results


@contextmanager
def served_in_process(engine_cls=None, seeded_noise: bool = False, api_key=None, **engine_kw):
    """An `Engine` (or `engine_cls`) on toy-sudoku behind a `Server` on a free port, in
    this process (so a test can record what the worker does); `seeded_noise`: a request's
    seed picks a `SeededNoise` instead of MLX's generator."""
    import mlx_diffgemma as md
    from mlx_diffgemma.serve.engine import Engine
    from mlx_diffgemma.serve.http import Server

    engine = (engine_cls or Engine)(lambda: md.load("toy-sudoku"), "toy-sudoku", **engine_kw)
    if seeded_noise:
        engine.noise_for = lambda seed: None if seed is None else md.SeededNoise(seed)
    srv = Server(engine, "127.0.0.1", 0, api_key=api_key)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()

