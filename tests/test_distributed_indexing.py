"""Distributed indexing: 2 gloo processes on the CPU give the single-process library; a crashed rank's shards are kept."""

from __future__ import annotations

import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from clipsearch.config import load_settings
from clipsearch.errors import ClipsearchError
from clipsearch.indexer.distributed import DistributedIndexError, index_distributed, torchrun_environment
from clipsearch.indexer.distributed_shards import RUNS_FOLDER, SHARD_FORMAT
from clipsearch.indexer.run import index_folders
from clipsearch.library import Library
from tests.fakes import COLOR_NAMES, ColorWordEncoder, make_image, register_fake_encoder

SHARD_SIZE = 4
BATCH_SIZE = 4
CRASH = 3  # exit status of the rank made to die


class CrashingEncoder(ColorWordEncoder):
    """On its n-th encode call, dies like a killed process (no cleanup, no exception) or raises."""

    def __init__(self, fault: tuple[str, int] | None = None):
        super().__init__()
        self.fault = fault

    def encode_images(self, batch):
        if self.fault is not None and len(self.image_batches) + 1 == self.fault[1]:
            if self.fault[0] == "exit":
                os._exit(CRASH)
            raise RuntimeError("out of memory (test)")
        return super().encode_images(batch)


def library_settings(data_dir: Path):
    return load_settings({"data_dir": data_dir, "model": "test-colors", "pretrained": "v1", "workers": 2,
                          "batch_size": BATCH_SIZE}, env={})


