"""Changed paths waiting to be indexed: debounced until they settle, then coalesced into one batch of changes."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from clipsearch.indexer.scope import Changes, ancestors, coalesce

# A file written to and not closed yet is waited for this long at most after its last write: the close event
# can be lost (a full kernel queue) and some programs keep files open; a rescan or a later write corrects a
# file indexed too early.
WRITE_TIMEOUT_SECONDS = 30.0
MOVE_HINT_SECONDS = 600.0  # a rename not taken by then is only a stale hint (its paths were dropped)

StatKey = tuple[int, int] | None


def stat_key(path: str) -> StatKey:
    """(size, mtime_ns) of a path, None when it does not exist (or cannot be read)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_size, info.st_mtime_ns


@dataclass
class _Entry:
    is_dir: bool
    last_event: float
    stat: StatKey
    writing: bool = False  # written to and not closed since (only observers that report closes set it)
    partners: set[str] = field(default_factory=set)  # the other side of a rename: taken together


class PendingChanges:
    """Thread-safe changed paths: observers record events, the single writer takes the ones that have settled.

    A path is ready once it has been quiet for `settle` seconds and its size and time are those seen at its last
    event (so a copy that pauses longer than events tell, as polling sees it, still waits). Ready paths are
    coalesced (a folder covers what lies under it); paths under them still busy are handed over as deferred.
    """

    def __init__(self, settle: float, *, write_timeout: float = WRITE_TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic, stat: Callable[[str], StatKey] = stat_key):
        self.settle = settle
        self.write_timeout = max(write_timeout, settle)
        self._clock = clock
        self._stat = stat
        self._entries: dict[str, _Entry] = {}
        self._moves: list[tuple[float, str, str]] = []
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def record(self, path: str, *, is_dir: bool = False, written: bool = False, closed: bool = False) -> None:
        """Note an event on a path (written: data was written to it; closed: a writer closed it)."""
        key = None if is_dir else self._stat(path)
        with self._cond:
            now = self._clock()
            entry = self._entries.get(path)
            if entry is None:
                entry = self._entries[path] = _Entry(is_dir, now, key)
                if len(self._entries) == 1:
                    self._cond.notify_all()
            else:
                entry.last_event, entry.stat, entry.is_dir = now, key, entry.is_dir or is_dir
            if written:
                entry.writing = True
            if closed:
                entry.writing = False

    def record_move(self, src: str, dest: str, *, is_dir: bool = False) -> None:
        """Note a rename: both paths change, and the indexer may keep the rows of the old one for the new one."""
        self.record(src, is_dir=is_dir)
        self.record(dest, is_dir=is_dir)
        with self._cond:
            for path, other in ((src, dest), (dest, src)):
                if path in self._entries:
                    self._entries[path].partners.add(other)
            self._moves.append((self._clock(), src, dest))

    def wait_for_work(self, timeout: float | None) -> None:
        """Block until something is recorded (or wake() is called, or the timeout passes) when nothing is pending."""
        with self._cond:
            if not self._entries:
                self._cond.wait(timeout)

    def wake(self) -> None:
        """Release a wait_for_work() (to stop the writer)."""
        with self._cond:
            self._cond.notify_all()

    def next_due(self) -> float | None:
        """Seconds until the earliest pending path may be ready (0: now), None when nothing is pending."""
        with self._cond:
            if not self._entries:
                return None
            return max(0.0, min(self._due(e) for e in self._entries.values()) - self._clock())

    def take_ready(self) -> Changes | None:
        """Remove and return the paths that have settled, coalesced, or None when none has."""
        with self._cond:
            now = self._clock()
            due = [(path, entry, entry.last_event) for path, entry in self._entries.items() if self._due(entry) <= now]
        if not due:
            return None
        current = {path: None if entry.is_dir else self._stat(path) for path, entry, _ in due}  # no lock held for I/O
        with self._cond:
            ready: set[str] = set()
            for path, entry, seen in due:
                if self._entries.get(path) is not entry or entry.last_event != seen:
                    continue  # a new event meanwhile
                if entry.stat != current[path]:  # changed without an event (yet): look again after another settle
                    entry.stat, entry.last_event = current[path], now
                    continue
                if current[path] is not None and current[path][0] == 0:
                    # Empty: a placeholder (browsers create one before a download) or a file about to be written.
                    # Its writes will bring it back; a rescan records one that stays empty.
                    del self._entries[path]
                    continue
                ready.add(path)
            self._hold_back_half_moves(ready)
            if not ready:
                return None
            for path in ready:
                del self._entries[path]
            return self._changes(coalesce(ready), now)

    def _due(self, entry: _Entry) -> float:
        return entry.last_event + (self.write_timeout if entry.writing else self.settle)

    def _hold_back_half_moves(self, ready: set[str]) -> None:
        # Applying one side of a rename alone would delete the old rows before the new path could claim them.
        changed = True
        while changed:
            changed = False
            for path in list(ready):
                if any(p in self._entries and p not in ready for p in self._entries[path].partners):
                    ready.discard(path)
                    changed = True

    def _changes(self, paths: list[str], now: float) -> Changes:
        covered = set(paths)

        def is_covered(path: str) -> bool:
            return path in covered or any(a in covered for a in ancestors(path))

        deferred = tuple(sorted(p for p in self._entries if is_covered(p)))
        taken, kept = [], []
        for move in self._moves:
            if is_covered(move[1]) or is_covered(move[2]):
                taken.append((move[1], move[2]))
            elif now - move[0] < MOVE_HINT_SECONDS:
                kept.append(move)
        self._moves = kept
        return Changes(tuple(paths), deferred, tuple(taken))
