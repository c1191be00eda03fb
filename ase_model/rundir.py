"""The run directory (--output): one run at a time (an exclusive lock held for the run's life), and whether a
run starts fresh, resumes, or is refused. Nothing in the directory changes until `start` (just before the
first step), so a run refused or failing while it sets up leaves an existing run as it was."""

import fcntl
import os
import shutil

from .errors import UserError

CHECKPOINTS = ("last.pt", "last.prev.pt")
# what a training run writes: --overwrite clears these and refuses to delete anything else
RUN_FILES = {"config.yaml", "metrics.jsonl", "last.pt", "last.prev.pt", "last.damaged.pt", "best.pt", "tb",
             "eval_config.yaml", "eval_metrics.json"}


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or name.endswith((".png", ".tmp")) or name.startswith(".")


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.fd = None
        self.created = False

    def entries(self) -> list[str]:
        return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []

    def lock(self) -> None:
        """Take the directory's exclusive lock (flock on the directory itself, so no lock file is left behind);
        a second run into the same --output is refused while the first holds it."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--output {self.path} is a file, not a directory")
        if not os.path.exists(self.path):
            os.makedirs(self.path)
            self.created = True
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"--output {self.path} is in use by another run (it holds the directory's lock); "
                            "wait for it to end or choose another --output") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if self.created and not self.entries():
                os.rmdir(self.path)  # a run refused while it set up leaves no empty directory behind

    def checkpoint(self, resume: bool, overwrite: bool) -> str | None:
        """The checkpoint this run continues from (None: a fresh run), or UserError when the directory holds
        another run that this one must not mix with."""
        entries = self.entries()
        if resume:
            if any(name in entries for name in CHECKPOINTS):
                # also when only last.prev.pt is left: read_latest falls back to it, with a message
                return os.path.join(self.path, "last.pt")
            if entries:
                raise UserError(f"--resume: {self.path} holds {', '.join(entries[:5])} but no last.pt to resume "
                                "from; start it anew with --overwrite or choose another --output")
            return None
        if entries and not overwrite:
            raise UserError(f"--output {self.path} already holds a run ({', '.join(entries[:5])}): continue it "
                            "with --resume, start it anew with --overwrite, or choose another --output")
        if overwrite:
            foreign = [e for e in entries if not _is_run_file(e)]
            if foreign:
                raise UserError(f"--overwrite: {self.path} holds files a run does not write "
                                f"({', '.join(foreign[:5])}); it only clears run directories: remove them or choose "
                                "another --output")
        return None

    def clear(self) -> None:
        """--overwrite, once the new run is validated: remove what the old run wrote."""
        for name in self.entries():
            path = os.path.join(self.path, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
