"""Training data layer: every source kind, deterministic order, exact resume, rank slicing, workers, failures, splits."""

from __future__ import annotations

import csv
import gzip
import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.errors import ConfigError
from clipsearch.search.evaluation import evaluate_zeroshot, read_captions, read_labels
from clipsearch.training import data as data_module
from clipsearch.training.data import DataSpec, TrainData, decode_size, eval_sets_from, open_train_data
from clipsearch.training.data_shards import braceexpand, expand_shards, split_member_name

CTX = 48


def colour_of(i: int) -> tuple[int, int, int]:
    """A colour that names sample i exactly (PNG is lossless)."""
    return (i % 256, (i * 7) % 256, 200)


def sample_of(pixels: torch.Tensor) -> int:
    """The sample number a preprocessed solid-colour image came from."""
    return int(round(float(pixels[0, 0, 0]) * 255))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A preprocess that keeps colours recognisable: resize to 8x8, [0, 1] floats, CHW."""
    array = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class CharTokenizer:
    """A reversible tokenizer: characters as codes, zero padded to CTX (the open_clip call shape)."""

    def __call__(self, texts):
        out = torch.zeros(len(texts), CTX, dtype=torch.long)
        for row, text in enumerate(texts):
            codes = [ord(c) for c in text[:CTX]]
            out[row, :len(codes)] = torch.tensor(codes, dtype=torch.long)
        return out


def decode(tokens: torch.Tensor) -> list[str]:
    return ["".join(chr(c) for c in row.tolist() if c) for row in tokens]


def png(path: Path, colour, size=(6, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def image_bytes(colour, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), colour).save(buffer, fmt)
    return buffer.getvalue()


def write_caption_table(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A caption CSV (filepath, title) of the given rows."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title"), *rows])
    return path


def write_shard(path: Path, samples: list[dict[str, bytes]], gz: bool = False) -> Path:
    """A webdataset shard: each sample a dict of extension -> payload, with a __key__."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for sample in samples:
            for ext, payload in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = raw.getvalue()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def open_data(path, **spec) -> TrainData:
    return open_train_data(DataSpec(str(path), **spec), preprocess=to_tensor, tokenizer=CharTokenizer())


def all_batches(data: TrainData, batch: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.loader(batch, **kwargs))


def samples_in(batches) -> list[int]:
    return [sample_of(img) for images, _ in batches for img in images]


@pytest.fixture
def caption_csv(tmp_path) -> Path:
    """20 images, each with two caption rows, in open_clip's filepath,title columns; paths relative to the CSV."""
    rows = []
    for i in range(20):
        png(tmp_path / "img" / f"{i:02d}.png", colour_of(i))
        rows += [(f"img/{i:02d}.png", f"photo {i} a"), (f"img/{i:02d}.png", f"photo {i} b")]
    return write_caption_table(tmp_path / "data.csv", rows)


# ---- sources --------------------------------------------------------------------------------------------------------

def test_caption_table_groups_rows_per_image_and_picks_one_caption_per_epoch(caption_csv):
    data = open_data(caption_csv)
    assert data.kind == "csv" and data.num_samples == 20 and data.class_names is None
    seen = {}
    for epoch in range(6):
        for images, tokens in data.loader(5, epoch=epoch, seed=1):
            assert images.shape == (5, 3, 8, 8) and tokens.shape == (5, CTX)
            for img, caption in zip(images, decode(tokens)):
                i = sample_of(img)
                assert caption in (f"photo {i} a", f"photo {i} b")
                seen.setdefault(i, set()).add(caption)
    assert len(seen) == 20 and any(len(c) == 2 for c in seen.values())  # both captions get used across epochs


