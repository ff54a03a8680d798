"""A job's states and the one table of the transitions between them (h11's ``_state.py`` style).

Every change of a job's state goes through ``transition``; a change the table does not list is
a bug and raises ``StateError``. The QMP status a client sees is ``JobState.status``.

- CREATED: built, its task not started yet.
- RUNNING: copying (or waiting to) while the target still differs from the source.
- READY: nothing differs that a write in flight will not clear; complete may switch.
- PAUSED / STANDBY: no target I/O (a user's pause or ``on-*-error: stop``); STANDBY was ready.
- CONCLUDED: ended (completed, cancelled or failed); its final event is out.
- NULL: dismissed (auto-dismiss: completed and cancelled jobs).

Reserved for replication, not entered yet (each reports as "running" to QMP):
- WAITING_FOR_TARGET: the target is offline for longer than a reconnect; writes only mark.
- CATCHING_UP: replaying a journal of the writes made while the target was away.
- VERIFYING: reading back the target to compare it with the source.
"""

from __future__ import annotations

import enum

from ..errors import StateError


class JobState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    READY = "ready"
    PAUSED = "paused"
    STANDBY = "standby"
    WAITING_FOR_TARGET = "waiting-for-target"
    CATCHING_UP = "catching-up"
    VERIFYING = "verifying"
    CONCLUDED = "concluded"
    NULL = "null"

    @property
    def status(self) -> str:
        """The QMP ``JobStatus`` of this state."""
        return _QMP_STATUS.get(self, self.value)


_QMP_STATUS = {JobState.WAITING_FOR_TARGET: "running", JobState.CATCHING_UP: "running",
               JobState.VERIFYING: "running"}

S = JobState
#: state -> the states it may move to. Every live state may conclude (a failure, a cancel).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.CREATED: frozenset({S.RUNNING, S.CONCLUDED}),
    # paused: a pause or an error; ready: a moment with nothing dirty after a flush
    S.RUNNING: frozenset({S.READY, S.PAUSED, S.WAITING_FOR_TARGET, S.VERIFYING, S.CONCLUDED}),
    # running: the target was lost, or writes made while paused are not on it
    S.READY: frozenset({S.RUNNING, S.STANDBY, S.CONCLUDED}),
    S.PAUSED: frozenset({S.RUNNING, S.CONCLUDED}),
    # paused: the target was lost while paused after ready
    S.STANDBY: frozenset({S.READY, S.RUNNING, S.PAUSED, S.CONCLUDED}),
    S.WAITING_FOR_TARGET: frozenset({S.CATCHING_UP, S.RUNNING, S.PAUSED, S.CONCLUDED}),
    S.CATCHING_UP: frozenset({S.RUNNING, S.WAITING_FOR_TARGET, S.PAUSED, S.CONCLUDED}),
    S.VERIFYING: frozenset({S.RUNNING, S.READY, S.PAUSED, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}
del S

#: States in which the target holds every write but those in flight (complete may switch).
READY_STATES = frozenset({JobState.READY, JobState.STANDBY})
#: States with no target I/O.
PAUSED_STATES = frozenset({JobState.PAUSED, JobState.STANDBY})
#: States after the job's end.
ENDED_STATES = frozenset({JobState.CONCLUDED, JobState.NULL})


def transition(current: JobState, new: JobState) -> JobState:
    """Check one state change against the table; returns ``new``.

    Raises:
        StateError: the table does not allow it (a bug in the engine).
    """
    if new not in TRANSITIONS[current]:
        raise StateError(f"internal error: a job cannot go from {current.value} to {new.value}")
    return new
