"""The job state that the parts of a ``MirrorJob`` share, declared once.

``MirrorJob`` is assembled from mixins, each a file of its own: the write path (``writes.py``),
error policies and reconnects (``failures.py``), the journal (``journaling.py``), the end
(``ending.py``), the resume check (``resume_check.py``) and the recovery point (``lag.py``). They
work on one state; ``JobCore`` declares it with its types and every mixin inherits it, so a
reader, and a type checker, finds the contract in one place. A mixin declares on top of it only
what it alone uses. ``MirrorJob.__init__`` sets every attribute declared here, and each mixin
declares all it uses (``tests/test_mixin_contracts.py`` checks both). Annotations only: the class
adds no behaviour and no attribute at run time.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Callable

import trio

if TYPE_CHECKING:
    from ..journal.file import WriteJournal
    from ..targets.base import Target
    from .copy import CopyTask
    from .gate import IOGate
    from .inflight import InflightOps
    from .journaling import WindowEntry
    from .params import MirrorParams
    from .replica import Replica
    from .seams import JobBitmap, Node


class JobCore:
    """What every part of a ``MirrorJob`` may read (and, where its docstring says so, change)."""

    id: str
    params: MirrorParams
    node: Node
    target: Target
    bitmap: JobBitmap
    inflight: InflightOps
    copy: CopyTask
    gate: IOGate
    size: int
    stats: dict[str, int]
    # -- the job's state (``_set_state`` keeps ``ready`` and ``paused`` in step with it)
    ready: bool
    paused: bool
    finished: bool
    error: str | None
    io_status: str
    target_ok: bool
    # -- the replica (``journaling.py``) and the recovery point (``lag.py``)
    replica: Replica
    journal: WriteJournal | None
    _window: collections.deque[WindowEntry] | None
    behind_since: int | None
    # -- the job's task: its nursery, its cancel scope, and the event sink
    _nursery: trio.Nursery | None
    _cancel_scope: trio.CancelScope | None
    _emit: Callable[[str, dict], None]