def test_tsv_and_custom_columns(tmp_path):
    for i in range(4):
        png(tmp_path / f"{i}.png", colour_of(i))
    path = tmp_path / "pairs.tsv"
    path.write_text("file\ttext\n" + "".join(f"{i}.png\tcap {i}\n" for i in range(4)))
    with pytest.raises(ConfigError, match="no column 'image'"):
        open_data(path, image_column="image", caption_column="text")
    data = open_data(path, image_column="file", caption_column="text")
    (images, tokens), = all_batches(data, 4, epoch=0, seed=0)
    assert sorted(decode(tokens)) == [f"cap {i}" for i in range(4)]
    assert {sample_of(img) for img in images} == {0, 1, 2, 3}


def test_eval_style_captions_csv_is_detected(tmp_path):
    png(tmp_path / "images" / "a.png", colour_of(3))
    (tmp_path / "captions.csv").write_text("relative_path,caption\nimages/a.png,a dog\nimages/a.png,a brown dog\n")
    data = open_data(tmp_path / "captions.csv")
    assert data.kind == "csv" and data.num_samples == 1


def test_captions_folder_uses_sidecar_lines_and_leaves_out_uncaptioned_images(tmp_path):
    for i in range(6):
        png(tmp_path / "trip" / f"p{i}.png", colour_of(i))
        if i != 5:
            (tmp_path / "trip" / f"p{i}.txt").write_text(f"first {i}\n\nsecond {i}\n")
    data = open_data(tmp_path)
    assert data.kind == "captions-folder" and data.num_samples == 5
    assert data.incomplete == [("trip/p5.png", "no caption file beside it")]
    captions = set()
    for epoch in range(4):
        for images, tokens in data.loader(5, epoch=epoch, seed=0):
            for img, caption in zip(images, decode(tokens)):
                assert caption in (f"first {sample_of(img)}", f"second {sample_of(img)}")
                captions.add(caption)
    assert len(captions) > 5


def test_class_folders_caption_with_templates(tmp_path):
    for n, name in enumerate(["golden_retriever", "cat"]):
        for i in range(3):
            png(tmp_path / name / f"{i}.png", colour_of(n * 10 + i))
    data = open_data(tmp_path, templates=("a photo of a {}.", "itap of a {}."))
    assert data.kind == "class-folders" and data.class_names == ["cat", "golden retriever"]
    (images, tokens), = all_batches(data, 6, epoch=0, seed=0)
    for img, caption in zip(images, decode(tokens)):
        name = "golden retriever" if sample_of(img) < 10 else "cat"
        assert caption in (f"a photo of a {name}.", f"itap of a {name}.")
    default = open_data(tmp_path)  # the zero-shot default templates
    assert default.templates == data_module.DEFAULT_TEMPLATES
    with pytest.raises(ConfigError, match="has no"):
        open_data(tmp_path, templates=("a photo",))


def test_labels_csv_with_classes_file(tmp_path):
    for i, label in enumerate(["dog", "cat", "dog"]):
        png(tmp_path / "images" / f"{i}.png", colour_of(i))
    (tmp_path / "labels.csv").write_text("relative_path,label\n" + "".join(
        f"images/{i}.png,{label}\n" for i, label in enumerate(["dog", "cat", "dog"])))
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\n")
    data = open_data(tmp_path / "labels.csv", classes_file=str(tmp_path / "classes.txt"), templates=("{}",))
    assert data.kind == "labels-csv" and data.class_names == ["dog", "cat", "bird"]
    (images, tokens), = all_batches(data, 3, epoch=0, seed=0)
    assert {(sample_of(img), c) for img, c in zip(images, decode(tokens))} == {(0, "dog"), (1, "cat"), (2, "dog")}


# ---- webdataset shards ----------------------------------------------------------------------------------------------

