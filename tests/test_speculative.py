"""Speculative decoding (speculative.py): a tiny DiffusionGemma drafting for a tiny
autoregressive Gemma 4 target (built with transformers, loaded with `mlx_lm.load`).

- Greedy: the output is mlx-lm's own greedy generation of the target, token for token up
  to the first near-tie (a one-token and a block forward do not compute the same floats).
  The drafter's proposals are mixed with the target's true continuation so that rounds
  keep 0..k drafts (a random drafter alone almost never agrees), and an off-by-one
  verifier is shown to fail the same check.
- Sampling: the first three tokens' empirical distribution over many seeds matches the
  target's exact distribution (chi-square); an always-accept rule fails it.
- Tokenizer mismatch and the two context limits, by message.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step
from teacher_forcing import top2_gap
from tiny_checkpoints import make_target_checkpoint, random_prompt

from mlx_diffgemma import load
from mlx_diffgemma.generation import speculative as spec
from mlx_diffgemma.generation.events import Commit, SpeculativeSummary
from mlx_diffgemma.generation.speculative import Proposer, speculative_stream_generate

# A reference decision whose top-2 logit gap is below this can flip between a one-token
# and a block forward (float32 differences are ~1e-5 here).
NEAR_TIE = 5e-3


@pytest.fixture(scope="module")
def target_tiny(tmp_path_factory):
    return make_target_checkpoint(tmp_path_factory.mktemp("target-tiny"), "tiny")


@pytest.fixture(scope="module")
def pair_tiny(target_tiny, ckpt_tiny):
    target, ttok = mlx_lm_load(str(target_tiny))
    drafter, dtok = load(ckpt_tiny)
    return target, ttok, drafter, dtok


@pytest.fixture(scope="module")
def pair_mixed(tmp_path_factory, ckpt_mixed):
    target, ttok = mlx_lm_load(str(make_target_checkpoint(tmp_path_factory.mktemp("target-mixed"), "mixed", seed=1)))
    drafter, dtok = load(ckpt_mixed)
    return target, ttok, drafter, dtok


# -- greedy -------------------------------------------------------------------------------


def reference_greedy(target, prompt, n):
    """mlx-lm's greedy generation: tokens and the top-2 logit gap of each decision."""
    tokens, gaps = [], []
    for tok, logprobs in generate_step(mx.array(prompt), target, max_tokens=n,
                                       sampler=lambda x: mx.argmax(x, axis=-1)):
        tokens.append(int(tok))
        gaps.append(float(top2_gap(np.array(logprobs.astype(mx.float32)))))
    return tokens, gaps


def oracle_drafts(monkeypatch, ref, n_prompt, rng, p_true=0.85):
    """The real drafter runs; each proposal is then replaced with the target's greedy token
    with probability `p_true`, so rounds keep anything from 0 to k drafts."""
    propose = Proposer.propose

    def mixed(self, k, index, temperature):
        tokens, logits, events = propose(self, k, index, temperature)
        done = self.denoiser.cached_tokens - n_prompt
        truth = ref[done : done + k]
        return [r if rng.random() < p_true else t for t, r in zip(tokens, truth)], logits, events

    monkeypatch.setattr(Proposer, "propose", mixed)


def greedy_runs(monkeypatch, pair, cases, max_new=24, **kw):
    """Per case: (tokens compared, whether the speculative output agrees with mlx-lm's up
    to the first near-tie, whether no near-tie cut the comparison short, rounds' kept drafts)."""
    target, ttok, drafter, dtok = pair
    out = []
    for seed, k, n_prompt in cases:
        prompt = random_prompt(drafter.vocab_size, n_prompt, seed)
        ref, gaps = reference_greedy(target, prompt, max_new + k)
        oracle_drafts(monkeypatch, ref, n_prompt, np.random.default_rng(seed))
        events = list(speculative_stream_generate(target, ttok, drafter, dtok, prompt, k=k, draft_steps=2,
                                                  max_new_tokens=max_new, seed=seed, **kw))
        got = events[-1].tokens
        sure = next((i for i, g in enumerate(gaps[: len(got)]) if g < NEAR_TIE), len(got))
        kept = [len(e.tokens) - 1 for e in events if isinstance(e, Commit)]
        out.append((sure, got[:sure] == ref[:sure], sure == len(got), kept))
    return out


# (seed, k, prompt length): prompts shorter and longer than the 8-token sliding window.
GREEDY_CASES = [(0, 1, 3), (3, 6, 20), (4, 8, 9), (5, 2, 30), (6, 5, 1), (7, 3, 16)]