def _rank_main(rank: int, world_size: int, port: int, data_dir: str, folders: list[str], out_dir: str,
               faults: dict[int, tuple[str, int]]) -> None:
    """One spawned rank: the torchrun variables, then index_distributed; writes its report and encode count (or error)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    register_fake_encoder()
    encoder = CrashingEncoder(faults.get(rank))
    try:
        report = index_distributed(library_settings(Path(data_dir)), folders, encoder=encoder, shard_size=SHARD_SIZE)
    except ClipsearchError as e:
        Path(out_dir, f"rank-{rank}.error").write_text(json.dumps([type(e).__name__, e.message, e.hint]))
        raise
    result = {"report": report.as_dict(), "encoded": encoder.images_embedded}
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(result))


def run_ranks(data_dir: Path, folders: list[Path], out_dir: Path, world_size: int = 2,
              faults: dict[int, tuple[str, int]] | None = None):
    """Run world_size ranks to the end; [(report dict, images encoded)] by rank."""
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("rank-*.json"), *out_dir.glob("rank-*.error")]:
        stale.unlink()
    # fork: the ranks start with torch and clipsearch already imported (seconds saved per run on a small machine)
    ranks = mp.start_processes(_rank_main, args=(world_size, free_port(), str(data_dir), [str(f) for f in folders],
                                                 str(out_dir), faults or {}),
                               nprocs=world_size, join=False, start_method="fork")
    while not ranks.join(grace_period=30):  # after a failure, the other ranks end (and report) by themselves
        pass
    results = [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in range(world_size)]
    return [(r["report"], r["encoded"]) for r in results]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_photos(folder: Path, count: int = 18) -> dict[str, Path]:
    files = {}
    for n in range(count):
        name = f"{'ab'[n % 2]}/{n:02d}.{'png' if n % 3 else 'jpg'}"
        files[name] = make_image(folder / name, COLOR_NAMES[n % len(COLOR_NAMES)], noise=n + 1)
    (folder / "a" / "broken.jpg").write_text("not an image")
    (folder / "b" / "empty.png").write_bytes(b"")
    return files


@contextmanager
def open_library(data_dir: Path) -> Iterator[Library]:
    library = Library(library_settings(data_dir))
    try:
        yield library
    finally:
        library.close()  # no connection left open when the next run forks the ranks


def state(data_dir: Path, root: Path) -> dict:
    """Everything a user sees of a library, keyed by path (row ids differ between two libraries)."""
    with open_library(data_dir) as library:
        catalog = library.catalog
        known = catalog.known_under([str(root)])
        rows = {row.path: row for row in catalog.images_by_id([k.id for k in known.values()]).values()}
        model_id = catalog.library_model()["model_id"]
        ids, vectors = catalog.vectors(model_id)
        by_id = dict(zip(ids.tolist(), vectors))
        store = library.open_store()
        return {
            "rows": {p: (r.root, r.status, r.error, r.content_hash, r.size, r.mtime_ns, r.width, r.height, r.format, r.taken_at)
                     for p, r in rows.items()},
            "ids": {p: r.id for p, r in rows.items()},
            "vectors": {p: by_id[r.id] for p, r in rows.items() if r.id in by_id},
            "counts": catalog.counts(),
            "store": store.count if store else 0,
            "runs_left": (data_dir / RUNS_FOLDER).exists(),
        }


def assert_same_library(distributed: dict, single: dict) -> None:
    assert distributed["rows"] == single["rows"]  # same paths, status, failure reasons, content, image facts
    assert distributed["vectors"].keys() == single["vectors"].keys()
    for path, vector in single["vectors"].items():
        np.testing.assert_allclose(distributed["vectors"][path], vector, atol=1e-6)
    assert distributed["counts"] == single["counts"]  # no duplicate rows, one embedding per indexed file
    assert distributed["store"] == single["store"] == single["counts"]["ok"]
    assert not distributed["runs_left"]  # the merged shards are deleted


def test_two_processes_build_the_single_process_library(tmp_path):
    photos = tmp_path / "photos"
    make_photos(photos)
    single = index_folders(library_settings(tmp_path / "single"), [photos], encoder=ColorWordEncoder())
    (lead, lead_encoded), (_, other_encoded) = run_ranks(tmp_path / "multi", [photos], tmp_path / "out")
    assert_same_library(state(tmp_path / "multi", photos), state(tmp_path / "single", photos))
    assert lead_encoded > 0 and other_encoded > 0  # both ranks embedded their shards
    assert lead_encoded + other_encoded == single.embedded == lead["embedded"] == 18
    for key in ("added", "updated", "moved", "removed", "unchanged", "failures"):
        assert lead[key] == single.as_dict()[key], key


def test_changes_merge_with_single_process_row_semantics(tmp_path):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    files = make_photos(photos)
    make_image(elsewhere / "cyan.png", "cyan", noise=77)
    for data_dir in ("single", "multi"):
        index_folders(library_settings(tmp_path / data_dir), [photos, elsewhere], encoder=ColorWordEncoder())
    before = state(tmp_path / "multi", photos)
    with open_library(tmp_path / "multi") as library:
        from_elsewhere = library.catalog.image_by_path(str(elsewhere / "cyan.png")).id
    make_image(files["a/00.jpg"], "orange")                           # modified in place
    files["b/01.png"].rename(photos / "b" / "renamed.png")             # renamed: keeps its row
    (photos / "c").mkdir()
    files["a/02.png"].rename(photos / "c" / "moved.png")               # moved to a new folder
    shutil.copy(files["b/03.jpg"], photos / "c" / "copy1.jpg")         # two copies of a deleted file: one takes
    shutil.copy(files["b/03.jpg"], photos / "c" / "copy2.jpg")         # its row, the other is embedded on rank 0
    files["b/03.jpg"].unlink()
    files["a/04.png"].unlink()                                         # deleted
    os.utime(files["b/05.png"], ns=(1, 1))                             # touched, same bytes
    make_image(photos / "a" / "broken.jpg", "white", fmt="JPEG")       # a failed file fixed
    make_image(photos / "c" / "new.png", "purple", noise=99)           # new
    shutil.move(elsewhere / "cyan.png", photos / "c" / "cyan.png")     # moved in from a folder outside this run
    single = index_folders(library_settings(tmp_path / "single"), [photos], encoder=ColorWordEncoder())
    (lead, encoded), (_, other) = run_ranks(tmp_path / "multi", [photos], tmp_path / "out")
    after = state(tmp_path / "multi", photos)
    assert_same_library(after, state(tmp_path / "single", photos))
    for key in ("added", "updated", "moved", "removed", "unchanged", "failures"):
        assert lead[key] == single.as_dict()[key], key
    assert (lead["moved"], lead["removed"]) == (4, 1)
    assert after["ids"][str(photos / "c" / "cyan.png")] == from_elsewhere
    assert after["ids"][str(photos / "b" / "renamed.png")] == before["ids"][str(files["b/01.png"])]
    assert after["ids"][str(photos / "c" / "moved.png")] == before["ids"][str(files["a/02.png"])]
    copies = {after["ids"][str(photos / "c" / name)] for name in ("copy1.jpg", "copy2.jpg")}
    assert before["ids"][str(files["b/03.jpg"])] in copies
    assert after["ids"][str(files["a/00.jpg"])] == before["ids"][str(files["a/00.jpg"])]


def finished_shards(data_dir: Path) -> dict[int, int]:
    """{shard index: files in it} of every finished shard file of the (single) interrupted run."""
    from safetensors import safe_open

    found = {}
    for path in (data_dir / RUNS_FOLDER).glob("*/shard-*.safetensors"):
        with safe_open(str(path), "np") as handle:
            header = handle.metadata()
        assert header["format"] == SHARD_FORMAT
        found[int(header["shard"])] = len(json.loads(header["records"]))
    return found


def test_crashed_rank_resumes_without_redoing_finished_shards(tmp_path):
    from torch.multiprocessing.spawn import ProcessException

    photos = tmp_path / "photos"
    for n in range(20):  # 5 shards of 4: rank 0 gets 0, 2, 4 and rank 1 gets 1, 3
        make_image(photos / f"{n:02d}.png", COLOR_NAMES[n % len(COLOR_NAMES)], noise=n + 1)
    with pytest.raises(ProcessException):
        # rank 1 dies on its second encode call: after writing its first shard
        run_ranks(tmp_path / "multi", [photos], tmp_path / "out", faults={1: ("exit", 2)})
    done = finished_shards(tmp_path / "multi")
    assert 1 in done and 3 not in done
    with open_library(tmp_path / "multi") as library:
        assert library.catalog.counts()["images"] == 0  # nothing merged yet

    results = run_ranks(tmp_path / "multi", [photos], tmp_path / "out")
    assert sum(encoded for _, encoded in results) == 20 - sum(done.values())  # finished shards are not embedded again
    lead = results[0][0]
    assert (lead["added"], lead["embedded"], lead["failed"]) == (20, 20, 0)
    index_folders(library_settings(tmp_path / "single"), [photos], encoder=ColorWordEncoder())
    assert_same_library(state(tmp_path / "multi", photos), state(tmp_path / "single", photos))


def test_rerun_over_an_indexed_folder_does_nothing(tmp_path):
    photos = tmp_path / "photos"
    make_photos(photos)
    index_folders(library_settings(tmp_path / "lib"), [photos], encoder=ColorWordEncoder())
    before = state(tmp_path / "lib", photos)
    results = run_ranks(tmp_path / "lib", [photos], tmp_path / "out")
    lead = results[0][0]
    assert [encoded for _, encoded in results] == [0, 0]
    assert (lead["added"], lead["updated"], lead["moved"], lead["removed"], lead["embedded"]) == (0, 0, 0, 0, 0)
    assert lead["unchanged"] == 20  # 18 photos and 2 failed files, none retried
    after = state(tmp_path / "lib", photos)
    assert after["ids"] == before["ids"]
    assert_same_library(after, before)


def test_outside_torchrun_is_refused_with_a_hint(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedIndexError, match="not started by torchrun") as caught:
        index_distributed(library_settings(tmp_path / "lib"), [tmp_path], encoder=ColorWordEncoder())
    assert "torchrun --nproc_per_node" in caught.value.hint
    with pytest.raises(DistributedIndexError, match="RANK=2"):
        torchrun_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    assert not (tmp_path / "lib").exists()  # nothing was created


def rank_errors(out_dir: Path) -> dict[int, list]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out_dir.glob("rank-*.error")}


def test_a_failing_rank_is_reported_by_rank_0_and_its_finished_shards_kept(tmp_path):
    from torch.multiprocessing.spawn import ProcessException

    photos = tmp_path / "photos"
    make_photos(photos)
    with pytest.raises(ProcessException):
        run_ranks(tmp_path / "lib", [photos], tmp_path / "out", faults={1: ("raise", 1)})
    errors = rank_errors(tmp_path / "out")
    kind, message, hint = errors[0]
    assert kind == "DistributedIndexError" and "rank 1 failed: RuntimeError: out of memory (test)" in message
    assert "run the same command again" in hint
    assert finished_shards(tmp_path / "lib")  # rank 0's shards wait for the rerun
    with open_library(tmp_path / "lib") as library:
        assert library.catalog.counts()["images"] == 0


def test_rank_0_errors_reach_the_other_ranks(tmp_path):
    from torch.multiprocessing.spawn import ProcessException

    photos = tmp_path / "photos"
    make_photos(photos)
    with open_library(tmp_path / "lib") as library, library.writer_lock("watch"):
        with pytest.raises(ProcessException):
            run_ranks(tmp_path / "lib", [photos], tmp_path / "out")
    errors = rank_errors(tmp_path / "out")
    assert errors[0][0] == "LibraryBusyError"
    assert errors[1][0] == "DistributedIndexError" and errors[1][1].startswith("rank 0 stopped: the library")
    assert errors[1][2] == errors[0][2]  # the same hint on every rank


def test_the_module_command_explains_how_to_launch_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from clipsearch.indexer.distributed import build_command

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(build_command(), [str(tmp_path), "--data-dir", str(tmp_path / "lib"), "--shard-size", "10"])
    assert result.exit_code == 1
    assert "not started by torchrun" in result.output and "torchrun --nproc_per_node=N" in result.output


def test_clipsearch_index_distributed_outside_torchrun_says_how_to_launch(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from clipsearch.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["index", "--distributed", str(tmp_path), "--data-dir", str(tmp_path / "lib")])
    assert result.exit_code == 1 and "not started by torchrun" in result.output and "hint:" in result.output
