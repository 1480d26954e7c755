"""One model split over two ranks (`mx.distributed`, ring backend over 127.0.0.1),
against the same checkpoint in one process, and `mlx-diffgemma chat|generate|serve`
under `mlx.launch`.

Every run starts two processes with a time limit; on time-out the process groups are
killed and the test fails with what the ranks printed. The commands run under
`mlx.launch`; the API checks (tests/dist_worker.py, whose ranks write their findings as
JSON) start the two ranks as it does, without its process.

Floats: a split model sums partial results (attention heads, the dense MLP's halves,
each rank's experts, the self-conditioning product's vocabulary halves) in another
order than one process, so its logits differ in the last bits, and a whole generation
is token-identical only where no decision is a near-tie. Logits are held to 1e-4 on the
two-layer checkpoints, where the float32 noise floor is below that (on the five-layer
"mixed" shape a one-ulp change of o_proj alone moves the logits by ~1e-4, so it is held
to 1e-3 like the transformers parity tests). Whole generations are compared teacher-
forced, as tests/teacher_forcing.py does: the one-process run is recorded and each step
is replayed on the split model; every decision that is certain under the measured
logit difference must be the same (reference mode: argmax, acceptance, next canvas,
stop; fast mode, forced at its forward: the argmax).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
TOY_OPEN = REPO / "mlx_diffgemma" / "assets" / "toy-sudoku-open" / "mlx"
sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import CLI  # noqa: E402


def _launcher():
    here = Path(sys.executable).with_name("mlx.launch")
    return str(here) if here.exists() else shutil.which("mlx.launch")


def _free_ports(n: int = 2) -> int:
    """A first port p such that p .. p+n-1 are free on 127.0.0.1 now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65536 and all(_free(p + i) for i in range(1, n)):
            return p
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _env(**extra):
    path = os.pathsep.join([str(REPO), str(WORKER.parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env.update(extra)
    return env


def _run(argv, timeout, stdin=None, env=None):
    """Runs `argv` in its own process group; kills the group on time-out."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or _env(),
                            cwd=str(REPO), start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv[:6]} ran past {timeout} s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    finally:
        _kill_group(proc.pid)
    return proc.returncode, out, err


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(*command, timeout=180, stdin=None):
    """`mlx.launch --backend ring --hosts 127.0.0.1 -n 2 -- COMMAND` (two ranks)."""
    launcher = _launcher()
    if launcher is None:
        pytest.fail("mlx.launch is not installed with this Python's mlx")
    argv = [launcher, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
            "--starting-port", str(_free_ports()), "--", *command]
    return _run(argv, timeout, stdin)


def start_ranks(argvs, tmp_path, **env):
    """Two ranks started as mlx.launch starts them (a ring host file, MLX_RANK), each on
    a core of its own from its start. Without the launcher: its I/O loop polls and would
    keep one of CI's two cores busy (it is tested under mlx.launch below)."""
    port = _free_ports()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    procs = []
    for rank, argv in enumerate(argvs):
        pin = (lambda c=cores[rank % len(cores)]: os.sched_setaffinity(0, {c})) if cores else None
        procs.append(subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
            env=_env(MLX_HOSTFILE=str(hostfile), MLX_RANK=str(rank), **env),
            start_new_session=True, preexec_fn=pin))
    return procs


def finish(procs, timeout):
    """Each process's (returncode, stdout, stderr); all killed after `timeout` s."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            _kill_group(p.pid)
        pytest.fail(f"the ranks ran past {timeout} s")
    finally:
        for p in procs:
            _kill_group(p.pid)
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def worker(job, tmp_path, *args, timeout=240):
    out = tmp_path / job
    argv = [sys.executable, str(WORKER), job, str(out), *map(str, args)]
    ranks = finish(start_ranks([argv, argv], tmp_path), timeout)
    results = [out.parent / f"{out.name}.{r}.json" for r in (0, 1)]
    assert all(p.exists() for p in results), f"worker {job} failed: {[(rc, e[-3000:]) for rc, _, e in ranks]}"
    return [json.loads(p.read_text()) for p in results]


def cli(*args, **kw):
    return launch(sys.executable, "-m", "mlx_diffgemma.cli", *args, **kw)


# -- checkpoints ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(ckpt_factory, tmp_path_factory):
    """tiny (float; its full layer has 1 KV head: replicated on both ranks), split-q4
    (mixed-4 at group 32: both layer kinds with 2 KV heads, one per rank; the dense MLP
    split 1 + 2 groups), mixed (five float layers)."""
    from mlx_diffgemma.convert import convert

    q = tmp_path_factory.mktemp("split-q4") / "mlx"
    convert(ckpt_factory("split"), q, recipe="mixed-4", q_group_size=32, progress=False, verbose=False)
    return {"tiny": ckpt_factory("tiny"), "split-q4": q, "mixed": ckpt_factory("mixed")}


@pytest.fixture(scope="module")
def parity(ckpts, tmp_path_factory):
    ranks = worker("parity", tmp_path_factory.mktemp("parity"), *ckpts.values())
    by_name = [{name: r[str(path)] for name, path in ckpts.items()} for r in ranks]
    for r, rank in zip(ranks, by_name):
        rank["cli"] = r["cli"]
    print("\nsplit over 2 ranks, worker seconds:", ranks[0]["seconds"])
    return by_name


# -- the split model against one process ----------------------------------------------------------


@pytest.mark.parametrize("name,atol", [("tiny", 1e-4), ("split-q4", 1e-4), ("mixed", 1e-3)])
def test_logits_match_one_process(parity, name, atol):
    for rank in parity:
        for case, c in rank[name]["logits"].items():
            print(f"{name} rank {rank[name]['rank']} {case}: max |diff| {c['max_diff']:.2e} "
                  f"(logits up to {c['max_abs']:.1f})")
            assert c["max_abs"] > 5, "logits too small for the comparison to mean anything"
            assert c["max_diff"] <= atol, (name, case, c)
            assert c["argmax_mismatches"] == 0 and c["certain"] >= 0.95, (name, case, c)
    # Both ranks end with the same logits (the all_sum gives every rank the same bits).
    assert parity[0][name]["logits"] == parity[1][name]["logits"]


def test_shard_in_memory_is_the_split_load(parity):
    """`Model.shard(group)` on a whole loaded model keeps the same slices as `load(...,
    group=)` reads: the same bytes per tensor, the same logits to the bit."""
    for rank in parity:
        r = rank["split-q4"]
        assert r["bytes"]["shard"] == r["bytes"]["split"]
        assert all(c["shard_equals_split_load"] for c in r["logits"].values())


@pytest.mark.parametrize("name", ["tiny", "split-q4", "mixed"])
def test_generations_teacher_forced_match_one_process(parity, name):
    r = parity[0][name]
    for run in r["reference"]:
        assert run["steps"] > 0 and not run["mismatches"], run
        assert run["max_logit_diff"] <= 1e-3 and run["uncertain"] <= 0.05 * run["decisions"], run
    for key in ("fast", "fast_active_set"):
        for run in r.get(key, []):
            assert run["forwards"] == run["recorded"] > 0, run  # the split run took every forward
            assert run["mismatches"] == 0 and run["max_diff"] <= 1e-3, run
            assert run["uncertain"] <= 0.05 * run["decisions"], run
            assert run["same_tokens"], run  # forced: the same path to the end
    if "unforced" in r:
        print(f"{name}: unforced whole runs token-identical: {r['unforced']}")


def _expected_fraction(name: str, rank: int, config: dict) -> float:
    """What share of tensor `name` a rank holds, from the rules alone: half of every
    layer's query heads, experts and dense MLP width (in whole quantization groups:
    3 groups of 32 split 1 + 2), half of the KV heads where there are 2, all of one
    KV head where there is 1; everything else whole."""
    from mlx_diffgemma.config import ModelArgs

    args = ModelArgs.from_dict(config)
    if not name.startswith("model.decoder.layers.") or not any(
            p in name for p in (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj",
                                ".self_attn.o_proj", ".mlp.", ".experts.")):
        return 1.0
    layer = int(name.split(".")[3])
    if ".k_proj" in name or ".v_proj" in name:
        return 0.5 if args.kv_heads_of(layer) % 2 == 0 else 1.0
    if ".mlp." in name and config.get("quantization"):
        groups = args.intermediate_size // config["quantization"]["group_size"]
        mine = (groups * (rank + 1)) // 2 - (groups * rank) // 2
        return mine / groups
    return 0.5


@pytest.mark.parametrize("name", ["tiny", "split-q4", "mixed"])
def test_each_rank_holds_its_share(parity, ckpts, name):
    """Per tensor: the bytes each rank holds are the share the splitting rules give;
    in all, about half of what one process holds plus what is replicated. Loading reads
    the slices: its peak is the rank's share plus at most one whole tensor (a column
    cut), well below one process's."""
    from mlx_diffgemma.weights import is_vision_tensor

    config = json.loads((Path(ckpts[name]) / "config.json").read_text())
    for rank in parity:
        r = rank[name]
        single, split = r["bytes"]["single"], r["bytes"]["split"]
        assert set(single) == set(split)
        for k in single:
            want = single[k] * _expected_fraction(k, r["rank"], config)
            assert split[k] == pytest.approx(want, rel=1e-9), k
        # (a vision tower, which loading leaves on disk, is left out)
        total = sum(v for k, v in split.items() if not is_vision_tensor(k))
        whole = sum(v for k, v in single.items() if not is_vision_tensor(k))
        peak = r["load_peak"]
        print(f"{name} rank {r['rank']}: {total} of {whole} bytes ({total / whole:.2f}); peak "
              f"while loading {peak['split']} against {peak['single']} in one process")
        assert total < 0.8 * whole
        assert peak["split"] <= 1.1 * total + max(single.values())
        assert peak["split"] < 0.8 * peak["single"]


