"""ase_model/signals.py and ase_model/runlog.py on their own: the trainer's signal handling and its loss read-back,
on a stand-in object with the attributes they expect (the trainer's whole runs are in test_train.py)."""

import signal
import types

import pytest
import torch

from ase_model.runlog import RunLog
from ase_model.signals import SignalStop, Stop


class _Trainer(SignalStop, RunLog):
    def __init__(self, world: int = 1, output: str = "."):
        self.signal = self.agreed_signal = None
        self.world, self.main, self.writer = world, True, None
        self.saved, self.messages = [], []
        self.args = types.SimpleNamespace(output=output)
        self.pending, self.stat_names, self.epoch_sums, self.step, self.epoch = [], ["loss", "mi"], {}, 0, 0

    def log(self, msg: str) -> None:
        self.messages.append(msg)

    def checkpoint(self, name: str) -> None:
        self.saved.append(name)


def test_a_signal_finishes_the_step_then_saves_and_stops():
    t = _Trainer()
    t.stop_if_signalled()  # no signal: nothing happens
    assert t.saved == []
    t.on_signal(signal.SIGTERM, None)
    assert t.saved == [] and "SIGTERM" in t.messages[-1]  # the step in progress is not cut
    with pytest.raises(Stop) as stop:
        t.stop_if_signalled()
    assert stop.value.signum == signal.SIGTERM and t.saved == ["last.pt"]


def test_a_second_ctrl_c_stops_at_once():
    t = _Trainer()
    t.on_signal(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        t.on_signal(signal.SIGINT, None)


def test_under_torchrun_only_the_agreed_signal_stops():
    t = _Trainer(world=2)
    t.on_signal(signal.SIGTERM, None)
    t.stop_if_signalled()  # this rank's signal alone: the ranks have not agreed yet
    assert t.saved == []
    t.agreed_signal = signal.SIGTERM
    with pytest.raises(Stop):
        t.stop_if_signalled()


def test_the_previous_handlers_come_back_after_the_block():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    t = _Trainer()
    with t.catching_signals():
        assert signal.getsignal(signal.SIGTERM) == t.on_signal and signal.getsignal(signal.SIGINT) == t.on_signal
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("row,what", [([float("nan"), 0.0, 1.0], "non-finite loss"),
                                      ([1.0, 0.0, float("inf")], "non-finite gradient norm")])
def test_flush_stops_on_a_non_finite_step_naming_it(tmp_path, row, what):
    t = _Trainer(output=str(tmp_path))
    t.pending, t.step = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor(row)], 2
    with pytest.raises(FloatingPointError, match=f"{what}.* at step 2 "):
        t.flush()


def test_flush_sums_the_steps_losses_for_the_epoch(tmp_path):
    t = _Trainer(output=str(tmp_path))
    t.pending, t.step = [torch.tensor([1.0, 0.25, 1.0]), torch.tensor([2.0, 0.5, 1.0])], 2
    t.flush()
    assert t.pending == [] and t.epoch_sums == {"loss": 3.0, "mi": 0.75}
