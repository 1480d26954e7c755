"""Benchmark `mlx-diffgemma serve` through the `openai` client.

1. Time to first token of requests 2..N of a growing agent-style conversation (every
   request resends the whole conversation plus one new user message), with the prompt
   cache on and off (`--prompt-cache-size 0`).
2. Throughput with 1, 4 and 8 concurrent clients (requests and completion tokens per
   second; requests queue on the one model).

    PYTHONPATH=. python scripts/bench_server.py --model toy-sudoku

Starts the real server (a subprocess on a free localhost port) for each configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_server(model: str, *extra: str):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_diffgemma.cli", "serve", "--model", model,
                             "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "listening on " in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.rsplit("listening on ", 1)[1].strip()
    proc.kill()
    raise SystemExit("the server did not start")


def user_messages(n: int):
    """Puzzles from toy-sudoku's held-out set: valid prompts for the toy, short text for
    any other model."""
    path = REPO / "mlx_diffgemma" / "assets" / "toy-sudoku" / "mlx" / "heldout.json"
    puzzles = [p["puzzle"] for p in json.loads(path.read_text())["puzzles"]]
    return [puzzles[i % len(puzzles)] for i in range(n)]


def ttft_series(client, model: str, turns: int, max_tokens: int):
    """Seconds to the first content chunk of each request of a growing conversation."""
    messages, out = [], []
    for text in user_messages(turns):
        messages.append({"role": "user", "content": text})
        tic = time.perf_counter()
        first, reply = None, []
        for ch in client.chat.completions.create(model=model, messages=messages, seed=0,
                                                 max_tokens=max_tokens, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                first = first or time.perf_counter() - tic
                reply.append(ch.choices[0].delta.content)
        out.append(first if first is not None else time.perf_counter() - tic)
        messages.append({"role": "assistant", "content": "".join(reply)})
    return out


def throughput(url: str, model: str, clients: int, per_client: int, max_tokens: int):
    import openai

    tokens, lock = [0], threading.Lock()
    prompts = user_messages(clients * per_client)

    def work(k: int):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        for j in range(per_client):
            r = c.chat.completions.create(model=model, seed=k * per_client + j, max_tokens=max_tokens,
                                          messages=[{"role": "user", "content": prompts[k * per_client + j]}])
            with lock:
                tokens[0] += r.usage.completion_tokens

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    return clients * per_client / wall, tokens[0] / wall


def main(argv=None) -> int:
    import openai

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-sudoku")
    p.add_argument("--turns", type=int, default=10, help="requests in the growing conversation")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--per-client", type=int, default=4, help="requests per client in the throughput runs")
    args = p.parse_args(argv)

    series = {}
    for label, extra in (("cache", ()), ("no cache", ("--prompt-cache-size", "0"))):
        proc, url = start_server(args.model, *extra)
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            series[label] = ttft_series(c, args.model, args.turns, args.max_tokens)
            if label == "cache":
                rates = {n: throughput(url, args.model, n, args.per_client, args.max_tokens)
                         for n in (1, 4, 8)}
        finally:
            proc.terminate()
            proc.wait()

    print(f"time to first token, growing conversation ({args.model}), ms")
    print("| request | prompt cache | no cache |")
    print("|---|---|---|")
    for i in range(1, args.turns):
        print(f"| {i + 1} | {series['cache'][i] * 1e3:.1f} | {series['no cache'][i] * 1e3:.1f} |")
    mean = {k: sum(v[1:]) / max(len(v) - 1, 1) * 1e3 for k, v in series.items()}
    print(f"| mean 2..{args.turns} | {mean['cache']:.1f} | {mean['no cache']:.1f} |")
    print()
    print(f"throughput ({args.per_client} requests per client, max_tokens {args.max_tokens})")
    print("| clients | requests/s | completion tokens/s |")
    print("|---|---|---|")
    for n, (rps, tps) in rates.items():
        print(f"| {n} | {rps:.2f} | {tps:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