def test_greedy_equals_mlx_lm(monkeypatch, pair_tiny, pair_mixed):
    runs = greedy_runs(monkeypatch, pair_tiny, GREEDY_CASES) + greedy_runs(monkeypatch, pair_mixed, GREEDY_CASES[1:3])
    assert all(ok for _, ok, _, _ in runs), [r[:2] for r in runs]
    # The check has teeth: most runs compare every token, and rounds kept every count of
    # drafts from none to a full block (the target's bonus token included).
    assert sum(full for _, _, full, _ in runs) >= 0.75 * len(runs)
    kept = [n for *_, ks in runs for n in ks]
    assert 0 in kept and max(kept) >= 6 and len(set(kept)) >= 6, sorted(kept)


def test_adaptive_k_keeps_greedy_output_and_sizes_blocks_by_the_last_round(monkeypatch, pair_tiny):
    rounds = []
    accept = spec.accept_block

    def logged(logits, drafts, q, temperature):
        n, token = accept(logits, drafts, q, temperature)
        rounds.append((len(drafts), n))
        return n, token

    monkeypatch.setattr(spec, "accept_block", logged)
    k, max_new, runs, grew, shrank = 8, 40, [], False, False
    propose = Proposer.propose
    for case in [(3, k, 20), (4, k, 9), (6, k, 1)]:
        monkeypatch.setattr(Proposer, "propose", propose)  # oracle_drafts wraps the real one
        rounds.clear()
        runs += greedy_runs(monkeypatch, pair_tiny, [case], max_new=max_new, adaptive_k=True)
        size, generated = k, 0  # replay the rule over this run's rounds
        for proposed, kept in rounds:
            assert proposed == min(size, max_new - generated - 1)
            nxt = spec.next_block_size(size, kept, proposed, k)
            grew, shrank = grew or nxt > size, shrank or nxt < size
            size, generated = nxt, generated + kept + 1
    assert all(ok for _, ok, _, _ in runs) and sum(full for _, _, full, _ in runs) >= 2
    assert grew and shrank  # both directions were exercised


def test_off_by_one_verifier_fails(monkeypatch, pair_tiny):
    accept = spec.accept_block

    def off_by_one(logits, drafts, q, temperature):
        n, token = accept(logits, drafts, q, temperature)
        if n < len(drafts):  # keeps the first disagreeing draft too
            return n + 1, int(mx.argmax(logits[n + 1]).item())
        return n, token

    monkeypatch.setattr(spec, "accept_block", off_by_one)
    runs = greedy_runs(monkeypatch, pair_tiny, GREEDY_CASES[:4])
    assert not all(ok for _, ok, _, _ in runs)


def test_summary_counts(pair_tiny):
    target, ttok, drafter, dtok = pair_tiny
    events = list(speculative_stream_generate(target, ttok, drafter, dtok, "hello world", k=4, draft_steps=3,
                                              max_new_tokens=10, seed=0))
    s = events[-1]
    commits = [e for e in events if isinstance(e, Commit)]
    assert isinstance(s, SpeculativeSummary) and s.block_size == 4
    assert s.tokens == [t for c in commits for t in c.tokens] and len(s.tokens) <= 10
    assert s.target_forwards == len(commits) == s.canvases
    assert s.acceptance_length == pytest.approx(len(s.tokens) / len(commits))
    # denoising steps (at most 3 per round) plus one encode per round after the first
    assert s.drafter_forwards == sum(s.steps_per_canvas) + len(commits) - 1
    assert all(1 <= n <= 3 for n in s.steps_per_canvas[:-1])
    assert s.text == ttok.decode([t for t in s.tokens if t not in ttok.eos_token_ids])


# -- sampling -------------------------------------------------------------------------------


def exact_distribution(target, prompt, depth, temperature, eos, floor=1e-4):
    """The target's probability of each continuation of `prompt` up to `depth` tokens or
    an EOS (prefixes below `floor` are not expanded; their mass is left out), one batched
    forward per depth."""
    seqs = {(): 1.0}
    for _ in range(depth):
        keys = [s for s in seqs if not (s and s[-1] in eos)]
        batch = mx.array([prompt + list(s) for s in keys])
        logits = target(batch)[:, -1].astype(mx.float32)
        probs = np.array(mx.softmax(logits / temperature, axis=-1))
        nxt = {s: p for s, p in seqs.items() if s and s[-1] in eos}
        for s, row in zip(keys, probs):
            for t in np.nonzero(seqs[s] * row >= floor)[0]:
                nxt[s + (int(t),)] = seqs[s] * float(row[t])
        seqs = nxt
    return seqs


