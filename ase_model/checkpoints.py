"""Checkpoints: atomic writes, the previous checkpoint kept as a fallback, and the random-number state a run
resumes from."""

import contextlib
import os
import random
import tempfile

import numpy as np
import torch

from .errors import UserError


def previous_path(path: str, kind: str = "prev") -> str:
    """last.pt -> last.prev.pt: where save_atomic(..., keep_previous=True) keeps the file it replaces (kind
    "damaged": where read_latest moves a file it could not read)."""
    root, ext = os.path.splitext(path)
    return f"{root}.{kind}{ext}"


def _sync_directory(directory: str) -> None:
    """A rename is on disk only once its directory is: without this, a power cut may undo it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_atomic(source: str, target: str, link: str) -> None:
    """target becomes a hard link to source in one rename, through the temporary name link, which is removed if
    that fails."""
    try:
        os.link(source, link)
        os.replace(link, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(link)
        raise


def write_atomic(path: str, write, keep_previous: bool = False) -> None:
    """Call write(file) on a temporary file of a unique name in path's directory, flush it to disk, rename it to
    path and flush the directory: a crash or a power cut leaves the old file or the new one, and concurrent writers
    never share a temporary file.
    keep_previous: the file being replaced stays as previous_path(path) (a hard link, so path always exists)."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            _link_atomic(path, previous_path(path), f"{tmp}.prev")
        os.replace(tmp, path)
        _sync_directory(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_atomic(obj, path: str, keep_previous: bool = False) -> None:
    """torch.save(obj) to path atomically (see write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f), keep_previous)


def write_text_atomic(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def read_checkpoint(path: str) -> dict:
    """A checkpoint written by the trainer; UserError naming the file if it is missing, damaged or foreign."""
    if not os.path.isfile(path):
        raise UserError(f"no such checkpoint: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, foreign pickle, text file: torch raises many types
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not {"model", "args"} <= set(state):
        raise UserError(f"{path} is not a checkpoint of ase_model.train (no model weights and options in it)")
    return state


def read_latest(path: str, log, repair: bool = False) -> dict:
    """The state in path, or in previous_path(path) with a message when path is damaged or missing.
    repair (one process of a run): the damaged file moves to previous_path(path, "damaged") and path becomes the
    previous checkpoint again, so that the next save keeps a readable file as its previous one."""
    prev = previous_path(path)
    try:
        return read_checkpoint(path)
    except UserError as damaged:
        if not os.path.exists(prev):
            raise
        state = read_checkpoint(prev)
        log(f"{damaged}; resuming from the previous checkpoint {prev} (step {state.get('step')})")
        if repair:
            if os.path.exists(path):
                os.replace(path, previous_path(path, "damaged"))
                log(f"the damaged file is kept as {previous_path(path, 'damaged')}")
            _link_atomic(prev, path, f"{prev}.{os.getpid()}.tmp")
            _sync_directory(os.path.dirname(os.path.abspath(path)))
        return state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
