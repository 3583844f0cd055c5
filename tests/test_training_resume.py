"""Exact resume: a run continued from a checkpoint logs the uninterrupted run's next losses bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch

from clipsearch.errors import ConfigError
from clipsearch.training import train
from clipsearch.training import loop
from clipsearch.training.checkpoints import checkpoint_path, find_checkpoint, list_checkpoints, load_checkpoint
from tests.training_fixtures import colour_captions, tiny_config, train_rows

STEPS = 6
EXACT = ("step", "epoch", "batch", "loss", "lr", "logit_scale", "grad_norm")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data CSV, output folder, run folder) of an uninterrupted 6-step run checkpointing every step, keeping 3."""
    root = tmp_path_factory.mktemp("resume")
    data = colour_captions(root / "data", per_colour=3)  # 24 samples: 3 steps an epoch, so the run crosses epochs
    run = train(tiny_config(data, root / "runs", "full", steps=STEPS, checkpoint_every=1, keep_last=3, export=False))
    return data, root / "runs", run


def _exact(rows):
    return [{k: row[k] for k in EXACT} for row in rows]


def test_keep_last_and_checkpoint_contents(reference):
    _, _, run = reference
    assert [step for step, _ in list_checkpoints(run)] == [4, 5, 6]
    saved = load_checkpoint(checkpoint_path(run, 4))
    assert (saved.step, saved.epoch, saved.batch) == (4, 1, 1)  # 3 steps an epoch: step 4 ends epoch 1's first batch
    assert set(saved.rng[0]) >= {"python", "numpy", "torch"}
    assert saved.scheduler["last_epoch"] == 4 and saved.optimizer["state"]
    assert not list((run / "checkpoints").glob(".*tmp"))  # no half-written files left behind


def test_resume_from_a_checkpoint_reproduces_the_next_losses(reference, tmp_path):
    data, _, run = reference
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    resumed = train(tiny_config(data, tmp_path, "ignored", steps=STEPS, checkpoint_every=1, keep_last=3, export=False,
                                resume=str(checkpoint_path(copy, 4))))
    assert resumed == copy  # a resumed run continues in the checkpoint's own run folder
    assert _exact(train_rows(copy)) == _exact(train_rows(run))
    final, expected = load_checkpoint(checkpoint_path(copy, STEPS)), load_checkpoint(checkpoint_path(run, STEPS))
    assert all(torch.equal(final.model[k], expected.model[k]) for k in expected.model)


def test_interrupted_run_resumes_with_data_workers(reference, tmp_path, monkeypatch):
    """Ctrl-C saves a checkpoint; resuming the run folder (with a DataLoader worker this time) matches."""
    data, _, run = reference
    real_step = loop._Trainer._step

    def interrupt_at_step_4(self, group):
        if self.state.step == 3:
            raise KeyboardInterrupt
        return real_step(self, group)

    monkeypatch.setattr(loop._Trainer, "_step", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path, "cut", steps=STEPS, checkpoint_every=0, export=False))
    monkeypatch.setattr(loop._Trainer, "_step", real_step)
    cut = tmp_path / "cut"
    assert [step for step, _ in list_checkpoints(cut)] == [3]
    assert len(train_rows(cut)) == 3
    train(tiny_config(data, tmp_path, "cut", steps=STEPS, export=False, workers=1, resume=str(cut)))
    assert _exact(train_rows(cut)) == _exact(train_rows(run))


def test_find_checkpoint(reference, tmp_path):
    _, output, run = reference
    assert find_checkpoint(str(run), output) == checkpoint_path(run, 6)
    assert find_checkpoint("latest", output) == checkpoint_path(run, 6)
    assert find_checkpoint(str(checkpoint_path(run, 5)), output) == checkpoint_path(run, 5)
    with pytest.raises(ConfigError, match="no run under"):
        find_checkpoint("latest", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nope.pt"), tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
