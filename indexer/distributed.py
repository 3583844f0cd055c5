"""Distributed indexing under torchrun: every rank embeds shards of one plan, rank 0 alone writes the catalog.

    torchrun --nproc_per_node=N -m clipsearch.indexer.distributed DIR...      (add --nnodes/--rdzv-* across machines)

or index_distributed() from a command run under torchrun (`clipsearch index --distributed`).

Rank 0 takes the library's writer lock for the whole run, walks the folders and plans against the catalog exactly
as the single-process indexer does (clipsearch.indexer.run.Indexer), and broadcasts the candidates. They are cut
into fixed shards, handed out round-robin; each rank decodes and embeds its shards on its own device (cuda:LOCAL_RANK
when CUDA is used, else the CPU) and saves each as DATA_DIR/distributed/RUN_ID/shard-NNNNN.safetensors. RUN_ID comes
from the plan, so a rerun after a crash finds the finished shards and embeds only the rest. Once every rank is done,
rank 0 merges the shards in order in one catalog transaction, with the single-process row semantics (moves keep
their rows, unchanged content only refreshes stat fields, failures recorded), syncs the vector store and deletes
the run's folder. DATA_DIR and the photos must be reachable at the same paths on every node. With torchrun's
--max-restarts, a rank that dies brings the group back and the new attempt skips the finished shards.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from sqlalchemy import select

from clipsearch.catalog import ImageRow
from clipsearch.config import Settings
from clipsearch.encoders import Encoder, EncoderSpec, load_encoder
from clipsearch.errors import ClipsearchError
from clipsearch.indexer.distributed_shards import (
    DEFAULT_SHARD_SIZE, EMBEDDED, FAILED, MOVED, UNCHANGED, DistributedIndexError, Plan, Shard, WorkStats, embed_shards,
    is_finished, read_shard, run_folder, run_id_for,
)
from clipsearch.indexer.prepare import Candidate, Failed, MaybeMoved, Prepared, Unchanged, prepare
from clipsearch.indexer.run import Indexer, IndexProgress, IndexReport, _Batch, prepare_library_model
from clipsearch.library import Library

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Ranks wait in a collective while rank 0 walks the folders and while the slowest rank embeds its whole share
# (hours for a large archive); a rank that dies is caught by torchrun (or by the broken connection), not by this.
COLLECTIVE_TIMEOUT = timedelta(days=1)
JOIN_TIMEOUT = timedelta(minutes=30)  # every rank must show up by then (torch's default)
LAUNCH_HINT = ("start it with `torchrun --nproc_per_node=N -m clipsearch.indexer.distributed DIR...` "
               "(or `clipsearch index DIR` in a single process)")

__all__ = ["DistributedIndexError", "DistributedIndexer", "build_command", "index_distributed", "main", "rank_device",
           "torchrun_environment"]


def torchrun_environment(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets; DistributedIndexError when they are absent."""
    env = os.environ if env is None else env
    missing = [name for name in TORCHRUN_VARIABLES if not env.get(name)]
    if missing:
        raise DistributedIndexError(f"not started by torchrun: {', '.join(missing)} not set", LAUNCH_HINT)
    try:
        rank, world_size, local_rank = (int(env[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as e:
        raise DistributedIndexError(f"bad torchrun environment ({e})", LAUNCH_HINT) from e
    if not (0 <= rank < world_size and local_rank >= 0):
        raise DistributedIndexError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}", LAUNCH_HINT)
    return rank, world_size, local_rank


def rank_device(setting: str, local_rank: int) -> str:
    """The device one rank embeds on: cuda:LOCAL_RANK when the setting resolves to CUDA, else the resolved device."""
    import torch

    from clipsearch.encoders import resolve_device

    device = resolve_device(setting)
    if device != "cuda":  # cpu, mps, or an explicit cuda:N the user chose
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        log.warning("rank with LOCAL_RANK %d shares a GPU: this node has %d; start one process per GPU", local_rank, count)
    return f"cuda:{local_rank % count}"


class _ProcessGroup:
    """torch.distributed for this run: object broadcasts from rank 0 and one gather of every rank's result."""

    def __init__(self, device: str, backend: str | None):
        import torch
        import torch.distributed as dist

        self.dist = dist
        self.owned = not dist.is_initialized()  # a caller's group is reused and left open
        if self.owned:
            if device.startswith("cuda"):
                torch.cuda.set_device(device)  # object collectives on NCCL travel through the current device
            backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
            try:
                store, rank, world_size = next(dist.rendezvous("env://", timeout=JOIN_TIMEOUT))
                # torchrun keeps its store across restarts (--max-restarts): without a prefix per attempt, a restarted
                # rank reads the dead ranks' addresses and never connects.
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                store = dist.PrefixStore(f"clipsearch-index/attempt-{attempt}", store)
                dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
            except (RuntimeError, ValueError) as e:
                raise DistributedIndexError(f"cannot join the torchrun process group ({backend}): {e}", LAUNCH_HINT) from e
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.step = 0  # broadcasts done: 1 after the model, 2 after the plan
        self.gathered = False

    def broadcast(self, message: Any = None) -> Any:
        holder = [message]
        with _lost_ranks():
            self.dist.broadcast_object_list(holder, src=0)
        self.step += 1
        return holder[0]

    def receive(self) -> Any:
        """The next message from rank 0 (DistributedIndexError when rank 0 stopped with an error instead)."""
        message = self.broadcast()
        if message[0] == "error":
            raise DistributedIndexError(f"rank 0 stopped: {message[1]}", message[2])
        return message[1]

    def gather(self, stats: WorkStats) -> list[WorkStats]:
        gathered: list[Any] = [None] * self.world_size
        with _lost_ranks():
            self.dist.all_gather_object(gathered, stats)
        self.gathered = True
        return gathered

    def abort(self, error: BaseException) -> None:
        """Rank 0 failed: tell ranks waiting on a broadcast or the gather, so they stop instead of hanging."""
        if isinstance(error, KeyboardInterrupt):  # torchrun delivers Ctrl+C to every rank
            return
        try:
            if self.step < 2:  # the ranks stop at the first error message, so one is all they read
                self.broadcast(("error", _describe(error), getattr(error, "hint", None)))
            elif not self.gathered:
                self.gather(WorkStats(rank=self.rank, error=_describe(error)))
        except Exception as e:  # the group may be what broke
            log.debug("could not tell the other ranks about the error: %s", e)

    def outlive_lead(self) -> None:
        """Wait until rank 0 has left the group (it reports every rank's error): torchrun stops all ranks at the
        first one that exits with an error, so a failing rank that left first would cut rank 0's report short."""
        try:
            self.dist.barrier()  # rank 0 never joins it: this ends when rank 0 closes the group or exits
        except RuntimeError:
            pass

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


@contextmanager
def _lost_ranks() -> Iterator[None]:
    """A collective that failed because another rank died (its own error is in its log) as a typed error."""
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL report a dead peer as RuntimeError (DistBackendError)
        raise DistributedIndexError(
            f"lost contact with the other ranks ({e})",
            "another rank stopped: see its error; finished shards are kept under DATA_DIR/distributed, so running "
            "the same command again embeds only the rest",
        ) from e


def _describe(error: BaseException) -> str:
    return error.message if isinstance(error, ClipsearchError) else f"{type(error).__name__}: {error}"


def _load_encoder(settings: Settings, model: str, pretrained: str, device: str) -> Encoder:
    return load_encoder(EncoderSpec(model, pretrained, device, settings.precision, settings.model_cache_dir,
                                    settings.runtime))


class DistributedIndexer(Indexer):
    """Rank 0's indexer: plans like Indexer, has the shards embedded by every rank, then merges them in order."""

    def __init__(self, library: Library, encoder: Encoder, group: _ProcessGroup, model: str, pretrained: str,
                 shard_size: int = DEFAULT_SHARD_SIZE, progress: IndexProgress | None = None):
        super().__init__(library, encoder, progress)
        self.group = group
        self.model, self.pretrained = model, pretrained
        self.shard_size = shard_size

    def _process(self, candidates: list[Candidate]) -> None:
        """Broadcast the plan, embed rank 0's shards, wait for every rank, merge (progress: rank 0's files first)."""
        run_id = run_id_for(candidates, self.encoder.model_id, self.shard_size, self.settings.max_image_pixels)
        folder = run_folder(self.library.data_dir, run_id)
        plan = Plan(run_id, self.model, self.pretrained, self.encoder.model_id, candidates, self.shard_size,
                    self._gone_by_hash)
        plan.pending = [i for i in range(plan.shard_count) if not is_finished(folder, run_id, i)]
        if len(plan.pending) < plan.shard_count:
            log.info("resuming run %s: %d of %d shards already embedded", run_id, plan.shard_count - len(plan.pending),
                     plan.shard_count)
        self.group.broadcast(("plan", plan))
        error: Exception | None = None
        counted = {i for i in range(plan.shard_count) if i not in plan.pending}  # files the progress has seen
        for index in counted:
            self._advance(len(plan.shard(index)))
        try:
            own = embed_shards(plan, plan.assigned(0, self.group.world_size), self.encoder, self.settings, folder,
                               on_file=self._advance)
            counted.update(own.shards + own.skipped)
        except Exception as e:  # still join the gather, or every other rank waits for rank 0 forever
            error, own = e, WorkStats(error=_describe(e))
        everyone = self.group.gather(own)
        if error is not None:
            raise error
        for stats in everyone:
            if stats.error:
                raise DistributedIndexError(
                    f"rank {stats.rank} failed: {stats.error}",
                    f"the shards finished so far are kept in {folder}: "
                    "run the same command again to embed only the rest",
                )
        self.report.encode_seconds += sum(stats.encode_seconds for stats in everyone)
        self._merge(plan, folder, counted)
        _remove_run_folder(folder)

    def _advance(self, count: int = 1) -> None:
        if self.progress:
            self.progress.advance(count)

    def _merge(self, plan: Plan, folder: Path, counted: set[int]) -> None:
        # One transaction: a crash mid-merge leaves the catalog as planned, so the rerun makes the same plan, finds
        # the same run and re-merges its shards without embedding anything again.
        embedded_ids: list[int] = []
        with self.catalog.write() as session:
            for index in range(plan.shard_count):
                shard = read_shard(folder, plan, index, self.encoder.dim)
                batch, vectors = self._shard_batch(plan.shard(index), shard, advance=index not in counted)
                embedded_ids += self._write_rows(session, batch, vectors)
                session.flush()
                session.expunge_all()  # keep memory flat over millions of rows; the transaction stays open
        for start in range(0, len(embedded_ids), self.shard_size):  # labels load the vectors: a shard at a time
            self._label(embedded_ids[start : start + self.shard_size])

    def _shard_batch(self, candidates: list[Candidate], shard: Shard, advance: bool) -> tuple[_Batch, np.ndarray]:
        """A shard's records as the single-process pipeline's batch: moves claimed here, in plan order."""
        batch = _Batch()
        kept: list[int] = []  # rows of shard.vectors that become embeddings
        again: list[Candidate] = []
        catalogued = self._hashes_in_catalog(
            [r.content_hash for c, r in zip(candidates, shard.records) if r.kind == EMBEDDED and c.allow_move])
        vector_row = -1
        for candidate, record in zip(candidates, shard.records):
            if record.kind == EMBEDDED:
                vector_row += 1
            if record.kind == UNCHANGED:
                batch.unchanged.append(Unchanged(candidate, record.content_hash))
            elif record.kind == FAILED:
                batch.failed.append(Failed(candidate, record.reason or "", record.content_hash))
                if self.progress:
                    self.progress.failed(candidate.path, record.reason or "")
            else:
                # The catalog decides moves, as in Indexer._process: a gone row with this content is kept, not embedded.
                may_move = candidate.allow_move and (record.kind == MOVED or record.content_hash in catalogued)
                row_ids = self._find_moved(record.content_hash, candidate) if may_move else []
                if row_ids:
                    self._claimed.add(row_ids[0])
                    batch.moved.append((MaybeMoved(candidate, record.content_hash, row_ids), row_ids[0]))
                elif record.kind == EMBEDDED:
                    batch.prepared.append(
                        Prepared(candidate, record.content_hash, record.info, None, record.decode_seconds))
                    kept.append(vector_row)
                else:  # another copy took the row this one matched: embed it, as the single-process run does
                    again.append(candidate)
            if advance:
                self._advance()
        vectors = shard.vectors[kept]
        if again:
            vectors = np.concatenate([vectors, self._embed_here(again, batch)])
        return batch, vectors

    def _embed_here(self, candidates: list[Candidate], batch: _Batch) -> np.ndarray:
        """Embed a few files on rank 0 during the merge (duplicates whose move source another copy took)."""
        inputs = []
        for candidate in candidates:
            candidate.allow_move = False
            outcome = prepare(candidate, self.encoder.preprocess, image_size=self.encoder.image_size,
                              max_pixels=self.settings.max_image_pixels, find_moved=None)
            if isinstance(outcome, Prepared):
                batch.prepared.append(outcome)
                inputs.append(outcome.model_input)
            elif isinstance(outcome, Failed):
                batch.failed.append(outcome)
                if self.progress:
                    self.progress.failed(candidate.path, outcome.reason)
            else:
                batch.unchanged.append(outcome)
        parts = [np.zeros((0, self.encoder.dim), np.float32)]
        size = self.settings.batch_size
        started = time.perf_counter()
        for start in range(0, len(inputs), size):
            parts.append(np.asarray(self.encoder.encode_images(inputs[start : start + size]), np.float32))
        self.report.encode_seconds += time.perf_counter() - started
        return np.concatenate(parts)

    def _hashes_in_catalog(self, hashes: Sequence[str | None]) -> set[str]:
        """Which of these content hashes some catalog row has (one query per 500, instead of one per file)."""
        wanted = sorted({h for h in hashes if h})
        found: set[str] = set()
        with self.catalog.read() as session:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                found.update(session.scalars(select(ImageRow.content_hash).where(ImageRow.content_hash.in_(chunk))))
        return found


def _remove_run_folder(folder: Path) -> None:
    """Delete a merged run's shards (and the runs folder once empty); a leftover costs disk space, never a row."""
    try:
        shutil.rmtree(folder, ignore_errors=False)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not delete the merged shards in %s (%s): delete the folder by hand", folder, e)
    try:
        folder.parent.rmdir()
    except OSError:  # other runs' shards (a crashed run over other folders) wait there for their rerun
        others = [p.name for p in folder.parent.iterdir() if p.is_dir()] if folder.parent.is_dir() else []
        if others:
            log.info("shards of %d unfinished runs remain in %s: rerun them, or delete that folder if you will not",
                     len(others), folder.parent)


def index_distributed(
    settings: Settings,
    folders: Sequence[str | Path],
    *,
    reembed: bool = False,
    progress: IndexProgress | None = None,
    encoder: Encoder | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    backend: str | None = None,
) -> IndexReport:
    """Index folders with every rank of a torchrun job (call it on each rank with the same arguments).

    Rank 0 returns the run's report (as index_folders does); the other ranks return their own share (embedded,
    encode_seconds, seconds). backend defaults to nccl on CUDA, gloo otherwise.
    """
    if shard_size < 1:
        raise DistributedIndexError(f"shard size {shard_size} must be at least 1", "pass --shard-size 1000 (the default)")
    rank, _world_size, local_rank = torchrun_environment()
    device = encoder.device if encoder is not None else rank_device(settings.device, local_rank)
    group = _ProcessGroup(device, backend)
    try:
        if group.rank == 0:
            return _lead(settings, folders, group, device, reembed, progress, encoder, shard_size)
        return _follow(settings, group, device, encoder)
    finally:
        group.close()


def _lead(settings: Settings, folders: Sequence[str | Path], group: _ProcessGroup, device: str, reembed: bool,
          progress: IndexProgress | None, encoder: Encoder | None, shard_size: int) -> IndexReport:
    library = Library(settings)
    try:
        with library.writer_lock("distributed index"):
            model, pretrained = library.resolve_model(allow_change=reembed)
            group.broadcast(("model", (model, pretrained)))  # the other ranks load it while this one walks
            if encoder is None:
                encoder = _load_encoder(settings, model, pretrained, device)
            prepare_library_model(library, encoder, model, pretrained)
            indexer = DistributedIndexer(library, encoder, group, model, pretrained, shard_size, progress)
            return indexer.run(folders)
    except BaseException as e:
        group.abort(e)
        raise
    finally:
        library.close()


def _follow(settings: Settings, group: _ProcessGroup, device: str, encoder: Encoder | None) -> IndexReport:
    model, pretrained = group.receive()
    error: Exception | None = None
    try:
        if encoder is None:
            encoder = _load_encoder(settings, model, pretrained, device)
    except Exception as e:  # reported through the gather below, after the plan, so rank 0 does not wait forever
        error = e
    plan: Plan = group.receive()
    stats = WorkStats(rank=group.rank)
    if error is None:
        try:
            stats = embed_shards(plan, plan.assigned(group.rank, group.world_size), encoder, settings,
                                 run_folder(Path(settings.data_dir).expanduser().absolute(), plan.run_id))
        except Exception as e:
            error = e
    stats.rank = group.rank
    stats.error = _describe(error) if error is not None else None
    group.gather(stats)
    if error is not None:
        group.outlive_lead()
        raise error
    log.info("rank %d: embedded %d files in %d shards (%d already done)", group.rank, stats.embedded,
             len(stats.shards), len(stats.skipped))
    return IndexReport(model_id=plan.model_id, embedded=stats.embedded, seconds=stats.seconds,
                       encode_seconds=stats.encode_seconds)


def build_command():
    """The click command behind `python -m clipsearch.indexer.distributed` (built on call: click loads lazily)."""
    import click

    from clipsearch.cli_common import INDEX_SETTINGS, reports_errors, settings_options

    @click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.argument("folders", nargs=-1, required=True, type=click.Path(file_okay=False))
    @click.option("--reembed", is_flag=True, help="Re-embed every image with the chosen model, replacing the library's vectors.")
    @click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE, show_default=True,
                  help="Files per embedding shard (the unit a rerun after a crash skips).")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (rank 0).")
    @reports_errors
    @settings_options(*INDEX_SETTINGS)
    def command(folders: tuple[str, ...], reembed: bool, shard_size: int, as_json: bool, settings: Settings) -> None:
        """Index FOLDERS with every rank of a torchrun job; rank 0 writes the library (run under torchrun)."""
        import json

        from clipsearch.cli import _print_index_summary
        from clipsearch.cli_progress import ProgressDisplay

        lead = os.environ.get("RANK") == "0"
        display = ProgressDisplay(enabled=lead and sys.stderr.isatty() and not as_json)
        with display:
            report = index_distributed(settings, folders, reembed=reembed, progress=display, shard_size=shard_size)
        if not lead:
            return
        if as_json:
            click.echo(json.dumps(report.as_dict(), indent=2))
        else:
            _print_index_summary(report, settings)

    return command


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m clipsearch.indexer.distributed` (under torchrun)."""
    build_command()(args=list(argv) if argv is not None else None, prog_name="clipsearch.indexer.distributed")


if __name__ == "__main__":
    main()