def close_drafts(monkeypatch, target, temperature):
    """Drafts x_i from q_i = half the drafter's distribution, half the target's after
    x_<i: any q drawn before x_i keeps the output exact, and this one agrees often enough
    that acceptance, rejection and the bonus token are all exercised."""
    propose = Proposer.propose

    def mixed(self, k, index, temperature_):
        _, logits, events = propose(self, k, index, 0.0)
        context, rows = list(self.denoiser.context), []
        for i in range(k):
            p = mx.softmax(target(mx.array(context)[None])[0, -1].astype(mx.float32) / temperature)
            q = 0.5 * mx.softmax(logits[i] / temperature) + 0.5 * p
            rows.append(mx.log(q) * temperature)  # softmax(row / T) == q
            context.append(int(mx.random.categorical(mx.log(q)).item()))
        return context[-k:], mx.stack(rows), events

    monkeypatch.setattr(Proposer, "propose", mixed)


def track_context(monkeypatch):
    """Records the drafter's context on its denoiser (for `close_drafts`)."""
    encode = Proposer.encode

    def recording(self, ids):
        self.denoiser.context = list(getattr(self.denoiser, "context", [])) + list(ids)
        encode(self, ids)

    monkeypatch.setattr(Proposer, "encode", recording)


def sampled_counts(pair, prompt, runs, temperature, depth=3, first_seed=0):
    target, ttok, drafter, dtok = pair
    counts = {}
    for seed in range(first_seed, first_seed + runs):
        events = speculative_stream_generate(target, ttok, drafter, dtok, prompt, k=2, draft_steps=1,
                                             max_new_tokens=depth, temperature=temperature, seed=seed)
        key = tuple(list(events)[-1].tokens)
        counts[key] = counts.get(key, 0) + 1
    return counts


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-square with an integer number of degrees of freedom (closed
    form: a Poisson tail for even df, with an erfc term for odd)."""
    h = x / 2
    if df % 2 == 0:
        return math.exp(-h) * sum(h**i / math.factorial(i) for i in range(df // 2))
    return math.erfc(math.sqrt(h)) + math.exp(-h) * sum(h ** (i - 0.5) / math.gamma(i + 0.5)
                                                         for i in range(1, (df + 1) // 2))


def chi_square_pvalue(counts, probs, runs):
    """Pearson's test over the outcomes expected at least 5 times, the rest pooled."""
    big = [s for s, p in probs.items() if p * runs >= 5]
    observed = [counts.get(s, 0) for s in big]
    expected = [probs[s] * runs for s in big]
    observed.append(runs - sum(observed))
    expected.append(runs - sum(expected))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return chi2_sf(stat, len(observed) - 1), len(big)


def marginal(dist, i):
    """The distribution of the i-th token (None: the run ended before it)."""
    out = {}
    for s, p in dist.items():
        t = s[i] if i < len(s) else None
        out[t] = out.get(t, 0) + p
    return out


def pvalues(counts, probs, runs):
    """Chi-square p-values of the joint distribution of the first three tokens, then of
    each token alone (the joint's cells are few: a random model repeats itself)."""
    return [chi_square_pvalue(counts, probs, runs)] + [
        chi_square_pvalue(marginal(counts, i), marginal(probs, i), runs) for i in range(3)]


def test_chi2_sf_known_values():
    # The 5% critical values of 1, 2 and 7 degrees of freedom; df 2 is exp(-x/2).
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-12)
    assert chi2_sf(5.991464547107979, 2) == pytest.approx(0.05, rel=1e-12)
    assert chi2_sf(14.067140449340169, 7) == pytest.approx(0.05, rel=1e-12)
    assert chi2_sf(0.0, 5) == pytest.approx(1.0)


SAMPLING_PROMPT = random_prompt(128, 6, 7)
SAMPLING_TEMPERATURE = 2.0