def test_trained_toy_keeps_its_accuracy_split(tmp_path):
    """toy-sudoku-open (trained; any valid grid counts; answers over two canvases) on
    12 held-out puzzles in fast mode, one seeded noise per puzzle, split or whole. A
    near-tie may go the other way on one puzzle; the rates stay within one puzzle."""
    n = 12
    ranks = worker("toy", tmp_path, TOY_OPEN, n, timeout=300)
    r = ranks[0]
    print(f"\ntoy-sudoku-open held-out, fast mode: split {r['split']} single {r['single']}")
    assert r["split"]["n"] == r["single"]["n"] == n
    assert abs(r["split"]["solve_rate"] - r["single"]["solve_rate"]) <= 1 / n
    assert r["single"]["solve_rate"] >= 0.6
    assert ranks[1] == ranks[0]


# -- errors ---------------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path, ckpt_factory):
    ranks = worker("errors", tmp_path, ckpt_factory("tiny"), ckpt_factory("tiny", seed=1),
                   ckpt_factory("wide"))
    for r in ranks:  # every rank stops with the same message
        assert "the ranks loaded different models: rank 1" in r["different models"]
        assert "give every rank the same model directory" in r["different models"]
        assert ("cannot split this model over 2 ranks: its 3 key-value heads do not divide evenly"
                in r["rank count"])
        assert "the ranks disagree at canvas 0" in r["disagreement"]
        assert "rank 1 computed other values than rank 0" in r["disagreement"]
    assert ranks[0] == ranks[1]


