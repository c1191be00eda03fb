"""The trainer's state in a checkpoint: what last.pt and best.pt hold, and how a run continues from them."""

import os

from .checkpoints import rng_state, save_atomic, set_rng_state
from .errors import UserError


class Resumable:
    """Saving and loading the trainer's whole state. Expects `model`, `optimizer`, `scheduler`, `args`, `main`, the
    counters (`step`, `epoch`, `step_in_epoch`), `epoch_sums`, `best`, `history`, `saved` and `flush`."""

    def checkpoint(self, name: str) -> None:
        self.flush()  # the losses of every step so far are read and finite before anything is saved
        if not self.main or (name == "last.pt" and self.saved == (self.step, self.epoch)):
            return  # (saved already: last.prev.pt stays the checkpoint before it)
        if name == "last.pt":
            self.saved = (self.step, self.epoch)
        state = dict(model=self.model.trainable_state_dict(), optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), step=self.step, epoch=self.epoch,
                     step_in_epoch=self.step_in_epoch, epoch_sums=self.epoch_sums, best=self.best,
                     history=self.history, rng=rng_state(),
                     args=vars(self.args))
        save_atomic(state, os.path.join(self.args.output, name), keep_previous=name == "last.pt")

    def load(self, state: dict, training: bool = True, path: str = "the checkpoint") -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if unexpected or trainable - set(state["model"]):
            raise UserError(f"{path} does not fit this model: unexpected {unexpected[:5]}, "
                            f"missing {sorted(trainable - set(state['model']))[:5]}")
        if training:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
            self.best, self.history, self.epoch_sums = state["best"], state["history"], state["epoch_sums"]
            set_rng_state(state["rng"])

    def apply_schedule(self) -> None:
        """A resumed run with a changed --lr, --weight-decay, --epochs, --warmup-steps or --schedule: the optimizer
        and scheduler states loaded from the checkpoint take the new values from this step on."""
        scheduler, args = self.scheduler, self.args
        scheduler.base_lrs = [args.lr for _ in self.optimizer.param_groups]
        for group, f in zip(self.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"], group["weight_decay"] = args.lr, args.weight_decay
            group["lr"] = args.lr * f(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
