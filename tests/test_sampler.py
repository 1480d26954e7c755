"""The sampler's pieces against hand-computed small cases."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma.generation.loop import pad_after_eos
from mlx_diffgemma.generation.sampler import entropy_bound_accept, stable_and_confident, token_entropy
from mlx_diffgemma.models.config import GenerationConfig


def test_token_entropy_matches_closed_form():
    # Uniform over 4 -> log 4; one-hot-ish -> ~0; two equal of three with -inf-like third.
    logits = mx.array([[[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [1.0, 1.0, -80.0, -80.0]]])
    h = np.array(token_entropy(logits))[0]
    np.testing.assert_allclose(h, [math.log(4), 0.0, math.log(2)], atol=1e-5)


def test_entropy_bound_acceptance_on_crafted_entropies():
    # Canvas order entropies; sorted: 0.01 (pos 3), 0.02 (pos 0), 0.05 (pos 4), 0.3 (pos 1), 0.9 (pos 2)
    h = mx.array([[0.02, 0.3, 0.9, 0.01, 0.05]])
    # cumsum - own:  0, 0.01, 0.03, 0.08, 0.38  -> bound 0.1 accepts the first four sorted.
    mask = np.array(entropy_bound_accept(h, 0.1))[0]
    assert mask.tolist() == [True, True, False, True, True]
    # bound 0.02 accepts 0, 0.01 -> positions 3 and 0 only.
    mask = np.array(entropy_bound_accept(h, 0.02))[0]
    assert mask.tolist() == [True, False, False, True, False]
    # The lowest-entropy position is always accepted, whatever its entropy.
    mask = np.array(entropy_bound_accept(mx.array([[5.0, 4.0, 6.0]]), 0.1))[0]
    assert mask.tolist() == [False, True, False]


def test_temperature_at_first_and_last_step():
    g = GenerationConfig(max_denoising_steps=48, t_min=0.4, t_max=0.8)
    assert g.temperature(48) == pytest.approx(0.8)
    assert g.temperature(1) == pytest.approx(0.4 + 0.4 / 48)
    assert g.temperature(24) == pytest.approx(0.6)


def test_stopping_rule_stability_window():
    conf = mx.array([[0.001, 0.001]])  # mean entropy 0.001 < 0.005: confident
    a = mx.array([[3, 4]])
    b = mx.array([[3, 5]])
    # threshold 2: needs the same argmax on the two previous steps as well.
    stop, hist = stable_and_confident(a, None, conf, 2, 0.005)
    assert not stop.item()  # history starts at -1
    stop, hist = stable_and_confident(a, hist, conf, 2, 0.005)
    assert not stop.item()  # one equal previous step, one -1
    stop, hist = stable_and_confident(a, hist, conf, 2, 0.005)
    assert stop.item()
    stop, hist = stable_and_confident(b, hist, conf, 2, 0.005)
    assert not stop.item()  # changed
    # Not confident: never stops even when stable.
    unsure = mx.array([[0.5, 0.5]])
    stop, _ = stable_and_confident(a, mx.array([[[3, 4]]]), unsure, 1, 0.005)
    assert not stop.item()
    # Threshold 0: confidence alone decides.
    stop, hist = stable_and_confident(a, None, conf, 0, 0.005)
    assert stop.item() and hist is None


def test_eos_padding():
    assert pad_after_eos([5, 6, 1, 7, 1, 8], [1, 106], 0) == ([5, 6, 1, 0, 0, 0], True)
    assert pad_after_eos([5, 106, 7], [1, 106], 0) == ([5, 106, 0], True)
    assert pad_after_eos([5, 6, 7], [1, 106], 0) == ([5, 6, 7], False)
    assert pad_after_eos([1, 6, 7], None, 0) == ([1, 6, 7], False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_denoising_steps": 0}, "max_denoising_steps must be an integer >= 1"),
        ({"entropy_bound": 0.0}, "entropy_bound must be > 0"),
        ({"entropy_bound": -1.0}, "entropy_bound must be > 0"),
        ({"t_min": 0.9, "t_max": 0.5}, "t_min must not exceed t_max"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"confidence_threshold": 0.0}, "confidence_threshold must be > 0"),
        ({"stability_threshold": -1}, "stability_threshold must be an integer >= 0"),
    ],
)
def test_out_of_range_parameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig.from_model_dir(None, **kwargs)


def test_unknown_parameter_is_rejected():
    with pytest.raises(TypeError, match="unknown generation parameter 'temperature'"):
        GenerationConfig.from_model_dir(None, temperature=0.7)


def test_checkpoint_defaults_and_overrides(tmp_path):
    (tmp_path / "config.json").write_text('{"eos_token_id": [1, 106]}')
    (tmp_path / "generation_config.json").write_text(
        '{"max_denoising_steps": 20, "sampler_config": {"entropy_bound": 0.3, '
        '"_cls_name": "EntropyBoundSamplerConfig"}, "eos_token_id": [1, 106, 50]}'
    )
    g = GenerationConfig.from_model_dir(tmp_path)
    assert (g.max_denoising_steps, g.entropy_bound, g.eos_token_id) == (20, 0.3, [1, 106, 50])
    assert g.t_min == 0.4 and g.confidence_threshold == 0.005  # released values fill the gaps
    g = GenerationConfig.from_model_dir(tmp_path, max_denoising_steps=5, eos_token_id=None)
    assert g.max_denoising_steps == 5 and g.eos_token_id is None


@pytest.mark.parametrize("seed", [-5, 2**64, 1.5, "7", None, True])
def test_seeded_noise_refuses_bad_seeds_at_once(seed):
    from mlx_diffgemma.generation.noise import SeededNoise

    with pytest.raises(ValueError, match="seed"):
        SeededNoise(seed)
    assert SeededNoise(np.int64(3)).seed == 3 and SeededNoise(2**64 - 1).seed == 2**64 - 1