def test_a_rank_that_drops_out_stops_the_others_in_one_line(tmp_path, ckpts):
    """`generate` as rank 0 and a follower that leaves after its first denoising step,
    started without a launcher (which would otherwise stop rank 0 itself). Rank 0 says
    in one line that a rank is gone: MLX's ring backend either returns from the step's
    check without the peer's data, or waits, and the watchdog ends the wait."""
    model = str(ckpts["tiny"])
    procs = start_ranks([[sys.executable, "-m", "mlx_diffgemma.cli", "generate", "--model", model,
                          "--prompt", "hi", "--steps", "8", "--seed", "0"],
                         [sys.executable, str(WORKER), "drop", str(tmp_path / "drop"), model]],
                        tmp_path, MLX_DIFFGEMMA_PEER_TIMEOUT="4")
    (rc0, out0, err0), (rc1, out1, err1) = finish(procs, 120)
    assert rc1 == 3, err1  # it left on purpose
    assert rc0 == 1, err0
    # (MLX's ring backend logs its socket errors first; ours is the one line that says
    # what happened, and the last.)
    errors = [line for line in err0.splitlines() if line.startswith("mlx-diffgemma")]
    assert len(errors) == 1 and err0.rstrip().endswith(errors[0]), err0
    assert ("rank 1 stopped answering at canvas 0" in errors[0]
            or "rank 0: no answer from the other ranks for 4 s while denoising canvas 0" in errors[0]), errors
    assert "stop every rank and start again" in errors[0]
    assert out0 == ""