def test_sampling_matches_target_distribution(monkeypatch, pair_tiny):
    target, ttok = pair_tiny[:2]
    temperature, runs = SAMPLING_TEMPERATURE, 300
    probs = exact_distribution(target, SAMPLING_PROMPT, 3, temperature, ttok.eos_token_ids)
    track_context(monkeypatch)
    close_drafts(monkeypatch, target, temperature)
    accepted = []
    accept = spec.accept_block
    monkeypatch.setattr(spec, "accept_block", lambda *a: accepted.append(accept(*a)) or accepted[-1])
    tests = pvalues(sampled_counts(pair_tiny, SAMPLING_PROMPT, runs, temperature), probs, runs)
    assert all(p > 1e-3 for p, _ in tests), tests
    assert tests[0][1] >= 6 and all(cells >= 2 for _, cells in tests), f"too few outcomes to test: {tests}"
    kept = np.bincount([n for n, _ in accepted], minlength=3)
    assert (kept > 0.1 * kept.sum()).all(), kept  # 0, 1 and 2 drafts kept (then a bonus token)

    # An always-accept rule (the drafts are kept whatever the target says) fails the test.
    def always(logits, drafts, q, temperature):
        return len(drafts), int(mx.random.categorical(logits[len(drafts)] / temperature).item())

    monkeypatch.setattr(spec, "accept_block", always)
    broken = pvalues(sampled_counts(pair_tiny, SAMPLING_PROMPT, 100, temperature), probs, 100)
    assert min(p for p, _ in broken) < 1e-4, broken


# -- errors -----------------------------------------------------------------------------------