def caption_shards(folder: Path, gz: bool, n_shards=3, per_shard=4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = [{"__key__": f"{s}{k:03d}", "png": image_bytes(colour_of(s * per_shard + k)),
                    "txt": f"shard caption {s * per_shard + k}".encode(), "json": b"{}"} for k in range(per_shard)]
        paths.append(write_shard(folder / f"train-{s:04d}.tar{'.gz' if gz else ''}", samples, gz))
    return paths


@pytest.mark.parametrize("gz", [False, True])
def test_webdataset_shards_plain_and_gzipped(tmp_path, gz):
    caption_shards(tmp_path / "shards", gz)
    suffix = ".tar.gz" if gz else ".tar"
    data = open_train_data(DataSpec(str(tmp_path / "shards" / f"train-{{0000..0002}}{suffix}")), preprocess=to_tensor,
                           tokenizer=CharTokenizer(), cache_dir=tmp_path / "cache")
    assert data.kind == "webdataset" and data.num_samples == 12 and not data.class_mode
    (images, tokens), = all_batches(data, 12, epoch=0, seed=0)
    assert sorted((sample_of(i), c) for i, c in zip(images, decode(tokens))) == [
        (n, f"shard caption {n}") for n in range(12)]
    assert data.source.sample_id(0) == f"train-0000{suffix}:0000"


def test_shard_paths_globs_lists_and_folders(tmp_path):
    paths = caption_shards(tmp_path, gz=False)
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(str(tmp_path / "train-*.tar")) == paths
    assert expand_shards(f"{paths[2]}::{paths[0]}") == [paths[2], paths[0]]
    assert braceexpand("a-{00..02}-{x,y}.tar") == ["a-00-x.tar", "a-00-y.tar", "a-01-x.tar", "a-01-y.tar",
                                                    "a-02-x.tar", "a-02-y.tar"]
    assert braceexpand("s{8..10}") == ["s8", "s9", "s10"]
    assert split_member_name("dir/abc.seg.PNG") == ("dir/abc", "seg.png")
    with pytest.raises(ConfigError, match="does not exist"):
        expand_shards(str(tmp_path / "train-{0000..0005}.tar"))


def test_gzipped_shards_are_indexed_once_then_served_from_the_cache(tmp_path, monkeypatch):
    caption_shards(tmp_path / "shards", gz=True, n_shards=2)
    spec = DataSpec(str(tmp_path / "shards"))
    first = open_train_data(spec, preprocess=to_tensor, tokenizer=CharTokenizer(), cache_dir=tmp_path / "cache")
    packs = sorted((tmp_path / "cache" / "training-shards").glob("*.pack"))
    assert len(packs) == 2

    def must_not_rebuild(*args):
        raise AssertionError("a cached shard was indexed again")

    monkeypatch.setattr("clipsearch.training.data_shards._build_index", must_not_rebuild)
    again = open_train_data(spec, preprocess=to_tensor, tokenizer=CharTokenizer(), cache_dir=tmp_path / "cache")
    assert [b[1].tolist() for b in again.loader(4, epoch=1, seed=3)] == \
           [b[1].tolist() for b in first.loader(4, epoch=1, seed=3)]


def test_cls_shards_with_class_list_use_templates(tmp_path):
    classes = ["airplane", "frog"]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    samples = [{"__key__": f"{k:06d}", "jpg": image_bytes(colour_of(k), "JPEG"), "cls": str(k % 2).encode(),
                "txt": classes[k % 2].encode()} for k in range(6)]
    write_shard(tmp_path / "train-0000.tar.gz", [*samples, {"__key__": "orphan", "txt": b"no image"}], gz=True)
    data = open_train_data(DataSpec(str(tmp_path / "train-0000.tar.gz"), templates=("a photo of a {}.",)),
                           preprocess=to_tensor, tokenizer=CharTokenizer(), cache_dir=tmp_path / "cache")
    assert data.class_mode and data.class_names == classes and data.num_samples == 6
    assert data.incomplete == [("train-0000.tar.gz:orphan", "no image member")]
    captions = decode(all_batches(data, 6, epoch=0, seed=0)[0][1])
    assert sorted(captions) == ["a photo of a airplane."] * 3 + ["a photo of a frog."] * 3
    # .txt members that hold real captions win over the class templates
    real = [{**s, "txt": f"caption number {n}".encode()} for n, s in enumerate(samples)]
    write_shard(tmp_path / "train-0000.tar.gz", real, gz=True)
    data = open_train_data(DataSpec(str(tmp_path / "train-0000.tar.gz")), preprocess=to_tensor,
                           tokenizer=CharTokenizer(), cache_dir=tmp_path / "cache")
    assert not data.class_mode and data.class_names == classes
    assert sorted(decode(all_batches(data, 6, epoch=0, seed=0)[0][1])) == [f"caption number {n}" for n in range(6)]


def test_damaged_gzip_shard_keeps_the_samples_before_the_damage(tmp_path, caplog):
    samples = [{"__key__": f"{k:03d}", "png": image_bytes(colour_of(k)), "txt": b"x" * 3000} for k in range(20)]
    good = write_shard(tmp_path / "whole.tar.gz", samples, gz=True).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    data = open_train_data(DataSpec(str(tmp_path / "cut.tar.gz")), preprocess=to_tensor, tokenizer=CharTokenizer(),
                           cache_dir=tmp_path / "cache")
    assert 0 < data.num_samples < 20 and "damaged" in caplog.text
    assert sorted(samples_in(all_batches(data, data.num_samples, epoch=0, seed=0))) == list(range(data.num_samples))


# ---- order, resume, ranks, workers, failures ------------------------------------------------------------------------

def test_order_is_a_deterministic_permutation_per_seed_and_epoch(caption_csv):
    data = open_data(caption_csv)
    assert data.batches_per_epoch(6) == 3  # drop_last: 18 of 20
    run = samples_in(all_batches(data, 6, epoch=2, seed=7))
    assert len(run) == 18 and len(set(run)) == 18
    assert run == samples_in(all_batches(open_data(caption_csv), 6, epoch=2, seed=7))
    assert run != samples_in(all_batches(data, 6, epoch=3, seed=7))
    assert run != samples_in(all_batches(data, 6, epoch=2, seed=8))


def test_resume_from_start_batch_matches_and_decodes_nothing_skipped(caption_csv, monkeypatch):
    data = open_data(caption_csv)
    full = all_batches(data, 4, epoch=1, seed=0)
    calls = []
    real_load = data_module._Core.load
    monkeypatch.setattr(data_module._Core, "load", lambda self, s, *a: calls.append(s) or real_load(self, s, *a))
    resumed = all_batches(data, 4, epoch=1, seed=0, start_batch=3)
    assert len(calls) == 8  # only batches 3 and 4 were decoded
    assert len(resumed) == 2
    for (a_img, a_tok), (b_img, b_tok) in zip(full[3:], resumed):
        assert torch.equal(a_img, b_img) and torch.equal(a_tok, b_tok)
    assert all_batches(data, 4, epoch=1, seed=0, start_batch=5) == []


def test_two_ranks_see_exactly_the_single_process_global_batch(tmp_path):
    # a random crop makes the check cover augmentation too: it must be seeded per sample, not per process
    import open_clip

    for i in range(16):
        noise = np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
        path = tmp_path / "c" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(noise).save(path)
        path.with_suffix(".txt").write_text(f"noise {i}\n")
    preprocess = open_clip.image_transform(8, is_train=True, aug_cfg={"scale": (0.3, 1.0)})
    data = open_train_data(DataSpec(str(tmp_path)), preprocess=preprocess, tokenizer=CharTokenizer())
    state, python_state = torch.get_rng_state(), random.getstate()
    single = all_batches(data, 8, epoch=0, seed=5)
    assert torch.equal(state, torch.get_rng_state()) and random.getstate() == python_state  # the trainer's RNG is left alone
    workers = all_batches(data, 8, epoch=0, seed=5, workers=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, workers))
    data.close()
    ranks = [all_batches(data, 8, epoch=0, seed=5, rank=r, world_size=2) for r in range(2)]
    for b, (images, tokens) in enumerate(single):
        assert torch.equal(images, torch.cat([ranks[0][b][0], ranks[1][b][0]]))
        assert torch.equal(tokens, torch.cat([ranks[0][b][1], ranks[1][b][1]]))
    assert not torch.equal(single[0][0], all_batches(data, 8, epoch=1, seed=5)[0][0])
    with pytest.raises(ConfigError, match="multiple"):
        data.loader(8, epoch=0, seed=0, world_size=3)
    with pytest.raises(ConfigError, match="exceeds"):
        data.loader(32, epoch=0, seed=0)


