"""Learner RNG states round-trip through safetensors + JSON (never through pickle)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cai_ray.training.learner import _load_rng_state, _save_rng_state


def test_rng_state_round_trip_without_pickle(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    _save_rng_state(tmp_path / "rank0")
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist())
    _load_rng_state(tmp_path / "rank0")
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist())
    assert first == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank0.safetensors"]
