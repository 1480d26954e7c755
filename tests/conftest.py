"""Shared fixtures: tiny DiffusionGemma checkpoints built once per session.

`ckpt_tiny`, `ckpt_mixed`, `ckpt_wide`: directories made by
`tiny_checkpoints.make_checkpoint` (seed 0) plus the tiny tokenizer;
`ckpt_factory("vision")`: the mixed text model with a small vision tower in use;
`ckpt_mixed_sc01`: the mixed shape with the self-conditioning down_proj scaled by 0.1
(keeps self-conditioning from amplifying float differences in long parity runs).
`ref_*`: the matching transformers reference models (float32, eval).
`ckpt_factory(shape, seed=0, sc_down_scale=1.0, dtype=torch.float32)`: any other
variant, built once per session per argument set.
"""

from __future__ import annotations

import os
import sys

# A 2-core machine shared with other jobs: torch's default of one intra-op thread per
# core makes every tiny op wait on a busy sibling (10 ms per small matmul instead of
# microseconds). One thread keeps the reference runs fast. Must be set before torch
# is imported; `pytest_configure` covers the case where it already was.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


def pytest_configure(config):
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def _torch_single_thread():
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return torch


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """`make(shape="mixed", seed=0, sc_down_scale=1.0, dtype=None) -> Path` (cached)."""
    torch = _torch_single_thread()
    from tiny_checkpoints import SHAPES, make_checkpoint, write_tokenizer

    cache: dict = {}

    def make(shape: str = "mixed", seed: int = 0, sc_down_scale: float = 1.0, dtype=None):
        dtype = dtype or torch.float32
        key = (shape, int(seed), float(sc_down_scale), str(dtype))
        if key not in cache:
            name = f"{shape}-s{seed}-sc{sc_down_scale:g}-{str(dtype).split('.')[-1]}"
            path = tmp_path_factory.mktemp(name)
            make_checkpoint(path, shape=shape, seed=seed, sc_down_scale=sc_down_scale, dtype=dtype)
            write_tokenizer(path, SHAPES[shape]["text_config"]["vocab_size"],
                            vision="vision_config" in SHAPES[shape])
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def ckpt_tiny(ckpt_factory):
    return ckpt_factory("tiny")


@pytest.fixture(scope="session")
def ckpt_mixed(ckpt_factory):
    return ckpt_factory("mixed")


@pytest.fixture(scope="session")
def ckpt_wide(ckpt_factory):
    return ckpt_factory("wide")


@pytest.fixture(scope="session")
def ckpt_mixed_sc01(ckpt_factory):
    return ckpt_factory("mixed", sc_down_scale=0.1)


def _load(path):
    _torch_single_thread()
    from tiny_checkpoints import load_reference

    return load_reference(path)


@pytest.fixture(scope="session")
def ref_tiny(ckpt_tiny):
    return _load(ckpt_tiny)


@pytest.fixture(scope="session")
def ref_mixed(ckpt_mixed):
    return _load(ckpt_mixed)


@pytest.fixture(scope="session")
def ref_wide(ckpt_wide):
    return _load(ckpt_wide)


@pytest.fixture(scope="session")
def ref_mixed_sc01(ckpt_mixed_sc01):
    return _load(ckpt_mixed_sc01)


# Fixtures that build transformers checkpoints: a test using any of them (directly or
# through another fixture) is marked slow, so `pytest -m "not slow"` is the fast loop.
# Files whose tests start servers, processes or train toys mark themselves.
SLOW_FIXTURES = {"ckpt_factory"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
