"""watchdog observers for the watcher: native notifications where they work, polling where they cannot.

Network shares get no notifications for changes made by other machines, and inotify needs one watch per
folder (a per-user limit): both are detected up front so watching never silently misses part of a tree.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from contextlib import suppress
from typing import Sequence

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from clipsearch.indexer.pending import PendingChanges
from clipsearch.indexer.scope import root_of
from clipsearch.indexer.walk import is_hidden_below, is_image_name, is_under

log = logging.getLogger(__name__)

# Opens and no-write closes are left out: the indexer's own reads would otherwise look like changes.
WATCHED_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent, FileClosedEvent,
                  DirCreatedEvent, DirDeletedEvent, DirMovedEvent]
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "davfs",
    "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.davfs2", "fuse.glusterfs", "fuse.cephfs", "fuse.smbnetfs",
})
RAISE_WATCHES = "sudo sysctl fs.inotify.max_user_watches=524288"
RAISE_INSTANCES = "sudo sysctl fs.inotify.max_user_instances=512"


class WatchFilter:
    """Which paths matter: image files and folders under the roots, not hidden (unless asked), not the library's own."""

    def __init__(self, roots: Sequence[str], data_dir: str, include_hidden: bool):
        self.roots = list(roots)
        self.include_hidden = include_hidden
        self.data_dir = os.path.abspath(data_dir)
        self.real_data_dir = os.path.realpath(data_dir)

    def wants(self, path: str, is_dir: bool) -> bool:
        """Whether an event on path can change the index."""
        root = root_of(path, self.roots) if path else None
        if root is None or (not self.include_hidden and is_hidden_below(path, root)):
            return False
        if not is_dir and not is_image_name(os.path.basename(path)):
            return False
        # The library may sit inside a watched folder (its thumbnails are images), perhaps reached through a link.
        return not is_under(path, self.data_dir) and not is_under(os.path.realpath(path), self.real_data_dir)


class ChangeRecorder(FileSystemEventHandler):
    """Records the events that matter as pending changes (runs on watchdog's thread: it never indexes)."""

    def __init__(self, pending: PendingChanges, wanted: WatchFilter, reports_closes: bool):
        self.pending = pending
        self.wanted = wanted
        self.reports_closes = reports_closes  # only then is "written, not closed yet" worth waiting for

    def dispatch(self, event: FileSystemEvent) -> None:
        """Record one event; never raises (an exception would end the observer's thread)."""
        if event.is_synthetic:  # watchdog's per-file events inside a moved or created folder: the folder covers them
            return
        try:
            self._record(event)
        except Exception:
            log.exception("could not record the file system event %s", event)

    def _record(self, event: FileSystemEvent) -> None:
        src, is_dir = os.fsdecode(event.src_path), event.is_directory
        if event.event_type == "moved":
            dest = os.fsdecode(event.dest_path)
            src_wanted, dest_wanted = self.wanted.wants(src, is_dir), self.wanted.wants(dest, is_dir)
            if src_wanted and dest_wanted:
                self.pending.record_move(src, dest, is_dir=is_dir)
            elif src_wanted or dest_wanted:  # e.g. photo.jpg.part -> photo.jpg: only one side is an image
                self.pending.record(src if src_wanted else dest, is_dir=is_dir)
            return
        if self.wanted.wants(src, is_dir):
            self.pending.record(src, is_dir=is_dir, written=self.reports_closes and event.event_type == "modified",
                                closed=event.event_type == "closed")


def start_observers(roots: Sequence[str], pending: PendingChanges, wanted: WatchFilter, *, polling: bool,
                    poll_seconds: float) -> list[BaseObserver]:
    """Start watching the roots: natively where possible, else (asked, network shares, inotify limits) by polling."""
    polled = list(roots) if polling else []
    native = [] if polling else [root for root in roots if not _polled_share(root)]
    polled += [root for root in roots if root not in native and root not in polled]
    observers: list[BaseObserver] = []
    if native:
        shortfall = inotify_shortfall(native)
        if shortfall:
            log.warning("not enough inotify watches to watch %s natively (%s): polling instead, every %.3g s; "
                        "raise the limit to watch natively: %s", ", ".join(native), shortfall, poll_seconds, RAISE_WATCHES)
            polled += native
        else:
            try:
                observers.append(_started(Observer(), native, ChangeRecorder(pending, wanted, sys.platform.startswith("linux"))))
            except OSError as e:
                log.warning("cannot watch %s natively (%s): polling instead, every %.3g s%s", ", ".join(native),
                            e.strerror or e, poll_seconds, _limit_hint(e))
                polled += native
    if polled:
        observers.append(_started(PollingObserver(timeout=poll_seconds), polled, ChangeRecorder(pending, wanted, False)))
    return observers


def stop_observers(observers: Sequence[BaseObserver]) -> None:
    """Stop and join observers (safe on ones that never started)."""
    for observer in observers:
        with suppress(Exception):
            observer.stop()
    for observer in observers:
        with suppress(RuntimeError):
            observer.join(timeout=10)


def _started(observer: BaseObserver, roots: Sequence[str], handler: ChangeRecorder) -> BaseObserver:
    try:
        for root in roots:
            observer.schedule(handler, root, recursive=True, event_filter=WATCHED_EVENTS)
        observer.start()
    except BaseException:
        stop_observers([observer])
        raise
    return observer


def _limit_hint(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return f"; the inotify watch limit is reached: raise it to watch natively: {RAISE_WATCHES}"
    if error.errno == errno.EMFILE:
        return f"; the inotify instance limit is reached: raise it to watch natively: {RAISE_INSTANCES}"
    return ""


def _polled_share(root: str) -> bool:
    kind = filesystem_type(root)
    if kind in NETWORK_FILESYSTEMS:
        log.info("%s is on a network share (%s), which reports no changes made elsewhere: polling it", root, kind)
        return True
    return False


def filesystem_type(path: str) -> str | None:
    """The type of the file system holding path ('ext4', 'nfs4'...) from /proc/self/mountinfo; None elsewhere."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            lines = mounts.readlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        fields = line.split(" - ", 1)
        parts = fields[0].split()
        if len(fields) < 2 or len(parts) < 5:
            continue
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])  # \040 is a space...
        if is_under(real, mount_point) and len(mount_point) >= len(best):
            best, kind = mount_point, fields[1].split()[0]
    return kind


def inotify_shortfall(roots: Sequence[str]) -> str | None:
    """Why inotify cannot watch every folder under the roots (one watch each), or None when it can or cannot tell.

    watchdog skips a subfolder whose watch the kernel refuses, silently; counting first avoids a partial watch.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/sys/fs/inotify/max_user_watches", encoding="ascii") as limit_file:
            limit = int(limit_file.read())
    except (OSError, ValueError):
        return None
    in_use = _inotify_watches_in_use()
    needed = 0
    for root in roots:
        for _, folders, _ in os.walk(root):
            needed += 1
            if needed + in_use > limit:
                return f"{needed}+ folders to watch, {in_use} watches already in use by this user, limit {limit}"
    return None


def _inotify_watches_in_use() -> int:
    # The limit is per user: editors, file managers and sync clients share it. Their watches are listed in
    # /proc/PID/fdinfo of inotify descriptors; processes we may not read are skipped (an estimate, on the low side).
    uid, count = os.getuid(), 0
    with suppress(OSError):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            with suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
                                count += sum(1 for line in info if line.startswith("inotify wd:"))
    return count