def test_tokenizer_mismatch(tmp_path, pair_tiny, ckpt_mixed, ckpt_tiny):
    target, ttok, drafter, _ = pair_tiny
    _, other = load(ckpt_mixed)
    with pytest.raises(ValueError, match=r"^the target's tokenizer differs from the drafter's \(128 vs 384 tokens; "
                                         r"id 128 is None in the target's, '<unused_\d+>' in the drafter's\): "
                                         r"use a Gemma 4 target"):
        next(speculative_stream_generate(target, ttok, drafter, other, [5, 6]))
    # Same size, two ids swapped.
    swapped = tmp_path / "swapped"
    shutil.copytree(ckpt_tiny, swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a_id = vocab["a"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    _, swapped_tok = load(swapped)
    differs = rf"\(128 vs 128 tokens; id {a_id} is 'a' in the target's, 'b' in the drafter's\)"
    with pytest.raises(ValueError, match=differs):
        next(speculative_stream_generate(target, ttok, drafter, swapped_tok, [5, 6]))


def test_context_limits(pair_tiny):
    target, ttok, drafter, dtok = pair_tiny
    with pytest.raises(ValueError, match=r"^prompt too long: 10 context tokens \+ up to 1022 generated exceed the "
                                         r"drafter's 1024-token context; shorten the prompt or lower max_new_tokens$"):
        next(speculative_stream_generate(target, ttok, drafter, dtok, list(range(5, 15)), k=8, max_new_tokens=1014))
    saved = target.args.max_position_embeddings
    target.args.max_position_embeddings = 64
    try:
        with pytest.raises(ValueError, match=r"up to 62 generated exceed the target's 64-token context"):
            next(speculative_stream_generate(target, ttok, drafter, dtok, list(range(5, 15)), k=8, max_new_tokens=54))
    finally:
        target.args.max_position_embeddings = saved


def test_bad_settings(pair_tiny):
    target, ttok, drafter, dtok = pair_tiny
    with pytest.raises(ValueError, match=r"^k \(draft tokens per round\) must be an integer >= 1 \(got 0\)$"):
        next(speculative_stream_generate(target, ttok, drafter, dtok, [5], k=0))
    with pytest.raises(ValueError, match=r"^temperature must be >= 0 \(got -1\); 0 is greedy$"):
        next(speculative_stream_generate(target, ttok, drafter, dtok, [5], temperature=-1))


# -- the command line ----------------------------------------------------------------------------


def test_generate_command_with_target(pair_tiny, target_tiny, ckpt_tiny, ckpt_mixed, capsys):
    from mlx_diffgemma import cli

    argv = ["generate", "--model", str(ckpt_tiny), "--target", str(target_tiny), "--raw", "--prompt", "hi there",
            "--max-new-tokens", "12", "--draft-tokens", "3", "--draft-steps", "2", "--seed", "0", "--verbose"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    target, ttok, drafter, dtok = pair_tiny
    text = spec.speculative_generate(target, ttok, drafter, dtok, "hi there", k=3, draft_steps=2,
                                     max_new_tokens=12, seed=0)
    assert out == text + "\n"
    assert re.search(r"\d+ rounds · acceptance \d+\.\d\d tok/round \(k=3\) · \d+ target \+ \d+ drafter forwards", err)

    assert cli.main(["generate", "--model", str(ckpt_mixed), "--target", str(target_tiny), "--prompt", "hi"]) == 2
    assert "the target's tokenizer differs from the drafter's (128 vs 384 tokens" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(ckpt_tiny), "--target", str(ckpt_tiny), "--prompt", "hi"]) == 2
    assert f"cannot load the target '{ckpt_tiny}' with mlx-lm" in capsys.readouterr().err
    image = ckpt_tiny / "config.json"  # refused before any file is read
    assert cli.main(["generate", "--model", str(ckpt_tiny), "--target", str(target_tiny), "--image", str(image),
                     "--prompt", "hi"]) == 2
    assert "--image with --target is not supported" in capsys.readouterr().err


# -- chat ----------------------------------------------------------------------------------------


def test_chat_turns_are_the_targets_greedy_replies(pair_tiny):
    """Three turns through ChatSession with the speculative backend: each reply is mlx-lm's
    greedy continuation of the rendered conversation (up to a near-tie), and both caches
    go back to the conversation's stable boundary after every turn, with no re-encode."""
    from mlx_diffgemma.chat.backends import SpeculativeBackend
    from mlx_diffgemma.chat.prompt import split_prompt
    from mlx_diffgemma.chat.session import ChatSession

    target, ttok, drafter, dtok = pair_tiny
    backend = SpeculativeBackend(drafter, target, ttok, k=4)
    session = ChatSession(drafter, dtok, max_new_tokens=20, max_denoising_steps=2, seed=0, mode="fast",
                          backend=backend)
    compared = 0
    for text in ("hi", "tell me more", "ok"):
        split = split_prompt(dtok, session.conversation(text))
        ref, gaps = reference_greedy(target, split.ids, 20)
        summary = [e for e in session.send(text) if isinstance(e, SpeculativeSummary)][0]
        got = summary.tokens
        sure = next((i for i, g in enumerate(gaps[: len(got)]) if g < NEAR_TIE), len(got))
        assert got[:sure] == ref[:sure]
        compared += sure
        assert session.cache.drafter.offset == len(session.cached_ids) == session.cache.target[0].offset
    assert session.resets == 0 and compared >= 30


# -- the server ----------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_with_a_target_replies_with_the_targets_greedy_output(monkeypatch):
    """`serve --target`: the reply is the trained target's greedy answer (teacher-forced on
    the target: every token its argmax where the decision is not a near-tie), `temperature`
    is the target's (0 accepted), and a second turn reuses the cache."""
    import argparse
    import threading

    import requests

    from mlx_diffgemma.chat.backends import SpeculativeBackend
    from mlx_diffgemma.chat.prompt import split_prompt
    from mlx_diffgemma.models.paths import ASSETS_DIR
    from mlx_diffgemma.serve.http import Server, add_serve_args, build_engine

    root = ASSETS_DIR.parents[1]
    args = add_serve_args(argparse.ArgumentParser()).parse_args(
        ["--model", "toy-sudoku", "--target", str(root / "benchmarks" / "toy-sudoku-target"), "--port", "0"])
    verified = []
    verify = spec.Target.verify
    monkeypatch.setattr(spec.Target, "verify", lambda self, ids: verified.append(len(ids)) or verify(self, ids))
    engine = build_engine(args)
    assert isinstance(engine.session.backend, SpeculativeBackend)
    srv = Server(engine, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        target = engine.session.backend.target
        held = json.loads((ASSETS_DIR / "toy-sudoku" / "hf" / "heldout.json").read_text())["puzzles"]
        messages = []
        for turn, item in enumerate(held[:2]):
            messages.append({"role": "user", "content": item["puzzle"]})
            r = requests.post(srv.url + "/v1/chat/completions", timeout=120, json={
                "messages": messages, "temperature": 0, "max_tokens": 17}).json()
            reply = r["choices"][0]["message"]["content"]
            assert r["choices"][0]["finish_reason"] == "stop" and len(reply) == 16
            assert 0 < len(verified) < 17  # the target checked blocks, fewer forwards than tokens
            verified.clear()
            ids = split_prompt(engine.tokenizer, messages).ids
            out = engine.tokenizer.encode(reply, add_special_tokens=False) + [5]  # <turn|>
            logits = target(mx.array([ids + out]))[0, len(ids) - 1 :].astype(mx.float32)
            for i, tok in enumerate(out):
                row = np.array(logits[i])
                assert tok == int(row.argmax()) or top2_gap(row) < NEAR_TIE, (turn, i)
            assert (r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0) == (turn > 0)
            messages.append({"role": "assistant", "content": reply})
        bad = requests.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": messages[:1], "temperature": 3})
        assert bad.status_code == 400 and "temperature" in bad.text
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()