@pytest.fixture
def broken_csv(tmp_path) -> Path:
    """12 rows: sample 3 a truncated JPEG, 6 a missing file, 9 an empty caption."""
    rows = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        if i == 3:
            jpeg = image_bytes(colour_of(i), "JPEG")
            path = tmp_path / "3.jpg"
            path.write_bytes(jpeg[: len(jpeg) * 2 // 3])
        elif i != 6:
            png(path, colour_of(i))
        rows.append((path.name, "" if i == 9 else f"c{i}"))
    return write_caption_table(tmp_path / "broken.csv", rows)


def test_failed_samples_are_replaced_by_the_next_in_order_and_counted(broken_csv):
    data = open_data(broken_csv)
    order = data._core.order(0, 0)
    batches = all_batches(data, 4, epoch=0, seed=0)
    got = samples_in(batches)
    assert len(got) == 12 and not {3, 6, 9} & set(got)
    expected = []
    for position in range(12):  # the next loadable sample in the epoch order stands in for a failed one
        step = 0
        while int(order[(position + step) % 12]) in (3, 6, 9):
            step += 1
        expected.append(int(order[(position + step) % 12]))
    assert got == expected
    assert data.failures == 3
    reasons = dict(data.failure_examples)
    assert reasons["6.png"] == "missing file" and reasons["9.png"] == "empty caption"
    assert reasons["3.jpg"].startswith("truncated or corrupt image data")


def test_workers_give_the_same_batches_and_report_failures(broken_csv):
    data = open_data(broken_csv)
    expected = [all_batches(data, 4, epoch=e, seed=2) for e in range(2)]
    with_workers = open_data(broken_csv)
    try:
        for epoch in range(2):  # the persistent workers serve both epochs
            got = all_batches(with_workers, 4, epoch=epoch, seed=2, workers=2)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected[epoch], got))
        resumed = all_batches(with_workers, 4, epoch=1, seed=2, workers=2, start_batch=2)
        assert torch.equal(resumed[0][0], expected[1][2][0])
        bad_in_resumed_rows = len({3, 6, 9} & set(with_workers._core.order(1, 2)[8:12].tolist()))
        assert with_workers.failures == 3 + 3 + bad_in_resumed_rows
        assert len(with_workers._loaders) == 1
    finally:
        with_workers.close()