# -- the command line under mlx.launch ----------------------------------------------------------


def test_generate_under_mlx_launch(parity, ckpts):
    """Rank 0 prints the reply; rank 1 prints nothing. The reply is the one the split
    model gives through the API in the same two ranks (same seed: same floats)."""
    text, seed = CLI["generate"]
    rc, out, err = cli("generate", "--model", str(ckpts["tiny"]), "--prompt", text, "--seed", str(seed),
                       "--max-new-tokens", str(CLI["max_new_tokens"]), "--steps", str(CLI["steps"]))
    assert out == parity[0]["cli"]["generate"] + "\n", (out, err)
    assert "error" not in err.lower(), err


def test_chat_under_mlx_launch(parity, ckpts):
    """Two turns (the second reuses the cache the first left: trims and all, on every
    rank), then /exit; rank 0 owns the terminal."""
    lines, seed = CLI["chat"]
    rc, out, err = cli("chat", "--model", str(ckpts["tiny"]), "--seed", str(seed),
                       "--max-new-tokens", str(CLI["max_new_tokens"]), "--steps", str(CLI["steps"]),
                       stdin="\n".join(lines) + "\n/exit\n")
    flat = "".join(out.split())
    for reply in parity[0]["cli"]["chat"]:
        assert "model›" + "".join(reply.split()) in flat, (reply, out)
    assert out.count("mlx-diffgemma chat ·") == 1 and "bye" in out, out
    assert "cached tokens" in out and "error" not in err.lower(), err


def test_serve_under_mlx_launch(parity, ckpts):
    """Rank 0 serves HTTP; a completion matches the split model's through the same
    engine in the two ranks; a stream cut short by a stop string (rank 0 stops reading
    the generation: the other rank stops with it) leaves the server serving."""
    import requests

    launcher = _launcher()
    port = _free_ports(1)
    argv = [launcher, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "--starting-port",
            str(_free_ports()), "--", sys.executable, "-m", "mlx_diffgemma.cli", "serve", "--model",
            str(ckpts["tiny"]), "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), cwd=str(REPO), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for line in iter(proc.stdout.readline, ""):
            if "listening on" in line:
                break
        else:
            pytest.fail("the server did not start")
        body = dict(CLI["serve"])
        first = requests.post(url + "/v1/completions", json=body, timeout=120).json()
        assert first["choices"][0]["text"] == parity[0]["cli"]["serve"]
        stop = first["choices"][0]["text"][3]
        streamed = requests.post(url + "/v1/completions", json=dict(body, stream=True, stop=[stop]),
                                 timeout=120, stream=True)
        chunks = [line for line in streamed.iter_lines() if line]
        assert chunks[-1] == b"data: [DONE]"
        again = requests.post(url + "/v1/completions", json=body, timeout=120).json()
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
    finally:
        _kill_group(proc.pid)
        proc.wait(10)


def test_a_command_that_fails_before_loading_stops_every_rank(ckpts, tmp_path):
    """Rank 0 refuses the image before it loads; the other rank, waiting to compare
    models, is told to stop: one error line, no hang."""
    rc, out, err = cli("generate", "--model", str(ckpts["tiny"]), "--prompt", "hi",
                       "--image", str(tmp_path / "missing.png"), timeout=120)
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "missing.png" in errors[0], err
