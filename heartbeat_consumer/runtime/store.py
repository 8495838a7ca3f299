"""Persistence of :class:`AgentState`: atomic writes, corrupt files set aside, clear errors.

A save writes a temporary file in the same directory, fsyncs it, renames it over the
state file and fsyncs the directory, so a kill at any point leaves either the old or
the new state, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import orjson

from ..core.config import read_bounded
from ..core.state import HISTORY_LIMIT, MAX_PAUSES, AgentState, repair_ranges
from ..core.timeutil import iso

__all__ = [
    "AgentBusy",
    "AgentLock",
    "StateError",
    "StateStore",
    "atomic_write",
    "corrupt_path",
    "default_state_path",
    "load_file",
]

T = TypeVar("T")

log = logging.getLogger("heartbeat_consumer.store")

MAX_STATE_BYTES = 16 * 1024 * 1024
"""A state file larger than this is refused (with pauses and history bounded, an
agent's state stays far below it)."""


class StateError(Exception):
    """The state file cannot be used (unwritable directory, failed write)."""


class AgentBusy(Exception):
    """Another consumer of the same agent holds its lock in the same state directory."""


class AgentLock:
    """One consumer per agent and state directory: ``<state dir>/<agent>.lock``, held
    (flock) while the consumer runs, whichever way it was started (``run``, a fleet,
    :class:`~.consumer.HeartbeatConsumer`). A second one, in this process or another,
    gets :class:`AgentBusy`. The lock file names the holder's pid. A directory where no
    lock file can be made (read-only, say) does not stop the agent: it runs unlocked,
    with a warning, as it runs with its state in memory. Across hosts, the broker keeps
    replicas apart: ``--single-active-consumer``."""

    def __init__(self, directory: str | os.PathLike[str], agent: str) -> None:
        self.path = Path(directory) / f"{agent}.lock"
        self.agent = agent
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if not self._unlockable(exc):
                raise AgentBusy(
                    f"agent {self.agent}: cannot take its lock {self.path}: "
                    f"{exc.strerror or exc} (a symbolic link, a directory or another "
                    "user's file where the lock belongs?)"
                ) from None
            log.warning("%s: running without a lock (%s: %s)", self.agent, self.path, exc.strerror)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            raise AgentBusy(
                f"agent {self.agent} already runs with the state directory {self.path.parent} "
                f"({self.path} is held{f' by pid {holder}' if holder else ''}); "
                "one consumer per agent (replicas across hosts: --single-active-consumer)"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _unlockable(self, exc: OSError) -> bool:
        """A directory where no file can be made (read-only, not ours) runs unlocked;
        anything else in the lock's place is an error."""
        if exc.errno == errno.EROFS:
            return True
        return exc.errno in (errno.EACCES, errno.EPERM) and not os.path.lexists(self.path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return ""


def default_state_path(config_path: str | os.PathLike[str]) -> Path:
    """``<config file>.state.json`` beside the config."""
    path = Path(config_path)
    return path.with_name(path.name + ".state.json")


class StateStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def check_writable(self) -> None:
        """Raise :class:`StateError` with a clear message when saving cannot work."""
        directory = self.path.parent
        try:
            exists = directory.is_dir()
        except OSError as exc:
            raise StateError(
                f"cannot access state directory {directory}: {exc.strerror} "
                f"(state file {self.path})"
            ) from None
        if not exists:
            raise StateError(f"state directory {directory} does not exist (state file {self.path})")
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        except OSError as exc:
            raise StateError(
                f"cannot write state file {self.path}: {exc.strerror}; "
                "choose another with --state or HEARTBEAT_STATE_PATH"
            ) from None
        os.close(fd)
        Path(probe).unlink()
        if self.path.exists() and not os.access(self.path, os.R_OK):
            raise StateError(f"cannot read state file {self.path}")

    def load(
        self, now_ms: int | None = None, *, repair: bool = True
    ) -> tuple[AgentState, str | None]:
        """The saved state, or a fresh one; second value: a warning to report, if any.

        A corrupt file is renamed to ``<file>.corrupt`` and the state is rebuilt
        (with ``repair=False``, for read-only commands, it is only reported).
        """
        parsed, reason = load_file(self.path, _parse_state, repair=repair)
        if reason is None:
            state, fixed = parsed or (AgentState(), [])
            if not fixed:
                return state, None
            return state, f"state file {self.path}: repaired {'; '.join(fixed)}"
        if not repair:
            return AgentState(), f"state file {self.path} is corrupt ({reason})"
        aside = corrupt_path(self.path)
        when = f" at {iso(now_ms)}" if now_ms is not None else ""
        warning = (
            f"state file {self.path} was corrupt ({reason}); "
            f"moved to {aside.name} and rebuilt{when}; "
            "checks without state start from the config's lastRun"
        )
        return AgentState(), warning

    def save(self, state: AgentState) -> None:
        data = orjson.dumps(state.to_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        atomic_write(self.path, data + b"\n")


MAX_STATE_CHECKS = 100_000


def _parse_state(raw: bytes) -> tuple[AgentState, list[str]]:
    """The state and what was repaired in it; ValueError for a file that is not a state
    this package could have written (too many entries, a value it could not save)."""
    data = orjson.loads(raw)
    if isinstance(data, dict):
        checks, pauses, history = data.get("checks"), data.get("pauses"), data.get("history")
        if isinstance(checks, dict) and len(checks) > MAX_STATE_CHECKS:
            raise ValueError(f"{len(checks)} checks, at most {MAX_STATE_CHECKS}")
        if isinstance(pauses, dict) and len(pauses) > MAX_PAUSES:
            raise ValueError(f"{len(pauses)} pauses, at most {MAX_PAUSES}")
        if isinstance(history, list) and len(history) > HISTORY_LIMIT:
            data["history"] = history[-HISTORY_LIMIT:]
    # Lax: a state file written by hand may say 1.0 where 1 is meant.
    state, fixed = repair_ranges(AgentState.model_validate(data, strict=False))
    try:
        orjson.dumps(state.to_json())
    except TypeError as exc:  # nested too deep, say: it could never be saved again
        raise ValueError(f"cannot be written back: {exc}") from None
    return state, fixed


def corrupt_path(path: Path) -> Path:
    """Where :func:`load_file` sets an unreadable file aside."""
    return path.with_name(path.name + ".corrupt")


def load_file(
    path: Path, parse: Callable[[bytes], T], *, repair: bool = True
) -> tuple[T | None, str | None]:
    """The file parsed; ``(None, None)`` when there is none; ``(None, reason)`` when
    ``parse`` rejects it (ValueError: bad JSON or invalid content), and with ``repair``
    it is moved to :func:`corrupt_path` so that a fresh state can be written. Raises
    :class:`StateError` when the file exists but cannot be read."""
    try:
        raw = read_bounded(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise StateError(f"cannot read state file {path}: {exc.strerror}") from None
    except ValueError as exc:  # a FIFO, a device, a giant file: not ours to repair
        raise StateError(f"cannot read state file {path}: {exc}") from None
    try:
        return parse(raw), None
    except ValueError as exc:  # orjson.JSONDecodeError and ValidationError are ValueErrors
        reason = str(exc).splitlines()[0]
    if repair:
        with contextlib.suppress(OSError):
            path.replace(corrupt_path(path))
    return None, reason


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file:
    a temporary file in the same directory, fsync, rename, fsync of the directory.
    Raises :class:`StateError`."""
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise StateError(f"cannot write state file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise StateError(f"cannot write state file {path}: {exc.strerror}") from None
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        log.debug("fsync of %s not supported", directory)
    finally:
        os.close(dir_fd)