# ---- splits and evaluation sets -------------------------------------------------------------------------------------

def test_split_is_disjoint_deterministic_and_class_balanced(tmp_path):
    for n, name in enumerate(["red", "green", "blue"]):
        for i in range(10):
            png(tmp_path / name / f"{i}.png", (230, 20, 20) if name == "red" else (20, 200, 40) if name == "green"
                else (20, 40, 230))
    data = open_data(tmp_path)
    train, held = data.split(0.3, seed=1)
    assert train.num_samples == 21 and held.num_samples == 9
    assert not set(train.indices) & set(held.indices)
    assert sorted([*train.indices, *held.indices]) == list(range(30))
    assert np.bincount(data.source.labels[held.indices]).tolist() == [3, 3, 3]
    assert held.indices.tolist() == data.split(0.3, seed=1)[1].indices.tolist()
    assert held.indices.tolist() != data.split(0.3, seed=2)[1].indices.tolist()
    assert data.split(5, seed=0)[1].num_samples == 5
    with pytest.raises(ConfigError):
        data.split(30, seed=0)


def test_eval_sets_feed_clipsearch_eval(tmp_path, fake_encoder):
    colours = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230)}
    for name, colour in colours.items():
        for i in range(4):
            png(tmp_path / "data" / name / f"{i}.png", colour)
    _, held = open_data(tmp_path / "data").split(6, seed=0)
    sets = eval_sets_from(held, tmp_path / "eval")
    assert sets.captions_csv is None and sets.n_images == 6
    labelled = read_labels(sets.labels_csv, sets.classes_file)
    assert labelled.classnames == ["blue", "green", "red"] and len(labelled.paths) == 6
    result = evaluate_zeroshot(fake_encoder, sets.images_dir, sets.labels_csv, classes_file=sets.classes_file,
                               templates=sets.templates)
    assert result["n_evaluated"] == 6 and result["metrics"]["top1"] == 1.0


