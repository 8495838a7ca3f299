"""The tick engine: the I/O shell around the pure rules of :mod:`heartbeat_consumer.schedule`.

For each tick it re-reads heartbeat.json when it changed (keeping the last good one),
evaluates every check at the tick's slot, runs the selected handlers one after another,
hands each result to ``on_result`` (print it, publish it) and only then saves the state.
Transports (local clock, cron, RabbitMQ) call :meth:`AgentRunner.tick`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.config import (
    ConfigError,
    ConfigSource,
    HeartbeatConfig,
    LoadedConfig,
    Pause,
    Problem,
    with_default_handler,
)
from ..core.envelope import envelope as make_envelope
from ..core.envelope import local_event_id
from ..core.follow import (
    StateChange,
    apply_change,
    newer,
    pauses_change,
    run_change,
    snapshot_change,
)
from ..core.schedule import Blocker, Evaluation, Plan, plan
from ..core.state import (
    HISTORY_LIMIT,
    MAX_PAUSES,
    AgentState,
    Status,
    add_avoided,
    clamp_future_runs,
    idempotency_key,
    record_run,
)
from ..core.timeutil import iso
from ..handlers.registry import (
    EventSink,
    RunContext,
    default_handler,
    get_handler,
    handler_names,
    invoke,
)
from .store import StateError, StateStore, default_state_path

__all__ = [
    "AgentRunner",
    "RunResult",
    "StartedRun",
    "TickReport",
    "local_envelope",
    "wall_clock_ms",
]

log = logging.getLogger("heartbeat_consumer.engine")

_DISABLING = (Blocker.INVALID, Blocker.UNKNOWN_HANDLER)
SUMMARY_LIMIT = 2000
MANUAL_RUNS_REMEMBERED = 1000
"""Characters of a result kept in the state file's ``lastResult``."""


def _retrieved(task: asyncio.Future[None]) -> None:
    """Marks a task's exception as seen (it is logged where the task is awaited)."""
    if not task.cancelled():
        task.exception()


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def local_envelope(slot_ms: int, *, source_type: str = "local") -> dict[str, Any]:
    """The tick envelope used when no broker delivers one: a Bloodbank envelope whose
    ``source.type`` is ``heartbeat``; ``source_type`` says what made it (``local``,
    ``run-once``, ``startup``) and goes in ``source.meta.component``. Its event id is a
    UUID derived from the slot (the events of its runs are correlated with it)."""
    return make_envelope(
        "system.heartbeat.tick",
        {"tick_id": str(slot_ms), "epoch_ms": slot_ms},
        timestamp_ms=slot_ms,
        event_id=local_event_id(slot_ms),
        source_type="heartbeat",
        component=source_type,
    )


@dataclass(frozen=True)
class StartedRun:
    """A check run about to start; ``to_payload()`` is the started event's payload (the
    monitor's timeout detection waits for its result)."""

    agent: str
    check: str
    handler: str
    slot: int
    started_at: int
    idempotency_key: str
    cadence_ms: int
    timeout_ms: int

    def to_payload(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "check": self.check,
            "handler": self.handler,
            "slot": iso(self.slot),
            "started_at": iso(self.started_at),
            "idempotency_key": self.idempotency_key,
            "cadence_ms": self.cadence_ms,
            "timeout_ms": self.timeout_ms,
        }


@dataclass(frozen=True)
class RunResult(StartedRun):
    """One finished check run; ``to_payload()`` is the result event's payload."""

    status: Status
    finished_at: int
    overdue_ratio: float
    result: dict[str, Any]
    error: str | None = None
    change: StateChange | None = None
    """With ``on_state`` (replicas): the change of the state this run made. It travels
    inside the result event (``state_change``), so that the result and the change are
    one message: confirmed together or not at all."""

    @property
    def duration_ms(self) -> int:
        return self.finished_at - self.started_at

    def to_payload(self) -> dict[str, Any]:
        return {
            **super().to_payload(),
            "status": self.status,
            "finished_at": iso(self.finished_at),
            "duration_ms": self.duration_ms,
            "overdue_ratio": None if math.isinf(self.overdue_ratio) else self.overdue_ratio,
            "result": self.result,
            "error": self.error,
        }


@dataclass
class TickReport:
    slot: int
    plan: Plan | None = None
    results: list[RunResult] = field(default_factory=list)
    config_error: ConfigError | None = None
    """Set when heartbeat.json is unusable (the last good config, if any, was used)."""
    problems: list[Problem] = field(default_factory=list)
    """Checks disabled for being invalid."""
    state_error: StateError | None = None


