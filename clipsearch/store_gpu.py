"""A copy of the vector index on the GPU for unfiltered top-k searches, where faiss has GPUs (the faiss-gpu build).

The CPU index stays the master: FAISS GPU indexes silently ignore IDSelectors (facebookresearch/faiss#3924), have
no range_search, and a GPU flat index cannot remove ids. So every change, filtered search, range search and save
goes to the CPU index, and the GPU copy answers plain top-k searches only while it reflects the CPU index exactly.
After a change, searches run on the CPU until a background thread has copied the index again, so no search ever
waits for a copy nor sees stale results.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Hashable

import numpy as np

log = logging.getLogger(__name__)

# Below this many vectors an exact CPU search takes under about 2 ms (bench/query_latency.py): a GPU round trip
# (kernel launches, transfers) gains nothing there.
MIN_VECTORS = 20_000
MIRRORED_KINDS = ("exact", "ivf")
CopyUnderLock = Callable[[Callable[[Any], Any]], tuple[Hashable, Any]]  # IndexIDMap2(IndexFlatIP) and IndexIVFScalarQuantizer clone to GPU; disk does not


def gpu_count(faiss: Any) -> int:
    """GPUs faiss can use: 0 for the faiss-cpu build (which has no get_num_gpus) or a machine without them."""
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001 - a broken CUDA set-up means no GPU, not a failed search
        return 0


class GpuMirror:
    """The GPU copy of one store's index: used while its version matches, refreshed in the background otherwise."""

    def __init__(self, faiss: Any, min_vectors: int | None = None):
        self._faiss = faiss
        self._min_vectors = MIN_VECTORS if min_vectors is None else min_vectors
        self._resources = None  # one StandardGpuResources (scratch memory, streams) for every copy
        self._copy = None
        self._version: Hashable | None = None
        self._refreshing: threading.Thread | None = None
        self._refresh_lock = threading.Lock()  # one refresh thread at a time
        self.disabled: str | None = None  # why the GPU is not used any more (a failed copy or search)

    def search(self, version: Hashable, kind: str, count: int, queries: np.ndarray, k: int, nprobe: int | None,
               copy_under_lock: CopyUnderLock) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores, ids) from the GPU copy when it reflects `version`; None (search the CPU index) otherwise.

        copy_under_lock(clone) returns (version, clone(index)) taken under the store's lock, so a copy is tagged
        with the version it was made from; the refresh thread calls it.
        """
        if self.disabled or kind not in MIRRORED_KINDS or count < self._min_vectors:
            return None
        copy = self._copy
        if copy is None or self._version != version:
            self._start_refresh(copy_under_lock)
            return None
        try:
            if nprobe is not None and hasattr(copy, "nprobe"):
                copy.nprobe = nprobe
            return copy.search(queries, k)
        except Exception as e:  # noqa: BLE001 - out of GPU memory, driver reset: the CPU index still answers
            self._disable(f"GPU search failed: {e}")
            return None

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a running refresh (tests, benchmarks)."""
        thread = self._refreshing
        if thread is not None:
            thread.join(timeout)

    def _start_refresh(self, copy_under_lock: CopyUnderLock) -> None:
        with self._refresh_lock:
            if self._refreshing is not None and self._refreshing.is_alive():
                return
            self._refreshing = threading.Thread(target=self._refresh, args=(copy_under_lock,), name="clipsearch-gpu-copy",
                                                daemon=True)
            self._refreshing.start()

    def _refresh(self, copy_under_lock: CopyUnderLock) -> None:
        try:
            if self._resources is None:
                self._resources = self._faiss.StandardGpuResources()
            version, copy = copy_under_lock(lambda index: self._faiss.index_cpu_to_gpu(self._resources, 0, index))
            self._copy, self._version = copy, version
            log.info("vector index copied to the GPU (%d vectors)", copy.ntotal)
        except Exception as e:  # noqa: BLE001 - e.g. the index does not fit in GPU memory
            self._disable(f"copying the index to the GPU failed: {e}")

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        self._copy = None
        log.warning("%s; searching on the CPU from now on", reason)

