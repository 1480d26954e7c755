"""Benchmark `mlx-diffgemma serve` through the `openai` client.

1. Time to first token of requests 2..N of a growing agent-style conversation (every
   request resends the whole conversation plus one new user message), with the prompt
   cache on and off (`--prompt-cache-size 0`).
2. Several clients at once: total completion tokens per second and mean time to the
   first content chunk with 1, 2, 4 and 8 concurrent streaming clients, in reference
   and fast mode, on a batched server (`--max-batch 8`: every request's canvas denoised
   in one forward per step) against a serial one (`--max-batch 1`), measured in the
   same run; and the first chunk of a short request sent while a long reply runs.
3. `--only forward`: in process, one decoder forward over B canvases against B solo
   forwards.

    PYTHONPATH=. python scripts/bench_server.py --model toy-sudoku
    PYTHONPATH=. python scripts/bench_server.py --only batching --batching-models toy-sudoku,toy-sudoku-open

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


def clients_run(url: str, model: str, clients: int, per_client: int, max_tokens: int, mode: str):
    """`clients` concurrent clients, each sending `per_client` streamed requests one after
    another: (total completion tokens per second, mean seconds to the first content
    chunk, requests per second)."""
    import openai

    tokens, ttfts, lock = [0], [], threading.Lock()
    prompts = user_messages(clients * per_client)

    def work(k: int):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        for j in range(per_client):
            i = k * per_client + j
            tic, first, n = time.perf_counter(), None, 0
            for ch in c.chat.completions.create(model=model, seed=i, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"mode": mode},
                                                messages=[{"role": "user", "content": prompts[i]}]):
                if first is None and ch.choices and ch.choices[0].delta.content:
                    first = time.perf_counter() - tic
                if ch.usage is not None:
                    n = ch.usage.completion_tokens
            with lock:
                tokens[0] += n
                ttfts.append(first if first is not None else time.perf_counter() - tic)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    return tokens[0] / wall, sum(ttfts) / len(ttfts), clients * per_client / wall


def arrival_mid_reply(url: str, model: str, mode: str, delay: float = 0.5):
    """Seconds to the first content chunk of a short request sent `delay` s after a long
    one (10 canvases, no EOS) started, and its time alone on an idle server."""
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    prompt = [{"role": "user", "content": user_messages(1)[0]}]

    def first_chunk(**kw):
        tic = time.perf_counter()
        for ch in c.chat.completions.create(model=model, messages=prompt, seed=1, stream=True,
                                            extra_body={"mode": mode}, **kw):
            if ch.choices and ch.choices[0].delta.content:
                return time.perf_counter() - tic
        return time.perf_counter() - tic

    alone = first_chunk(max_tokens=24)
    long = threading.Thread(target=lambda: list(c.chat.completions.create(
        model=model, messages=prompt, seed=2, stream=True, max_tokens=240,
        extra_body={"mode": mode, "ignore_eos": True, "confidence_threshold": 1e-9})))
    long.start()
    time.sleep(delay)
    behind = first_chunk(max_tokens=24)
    long.join()
    return behind, alone


def batching_tables(models, clients, per_client: int, max_tokens: int, max_batch: int, repeats: int) -> None:
    """A batched server (--max-batch) and a serial one (--max-batch 1), both up at once and
    measured in turn, `repeats` rounds; each cell is the median of its rounds (the CPU is
    shared: interleaving keeps a slow minute from landing on one side only)."""
    import statistics

    for model in models:
        servers = {label: start_server(model, "--max-batch", str(batch), "--prompt-cache-size", "0")
                   for label, batch in (("serial", 1), ("batched", max_batch))}
        runs, arrival = {}, {}
        try:
            for label, (_, url) in servers.items():
                for mode in ("reference", "fast"):
                    clients_run(url, model, 1, 1, max_tokens, mode)  # warm-up
            for _ in range(repeats):
                for mode in ("reference", "fast"):
                    for n in clients:
                        for label, (_, url) in servers.items():
                            runs.setdefault((label, mode, n), []).append(
                                clients_run(url, model, n, per_client, max_tokens, mode))
                    for label, (_, url) in servers.items():
                        arrival.setdefault((label, mode), []).append(arrival_mid_reply(url, model, mode))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
        results = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in runs.items()}
        arrival = {k: tuple(statistics.median(r[i] for r in v) for i in range(2)) for k, v in arrival.items()}
        print(f"several clients at once ({model}, {per_client} streamed requests per client, max_tokens "
              f"{max_tokens}, --max-batch {max_batch} against 1, medians of {repeats} interleaved rounds; "
              "indicative: shared CPU)")
        print("| mode | clients | serial tok/s | batched tok/s | batched/serial | batched vs 1 client | "
              "serial TTFT ms | batched TTFT ms |")
        print("|---|---|---|---|---|---|---|---|")
        for mode in ("reference", "fast"):
            one = results["batched", mode, clients[0]][0]
            for n in clients:
                s_tps, s_ttft, _ = results["serial", mode, n]
                b_tps, b_ttft, _ = results["batched", mode, n]
                print(f"| {mode} | {n} | {s_tps:.1f} | {b_tps:.1f} | {b_tps / s_tps:.2f}x | {b_tps / one:.2f}x | "
                      f"{s_ttft * 1e3:.0f} | {b_ttft * 1e3:.0f} |")
        print()
        print(f"a short request sent 0.5 s into a 240-token reply ({model}): first content chunk, ms")
        print("| mode | serial | batched | alone on an idle server |")
        print("|---|---|---|---|")
        for mode in ("reference", "fast"):
            (s, alone), (b, _) = arrival["serial", mode], arrival["batched", mode]
            print(f"| {mode} | {s * 1e3:.0f} | {b * 1e3:.0f} | {alone * 1e3:.0f} |")
        print()


def forward_table(model_name: str, rows=(1, 2, 4, 8), reps: int = 20) -> None:
    """In process: one decoder forward over B canvases (models/batched.py) against B
    solo forwards, each canvas after a 37-token context, same run."""
    import mlx.core as mx

    import mlx_diffgemma as md
    from mlx_diffgemma.models.batched import cache_views, decode_rows

    model, _ = md.load(model_name)
    cache = model.make_cache()
    model.encode(mx.array([list(range(3, 40))]), cache)
    canvas = mx.array([[5 + i % 50 for i in range(model.canvas_length)]])

    def ms(f):
        f()
        tic = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - tic) / reps * 1e3

    print(f"one forward over B canvases against B solo forwards ({model_name}, in process), ms")
    print("| canvases | batched | B solo | solo/batched |")
    print("|---|---|---|---|")
    for b in rows:
        h = mx.concatenate([model.decoder_input(canvas)] * b)
        batched = ms(lambda: mx.eval(decode_rows(model, h, [cache.offset] * b, [cache_views(cache)] * b)))
        solo = ms(lambda: mx.eval([model.decode(canvas, cache) for _ in range(b)]))
        print(f"| {b} | {batched:.1f} | {solo:.1f} | {solo / batched:.2f}x |")
    print()


def main(argv=None) -> int:
    import openai

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-sudoku")
    p.add_argument("--turns", type=int, default=10, help="requests in the growing conversation")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--per-client", type=int, default=3, help="requests per client in the several-clients runs")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the several-clients runs")
    p.add_argument("--clients", default="1,2,4,8", help="client counts of the several-clients runs")
    p.add_argument("--max-batch", type=int, default=8, help="the batched server's --max-batch")
    p.add_argument("--batching-models", default=None,
                   help="models of the several-clients runs (default: --model), comma-separated")
    p.add_argument("--only", choices=("cache", "batching", "forward"), default=None, help="run one part only")
    args = p.parse_args(argv)

    if args.only == "forward":
        forward_table(args.model)
        return 0
    if args.only != "batching":
        series = {}
        for label, extra in (("cache", ()), ("no cache", ("--prompt-cache-size", "0"))):
            proc, url = start_server(args.model, *extra)
            try:
                c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
                series[label] = ttft_series(c, args.model, args.turns, args.max_tokens)
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
    if args.only != "cache":
        models = (args.batching_models or args.model).split(",")
        clients = [int(n) for n in args.clients.split(",")]
        batching_tables(models, clients, args.per_client, args.max_tokens, args.max_batch, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