ResultSink = Callable[[RunResult], Awaitable[None]]
StartSink = Callable[[StartedRun], Awaitable[None]]
StateSink = Callable[[StateChange], Awaitable[None]]
"""Where a change of the state goes before it is saved (a replica publishes it)."""


def _pause_refusal(
    name: str,
    pause: Pause | None,
    known: Collection[str],
    pauses: dict[str, Pause],
    agent: str,
) -> str | None:
    """Why this pause (or resume, ``pause=None``) is refused, or None."""
    if name != "*" and name not in known and not (pause is None and name in pauses):
        verb = "pause" if pause is not None else "resume"
        return (
            f"no check named {name!r} in the config of {agent} "
            f"({verb} takes a check of the config, or '*')"
        )
    if pause is not None and name not in pauses and len(pauses) >= MAX_PAUSES:
        return f"already {len(pauses)} pauses (at most {MAX_PAUSES}); resume some or pause '*'"
    return None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    text = str(result)
    if len(text) <= SUMMARY_LIMIT:
        return result
    return {"status": result.get("status"), "truncated": text[:SUMMARY_LIMIT]}


class AgentRunner:
    """Runs one agent's checks on ticks. Not safe for concurrent ``tick`` calls."""

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        *,
        state_path: str | os.PathLike[str] | None = None,
        on_result: ResultSink | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        agent: str | None = None,
        on_start: StartSink | None = None,
        publish: EventSink | None = None,
        on_state: StateSink | None = None,
    ) -> None:
        """``agent`` overrides the config's ``agent`` (the bus names the queue after it);
        ``publish`` is how handlers publish events of their own (``publish`` handler);
        ``on_state`` gets the changes of the pauses before they are made and saved (if
        it raises, they are not made); with it, each run's result handed to
        ``on_result`` carries the run's change (:attr:`RunResult.change`)."""
        self.agent = agent
        self.config_path = Path(config_path)
        self.source = ConfigSource(self.config_path)
        self.store = StateStore(state_path or default_state_path(self.config_path))
        self.on_result = on_result
        self.on_start = on_start
        self.publish = publish
        self.on_state = on_state
        self.clock = clock
        self.started_ms = clock()
        self.state = AgentState()
        self._not_due: dict[str, int] = {}
        """Ticks each check was not due since the last save (the state file is written
        with runs, not with every tick)."""
        self._reported_generation = 0
        self._resolved_for: tuple[tuple[int, frozenset[str], str | None], LoadedConfig] | None = (
            None
        )
        self._started = False
        self._manual_runs: OrderedDict[str, str] = OrderedDict()
        """Requests (command event ids) that ran a check by hand: idempotency key."""
        self._unsent: dict[str, tuple[RunResult, AgentState, AgentState, tuple[str, ...]]] = {}
        """Runs whose result could not be handed on, by idempotency key, with the state
        before and after them: re-sent (not re-run) before the next tick's work."""

    def start(self, *, require_writable: bool = True) -> StateError | None:
        """Check the state file can be written and load it. Raises StateError, unless
        ``require_writable`` is False: then the problem is returned and the agent runs
        with the state it could read, kept in memory (a service reports it rather than
        exit into a restart loop; every later save tries again)."""
        problem: StateError | None = None
        warning: str | None = None
        try:
            self.store.check_writable()
            self.state, warning = self.store.load(self.clock())
        except StateError as exc:
            if require_writable:
                raise
            problem = exc
            with contextlib.suppress(StateError):
                self.state, warning = self.store.load(self.clock(), repair=False)
        if warning:
            log.warning("%s", warning)
        self._started = True
        return problem

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Hold ``<state>.lock`` while running; yields False when another process holds it."""
        lock_path = self.store.path.with_name(self.store.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    async def _config(self) -> tuple[LoadedConfig | None, ConfigError | None]:
        loaded, error = await self.source.current_async()
        if loaded is not None:
            loaded = self._resolved(loaded)
        if error is not None:
            kept = "keeping the last good config" if loaded else "no good config yet: nothing runs"
            log.error("config invalid (%s): %s", kept, error)
        return loaded, error

    def _resolved(self, loaded: LoadedConfig) -> LoadedConfig:
        """``loaded`` with unregistered handlers sent to the default handler (cached until
        the config, the registry or the default changes)."""
        key = (self.source.generation, handler_names(), default_handler())
        if self._resolved_for is None or self._resolved_for[0] != key:
            self._resolved_for = (key, with_default_handler(loaded, key[1], key[2]))
        return self._resolved_for[1]

    def _plan(self, loaded: LoadedConfig, slot_ms: int) -> Plan:
        return plan(
            loaded.config,
            self.state,
            slot_ms,
            known_handlers=handler_names(),
            invalid_checks=loaded.invalid_checks,
        )

    async def tick(self, slot_ms: int, envelope: dict[str, Any] | None = None) -> TickReport:
        """Evaluate and run what is due for the tick scheduled at ``slot_ms``."""
        if not self._started:
            self.start()
        report = TickReport(slot=slot_ms)
        report.results, report.state_error = await self._send_unsent()
        loaded, report.config_error = await self._config()
        if loaded is None:
            return report
        report.problems = loaded.problems
        self._clamp_future_runs(loaded.config, slot_ms)
        report.plan = self._plan(loaded, slot_ms)
        if self.source.generation != self._reported_generation:
            self._reported_generation = self.source.generation
            if self.agent is not None and loaded.config.agent != self.agent:
                log.warning(
                    "%s says agent %r; running it as %r",
                    self.config_path,
                    loaded.config.agent,
                    self.agent,
                )
            for ev in report.plan.evaluations:
                if ev.blockers and ev.blockers[0][0] in _DISABLING:
                    log.error("check %s disabled: %s", ev.check, ev.reason)
        log.debug(
            "tick %s: %d check(s) due, running %s",
            iso(slot_ms),
            sum(ev.due for ev in report.plan.evaluations),
            [ev.check for ev in report.plan.selected] or "nothing",
        )
        for name in report.plan.not_due():  # counted in the state with the next run
            self._not_due[name] = self._not_due.get(name, 0) + 1
        for evaluation in report.plan.selected:
            result, after = await self._run(loaded.config, evaluation, slot_ms, envelope)
            report.results.append(result)
            report.state_error = await self._complete(result, after) or report.state_error
        return report

    async def check_names(self) -> frozenset[str]:
        """The checks of the current config, valid or not (empty without a usable one)."""
        loaded, _ = await self._config()
        if loaded is None:
            return frozenset()
        return frozenset(loaded.config.checks) | frozenset(loaded.invalid_checks)

    async def run_check(
        self,
        name: str,
        slot_ms: int,
        envelope: dict[str, Any] | None = None,
        *,
        force: bool = False,
        request_ids: Sequence[str] = (),
    ) -> RunResult | str:
        """Run one check now (a manual run); its result, or the reason it did not run.

        Without ``force`` the check must be due; ``force`` overrides every rule except an
        invalid check or an unknown handler. ``request_ids`` (the commands asking for
        it) are remembered once the handler has run: asked again by one of them (a
        command redelivered after a lost connection), it is not run a second time.
        """
        if not self._started:
            self.start()
        await self._send_unsent()
        for request in request_ids:
            if request in self._manual_runs:
                return f"already run for request {request} ({self._manual_runs[request]})"
        loaded, _ = await self._config()
        if loaded is None:
            return "no usable config"
        self._clamp_future_runs(loaded.config, slot_ms)
        found = [e for e in self._plan(loaded, slot_ms).evaluations if e.check == name]
        if not found:
            return f"no check named {name!r}"
        evaluation = found[0]
        blocking = [c for c in evaluation.causes if not force or c in _DISABLING]
        if blocking:
            return evaluation.explain(blocking[0])
        result, after = await self._run(loaded.config, evaluation, slot_ms, envelope)
        self._remember_requests(request_ids, result.idempotency_key)
        await self._complete(result, after, tuple(request_ids))
        return result

    def _remember_requests(self, request_ids: Sequence[str], key: str) -> None:
        for request in request_ids:
            self._manual_runs[request] = key
        while len(self._manual_runs) > MANUAL_RUNS_REMEMBERED:
            self._manual_runs.popitem(last=False)

    def set_pause(self, name: str, pause: Pause | None) -> StateError | None:
        """Pause a check (or ``*``, the agent) in the state; None resumes it. Saved at
        once; if saving fails, the error is returned and the pause holds in memory."""
        pauses = dict(self.state.pauses)
        if pause is None:
            pauses.pop(name, None)
        else:
            pauses[name] = pause
        version = max(self.clock(), self.state.pauses_version + 1)
        self.state = self.state.model_copy(update={"pauses": pauses, "pauses_version": version})
        return self._save()

    async def apply_pauses(
        self, changes: Sequence[tuple[str, Pause | None]]
    ) -> tuple[list[str | None], StateError | None]:
        """Pause (a :class:`Pause`) or resume (None) checks by name, or ``*``, in order,
        and save once (a worker thread); for each change the reason it was refused
        (None if applied), and the save's error. A pause must name a check of the
        config (valid or not) or ``*``; a resume may also name a pause in the state; at
        most :data:`MAX_PAUSES` pauses are kept."""
        if not self._started:
            self.start()
        loaded, _ = await self._config()
        known = set(loaded.config.checks) | set(loaded.invalid_checks) if loaded else set()
        pauses = dict(self.state.pauses)
        refusals: list[str | None] = []
        for name, pause in changes:
            refusal = _pause_refusal(name, pause, known, pauses, self.agent or "this agent")
            if refusal is None and pause is None:
                pauses.pop(name, None)
            elif refusal is None and pause is not None:
                pauses[name] = pause
            refusals.append(refusal)
        if pauses == self.state.pauses:
            return refusals, None
        version = max(self.clock(), self.state.pauses_version + 1)
        if self.on_state is not None:  # raises: nothing changed, the commands come again
            await self.on_state(pauses_change(pauses, version))
        self.state = self.state.model_copy(update={"pauses": pauses, "pauses_version": version})
        return refusals, await asyncio.to_thread(self._save)

    async def follow(self, changes: Sequence[StateChange]) -> tuple[int, StateError | None]:
        """Apply changes replicas made (in their order) where they are newer, and save
        once; how many changed the state, and the save's error. The run commands they
        name are not run again here."""
        if not self._started:
            self.start(require_writable=False)
        changed = 0
        for change in changes:
            before = self.state
            self.state = apply_change(self.state, change)
            changed += self.state is not before
            if change.state is not None and change.state.last_key is not None:
                self._remember_requests(change.requests, change.state.last_key)
        if not changed:  # all known already (our own, say): nothing to write
            return 0, None
        return changed, await asyncio.to_thread(self._save)

    def snapshot(self) -> StateChange:
        """The whole state, for a replica that joins."""
        return snapshot_change(self.state)

    def _clamp_future_runs(self, config: HeartbeatConfig, slot_ms: int) -> None:
        """A ``lastRun`` after the slot being evaluated (a clock that was wrong, a hand
        edit) would hold its check back until then: it is moved to the slot, with a
        warning, and saved with the next run."""
        state, moved = clamp_future_runs(self.state, config, slot_ms)
        for name, was in moved:
            log.warning(
                "check %s: lastRun %s is after the slot %s; taken as %s",
                name,
                iso(was),
                iso(slot_ms),
                iso(slot_ms),
            )
        self.state = state

    def _save(self) -> StateError | None:
        """Save the state; on failure log and return the error (the state stays in
        memory and the next save tries again)."""
        try:
            self.store.save(self.state)
        except StateError as exc:
            log.error("state not saved (kept in memory, retried next run): %s", exc)
            return exc
        return None

    async def _complete(
        self, result: RunResult, after: AgentState, requests: tuple[str, ...] = ()
    ) -> StateError | None:
        """Hand the result and the change on, then adopt and save the state ``after`` the
        run (in that order: at-least-once). If handing on fails, the state stays as it
        was (so what the handler recorded, such as an alert's fingerprint, is not yet
        remembered) and the result is kept to be re-sent before the next tick runs
        anything: a redelivered tick then finds the check done instead of running its
        handler a second time."""
        before = self.state
        try:
            await self._hand_on(result, after, requests)
        except BaseException:
            self._unsent[result.idempotency_key] = (result, before, after, requests)
            raise
        return await self._adopt(before, after, result.check)

    async def _hand_on(
        self, result: RunResult, after: AgentState, requests: tuple[str, ...]
    ) -> None:
        if self.on_state is not None:
            result = replace(result, change=run_change(after, result.check, requests))
        if self.on_result is not None:
            await self.on_result(result)

    async def _send_unsent(self) -> tuple[list[RunResult], StateError | None]:
        """Re-send the results whose hand-on failed, oldest first; raises if it fails again."""
        sent: list[RunResult] = []
        error: StateError | None = None
        for key, (result, before, after, requests) in list(self._unsent.items()):
            if not newer(after.checks[result.check], self.state.checks.get(result.check)):
                # Another replica ran the check since (its state came from the bus): the
                # result goes out (the run happened), but not its change, which is older
                # than what everyone knows now, and it is not adopted.
                log.warning("re-sending the result of %s, not its state: the check ran since", key)
                if self.on_result is not None:
                    await self.on_result(replace(result, change=None))
                del self._unsent[key]
                sent.append(result)
                continue
            log.warning("re-sending the result of %s (its handler is not run again)", key)
            await self._hand_on(result, after, requests)
            del self._unsent[key]
            sent.append(result)
            error = await self._adopt(before, after, result.check) or error
        return sent, error

    async def _adopt(self, before: AgentState, after: AgentState, check: str) -> StateError | None:
        """Make ``after`` the state (only ``check``'s part and its history entry if the
        state changed meanwhile, by a pause command) and save it, in a worker thread so
        that the fsyncs do not stall the other agents of a fleet."""
        if self.state is not before:
            after = self.state.model_copy(
                update={
                    "checks": {**self.state.checks, check: after.checks[check]},
                    "history": (*self.state.history, after.history[-1])[-HISTORY_LIMIT:],
                }
            )
        self.state, self._not_due = add_avoided(after, self._not_due, "not-due")
        return await asyncio.to_thread(self._save)

    async def _run(
        self,
        config: HeartbeatConfig,
        evaluation: Evaluation,
        slot_ms: int,
        envelope: dict[str, Any] | None,
    ) -> tuple[RunResult, AgentState]:
        """Run one check; its result and the state after it (not yet adopted)."""
        check = config.checks[evaluation.check]
        agent = self.agent or config.agent
        key = idempotency_key(agent, check.name, slot_ms)
        payload = {
            "agent": agent,
            "check_name": check.name,
            "timestamp": iso(slot_ms),
            "envelope": envelope if envelope is not None else local_envelope(slot_ms),
            "idempotency_key": key,
        }
        context = RunContext(
            agent=agent,
            check=check,
            config=config,
            state=self.state,
            slot_ms=slot_ms,
            process_started_ms=self.started_ms,
            publish=self.publish,
        )
        handler = get_handler(check.handler)
        started = self.clock()
        start = StartedRun(
            agent=agent,
            check=check.name,
            handler=check.handler,
            slot=slot_ms,
            started_at=started,
            idempotency_key=key,
            cadence_ms=check.cadence_ms,
            timeout_ms=check.effective_timeout_ms,
        )
        # The started event is confirmed while the handler runs, and before its result
        # is sent (so that the two arrive in order). If it fails, the run is not undone:
        # its result is handed on as usual, or kept to be re-sent if that fails too.
        announcing = None
        if self.on_start is not None:
            announcing = asyncio.ensure_future(self.on_start(start))
            announcing.add_done_callback(_retrieved)
        if handler is None:  # unregistered between plan and run
            outcome_status: Status = "failed"
            result: dict[str, Any] = {}
            error: str | None = f"unknown handler {check.handler!r}"
        else:
            try:
                outcome = await invoke(handler, payload, check, context)
            except BaseException:  # cancelled: no started event without its run
                if announcing is not None:
                    announcing.cancel()
                raise
            outcome_status, result, error = outcome.status, outcome.result, outcome.error
        finished = self.clock()
        if announcing is not None:
            try:
                await announcing
            except Exception as exc:
                log.warning("%s: started event not confirmed (%s); its result follows", key, exc)
        after = record_run(
            context.state,
            check=check.name,
            cadence_ms=check.cadence_ms,
            slot_ms=slot_ms,
            status=outcome_status,
            finished_ms=finished,
            duration_ms=finished - started,
            key=key,
            summary=_summary(result) if result else None,
            error=error,
            initial_last_run=check.last_run,
        )
        run = RunResult(
            **vars(start),
            status=outcome_status,
            finished_at=finished,
            overdue_ratio=evaluation.ratio,
            result=result,
            error=error,
        )
        level = (
            logging.INFO if outcome_status in ("success", "alert", "skipped") else logging.WARNING
        )
        log.log(
            level,
            "run agent=%s check=%s status=%s duration_ms=%d%s",
            run.agent,
            run.check,
            run.status,
            run.duration_ms,
            f" error={error}" if error else "",
            extra={
                "event": "check_run",
                "agent": run.agent,
                "check": run.check,
                "status": run.status,
                "duration_ms": run.duration_ms,
                "slot": iso(slot_ms),
            },
        )
        return run, after
