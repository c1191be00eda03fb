"""Host time that a test can hold: after its first call at a shape, an autotuned launch goes straight to the chosen
configuration (ase_kernels/kernels/lowrank.py, _expand), with no autotuner lookup per call; and the chosen
configuration is the autotuner's. Under the interpreter the autotuner holds one configuration and tunes nothing,
but its per-call lookup (Autotuner.run) is the same code path that a GPU would take."""

import pytest
import torch
from triton.runtime.autotuner import Autotuner

from ase_kernels import ASEMlp
from ase_kernels.kernels import lowrank


@pytest.fixture
def autotuner_calls(monkeypatch):
    """Counts Autotuner.run calls (each one builds a key and looks up the tuned configuration)."""
    calls = []
    run = Autotuner.run

    def counting(self, *args, **kwargs):
        calls.append(self.base_fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counting)
    return calls


def test_no_autotuner_lookup_after_the_first_call(monkeypatch, autotuner_calls):
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "triton")
    monkeypatch.setattr(lowrank, "_expand_choice", {})
    mlp = ASEMlp(32, 64, num_experts=8, top_k=2, num_shared=1, rank=2, num_tasks=2)
    x = torch.randn(2, 5, 32, requires_grad=True)
    ids = torch.tensor([0, 1])
    mlp(x, ids).sum().backward()
    first = len(autotuner_calls)
    assert first > 0, "the first call tunes (or looks up) every autotuned launch once"
    assert len(lowrank._expand_choice) == first, lowrank._expand_choice.keys()
    for _ in range(2):
        mlp(x, ids).sum().backward()
    assert len(autotuner_calls) == first, autotuner_calls[first:]
    # what is remembered is the autotuner's own choice (its only configuration under the interpreter)
    assert all(any(launch.config is k for k in lowrank._expand_kernel.configs)
               for launch in lowrank._expand_choice.values())


def test_launch_caches_stay_bounded(monkeypatch):
    """The per-shape launch caches hold the token count: a run with ever new batch shapes empties a full cache
    instead of growing it without bound."""
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "triton")
    monkeypatch.setattr(lowrank, "_MAX_LAUNCHES", 2)
    monkeypatch.setattr(lowrank, "_shrink_launches", {})
    mlp = ASEMlp(32, 64, num_experts=8, top_k=2, num_shared=1, rank=2)
    for tokens in (1, 2, 3, 4, 5):
        mlp(torch.randn(tokens, 32))
        assert 1 <= len(lowrank._shrink_launches) <= 2, lowrank._shrink_launches.keys()