def test_eval_sets_from_shards_write_images_and_captions(tmp_path):
    caption_shards(tmp_path / "shards", gz=True, n_shards=2)
    data = open_train_data(DataSpec(str(tmp_path / "shards")), preprocess=to_tensor, tokenizer=CharTokenizer(),
                           cache_dir=tmp_path / "cache")
    _, held = data.split(3, seed=0)
    sets = eval_sets_from(held, tmp_path / "eval")
    captioned = read_captions(sets.captions_csv)
    assert sets.labels_csv is None and len(captioned.paths) == 3
    for path, caption in zip(captioned.paths, captioned.captions):
        pixels = np.asarray(Image.open(sets.images_dir / path))[0, 0]
        assert caption == f"shard caption {pixels[0]}"


# ---- helpers and errors ---------------------------------------------------------------------------------------------

def test_decode_size_keeps_the_pixels_the_transform_uses():
    import open_clip

    assert decode_size(open_clip.image_transform(224, is_train=False)) == 224
    train = decode_size(open_clip.image_transform(224, is_train=True))  # scale 0.9..1, ratio 3/4..4/3
    assert 224 < train <= 224 / (0.9 * 0.75) ** 0.5 + 1
    assert decode_size(to_tensor) is None


def test_bad_specs_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        open_data(tmp_path / "nothing.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="caption column"):
        open_data(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="recognises"):
        open_data(tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown data kind"):
        open_data(tmp_path / "x.csv", kind="parquet")


# ---- the real datasets beside the checkout ---------------------------------------------------------------------------

def test_real_cifar10_shards_and_flickr8k(shared_datasets, tmp_path):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    preprocess = open_clip.image_transform(32, is_train=True)
    cifar = shared_datasets / "cifar10"
    data = open_train_data(DataSpec(str(cifar / "train-0000.tar.gz")), preprocess=preprocess, tokenizer=tokenizer,
                           cache_dir=tmp_path)
    assert data.num_samples == 10_000 and data.class_mode
    assert data.class_names == (cifar / "classes.txt").read_text().split()
    images, tokens = next(data.loader(64, epoch=0, seed=0, rank=1, world_size=2))
    assert images.shape == (32, 3, 32, 32) and tokens.shape == (32, 77) and data.failures == 0
    flickr = open_train_data(DataSpec(str(shared_datasets / "flickr8k_train" / "captions.csv")),
                             preprocess=open_clip.image_transform(64, is_train=True), tokenizer=tokenizer)
    assert flickr.num_samples == 753
    assert all(len(flickr.source.caption_lists[i]) == 5 for i in range(flickr.num_samples))
    images, tokens = next(flickr.loader(8, epoch=0, seed=0))
    assert images.shape == (8, 3, 64, 64) and flickr.failures == 0
