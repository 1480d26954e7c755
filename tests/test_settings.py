"""One `Settings` per request, whichever dialect it came in: the OpenAI body, the command
line's flags and the REPL's `/set` give equal Settings for the same request, and a server
request builds its GenerationConfig once."""

from __future__ import annotations

import argparse

import pytest

from mlx_diffgemma.chat.options import add_generation_args, flag_changes
from mlx_diffgemma.generation.settings import Settings, SettingsError, parse_set, resolve
from mlx_diffgemma.models.config import GenerationConfig
from mlx_diffgemma.serve.openai import request_settings

BASE = Settings(GenerationConfig(max_new_tokens=64))


def _flags(*argv):
    p = argparse.ArgumentParser()
    add_generation_args(p)
    return resolve(BASE, **flag_changes(p.parse_args(list(argv))))


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_the_three_dialects_give_equal_settings(mode):
    body = {"max_tokens": 96, "max_denoising_steps": 12, "entropy_bound": 0.2, "t_min": 0.3, "t_max": 0.9,
            "seed": 7, "mode": mode}
    from_openai = request_settings(body, BASE)
    from_flags = _flags("--max-new-tokens", "96", "--steps", "12", "--entropy-bound", "0.2",
                        "--temp", "0.3-0.9", "--seed", "7", "--mode", mode)
    from_set = resolve(BASE, **parse_set({"max_new_tokens": "96", "steps": "12", "entropy": "0.2",
                                          "temp": "0.3-0.9", "seed": "7", "mode": mode}))
    assert from_openai == from_flags == from_set
    assert from_set == Settings(GenerationConfig(max_new_tokens=96, max_denoising_steps=12, entropy_bound=0.2,
                                                 t_min=0.3, t_max=0.9), mode, None, 7)


def test_the_target_temperature_in_each_dialect():
    from_openai = request_settings({"temperature": 0.5, "max_denoising_steps": 1, "mode": "fast"}, BASE,
                                   target=True)
    from_flags = _flags("--target", "some-model", "--target-temp", "0.5", "--draft-steps", "1")
    assert from_openai == from_flags
    assert from_flags.target_temperature == 0.5 and from_flags.mode == "fast"
    assert from_flags.gen == BASE.gen.with_overrides(max_denoising_steps=1)


def test_openai_temperature_scales_the_schedule():
    s = request_settings({"temperature": 0.5}, BASE)
    assert (s.gen.t_min, s.gen.t_max) == (BASE.gen.t_min * 0.5, BASE.gen.t_max * 0.5)
    assert s.target_temperature is None


@pytest.mark.parametrize("changes, field, message", [
    ({"mode": "greedy"}, "mode", "mode must be one of reference, fast"),
    ({"seed": -1}, "seed", "seed must be an integer from 0"),
    ({"max_new_tokens": 300}, "max_new_tokens", "reserves 512 tokens, the whole 512-token context"),
])
def test_resolve_checks_mode_seed_and_context(changes, field, message):
    with pytest.raises(SettingsError, match=message) as e:
        resolve(BASE, context=(256, 512), **changes)
    assert e.value.field == field
    with pytest.raises(SettingsError, match="fast mode runs on the MLX backend only"):
        resolve(BASE, backend="torch", mode="fast")
