"""Zero-shot core: prompt ensembling, metrics, dataset readers, evaluation, and `clipsearch eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from clipsearch.cli import main
from clipsearch.errors import ConfigError
from clipsearch.search import zeroshot
from clipsearch.search.evaluation import (
    balanced_subset,
    evaluate_retrieval,
    evaluate_zeroshot,
    read_captions,
    read_classes,
    read_labels,
)
from tests.fakes import make_image

# Templates of our own for the fake encoder's tests; the CLIP paper's defaults are checked separately below.
COLOUR_TEMPLATES = ["a photo of a {} thing", "a {} object", "{}"]
COLOURS = ("red", "green", "blue", "yellow", "black", "white")


def _unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# ---- prompt ensembling ---------------------------------------------------------------------------------------


def test_class_embeddings_equal_a_direct_numpy_ensemble(fake_encoder):
    classes, templates = ["red", "blue", "green"], ["a photo of a {} thing", "a {} and a red thing", "{}"]
    got = zeroshot.class_embeddings(fake_encoder, classes, templates, batch_size=2)
    expected = []
    for name in classes:
        prompts = fake_encoder.encode_texts([t.format(name) for t in templates]).astype(np.float64)
        prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
        mean = prompts.mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    assert got.shape == (3, fake_encoder.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.array(expected), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_class_embeddings_average_normalised_prompts_not_raw_ones():
    class Raw:  # returns un-normalised rows: ensembling must normalise each prompt before averaging
        def encode_texts(self, texts):
            return np.array([[10.0, 0.0] if "big" in t else [0.0, 1.0] for t in texts], np.float32)

    got = zeroshot.class_embeddings(Raw(), ["x"], ["big {}", "small {}"])
    np.testing.assert_allclose(got, [[np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)


def test_default_templates_and_load_templates(tmp_path):
    assert 8 <= len(zeroshot.DEFAULT_TEMPLATES) <= 18
    assert all("{}" in t for t in zeroshot.DEFAULT_TEMPLATES) and "a photo of a {}." in zeroshot.DEFAULT_TEMPLATES
    path = tmp_path / "t.txt"
    path.write_text("# mine\na photo of a {}.\n\n  itap of a {}.  \n", encoding="utf-8")
    assert zeroshot.load_templates(path) == ["a photo of a {}.", "itap of a {}."]
    path.write_text("a photo of a {}.\na photo of a thing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"t.txt:2.*no \{\}"):
        zeroshot.load_templates(path)
    path.write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no templates"):
        zeroshot.load_templates(path)
    with pytest.raises(ConfigError, match="cannot read"):
        zeroshot.load_templates(tmp_path / "absent.txt")


# ---- logits and metrics ------------------------------------------------------------------------------------------


def test_logits_softmax_and_topk():
    images, classes = _unit([[1, 0], [1, 1]]), _unit([[1, 0], [0, 1]])
    scores = zeroshot.logits(images, classes)
    np.testing.assert_allclose(scores, [[100, 0], [100 * np.sqrt(0.5)] * 2], atol=1e-4)
    probs = zeroshot.softmax(scores)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs[1], [0.5, 0.5], atol=1e-6)
    assert zeroshot.softmax(np.array([[1000.0, 0.0]]))[0, 0] == pytest.approx(1.0)  # no overflow
    # ties go to the lower index; k above the column count is clamped
    assert zeroshot.topk_predictions(np.array([[0.3, 0.5, 0.5, 0.1]]), 3).tolist() == [[1, 2, 0]]
    assert zeroshot.topk_predictions(np.array([[0.3, 0.5]]), 10).tolist() == [[1, 0]]


def test_accuracy_at_hand_computed():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    labels = [0, 2, 1]
    assert zeroshot.accuracy_at(scores, labels, 1) == pytest.approx(1 / 3)
    # row 2's top 2 is [2, 0]: the 0.3 tie between classes 0 and 1 goes to class 0
    assert zeroshot.accuracy_at(scores, labels, 2) == pytest.approx(2 / 3)
    assert zeroshot.accuracy_at(scores, labels, 3) == 1.0
    assert zeroshot.accuracy_at(scores, labels, 5) == 1.0  # k above the class count: everything is in the top k
    assert zeroshot.accuracy_at(np.array([[0.5, 0.5]]), [0], 1) == 1.0
    assert zeroshot.accuracy_at(np.array([[0.5, 0.5]]), [1], 1) == 0.0
    assert np.isnan(zeroshot.accuracy_at(np.zeros((0, 3)), [], 1))


def test_mean_per_class_recall_hand_computed():
    predictions, labels = [0, 0, 1, 1, 2], [0, 1, 1, 1, 2]
    # class 0: 1/1, class 1: 2/3, class 2: 1/1; class 3 has no images and does not count
    assert zeroshot.mean_per_class_recall(predictions, labels, 4) == pytest.approx((1 + 2 / 3 + 1) / 3)
    # unbalanced: plain accuracy 0.8, balanced 0.5
    assert zeroshot.mean_per_class_recall([0, 0, 0, 0, 0], [0, 0, 0, 0, 1], 2) == pytest.approx(0.5)
    assert np.isnan(zeroshot.mean_per_class_recall([], [], 3))


def test_retrieval_recall_hand_computed():
    images = np.eye(3)
    texts = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.3], [0.0, 0.2, 0.7], [0.0, 0.0, 1.0]])
    owners = [0, 0, 1, 2]  # image 0 has two captions
    got = zeroshot.retrieval_recall(images, texts, owners, ks=(1, 2, 3))
    # text→image ranks of the own image: t0 1st, t1 3rd, t2 2nd, t3 1st
    assert got["text_to_image_R@1"] == pytest.approx(2 / 4)
    assert got["text_to_image_R@2"] == pytest.approx(3 / 4)
    assert got["text_to_image_R@3"] == 1.0
    # image→text: I0 top t0 (its own); I1 order t1 (image 0's), t2 (its own); I2 top t3 (its own)
    assert got["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert got["image_to_text_R@2"] == 1.0 and got["image_to_text_R@3"] == 1.0


def test_retrieval_recall_image_counts_any_of_its_captions():
    images = np.eye(2)
    texts = np.array([[0.2, 1.0], [1.0, 0.0], [0.1, 0.9]])
    owners = [0, 0, 1]
    got = zeroshot.retrieval_recall(images, texts, owners, ks=(1, 2))
    # I0's best caption is t1, its second caption: a hit at 1; I1's best is t0 (image 0's), then t2
    assert got["image_to_text_R@1"] == 0.5 and got["image_to_text_R@2"] == 1.0
    # t0's best image is I1 (wrong), t1 → I0, t2 → I1
    assert got["text_to_image_R@1"] == pytest.approx(2 / 3) and got["text_to_image_R@2"] == 1.0
    # chunking gives the same answer
    assert zeroshot.retrieval_recall(images, texts, owners, ks=(1, 2), chunk=1) == got


# ---- dataset readers -------------------------------------------------------------------------------------------


def _colour_dataset(root, per_colour=3, colours=COLOURS, broken=True, missing=True):
    rows = ["relative_path,label,extra"]
    for c in colours:
        for n in range(per_colour):
            make_image(root / "images" / c / f"{n}.png", c, noise=n + 1)
            rows.append(f"images/{c}/{n}.png,{c},x")
    if broken:
        (root / "images" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
        rows.append("images/red/broken.jpg,red,x")
    if missing:
        rows.append("images/blue/gone.png,blue,x")
    (root / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "labels.csv"


def _caption_dataset(root, colours=("red", "green", "blue", "yellow")):
    rows = ["relative_path,caption"]
    for n, c in enumerate(colours):
        make_image(root / "images" / f"{c}.png", c, noise=n + 1)
        rows += [f"images/{c}.png,a {c} square", f'images/{c}.png,"something {c}, seen from afar"']
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    rows += ["images/broken.jpg,a broken red thing", "images/gone.png,a missing blue thing"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root / "captions.csv"


def test_read_labels_and_classes(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("relative_path,label,wnid\na.jpg,tench,n1\nb.jpg,church,n2\nc.jpg,tench,n1\n", encoding="utf-8")
    data = read_labels(labels)
    assert data.classnames == ["church", "tench"] and data.labels == [1, 0, 1] and data.paths == ["a.jpg", "b.jpg", "c.jpg"]
    classes_csv = tmp_path / "classes.csv"
    classes_csv.write_text("wnid,label\nn1,tench\nn3,parachute\nn2,church\n", encoding="utf-8")
    assert read_classes(classes_csv) == ["tench", "parachute", "church"]
    assert read_labels(labels, classes_csv).labels == [0, 2, 0]
    classes_txt = tmp_path / "classes.txt"
    classes_txt.write_text("tench\nchurch\n", encoding="utf-8")
    assert read_labels(labels, classes_txt).labels == [0, 1, 0]
    classes_txt.write_text("tench\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="church"):
        read_labels(labels, classes_txt)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\na.jpg,x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="relative_path, label"):
        read_labels(bad)


def test_read_captions_groups_images(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('relative_path,caption\na.jpg,one\nb.jpg,two\na.jpg,"three, with a comma"\nb.jpg,\n', encoding="utf-8")
    data = read_captions(path)
    assert data.paths == ["a.jpg", "b.jpg"]
    assert data.captions == ["one", "two", "three, with a comma"] and data.text_to_image == [0, 1, 0]


def test_balanced_subset_takes_the_first_of_each_class_in_turn():
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert balanced_subset(labels, 3) == [0, 3, 6]
    assert balanced_subset(labels, 5) == [0, 1, 3, 4, 6]
    assert balanced_subset(labels, 100) == list(range(9))
    assert balanced_subset([0, 0, 0, 0, 1], 4) == [0, 1, 2, 4]


# ---- evaluation with the fake encoder --------------------------------------------------------------------------


def test_zeroshot_accuracy_is_perfect_on_colour_images(tmp_path, fake_encoder):
    labels = _colour_dataset(tmp_path / "data")
    result = evaluate_zeroshot(fake_encoder, tmp_path / "data", labels, templates=COLOUR_TEMPLATES,
                               batch_size=4, workers=2)
    assert result["metrics"] == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}
    assert result["n_images"] == 20 and result["n_evaluated"] == 18 and result["n_failed"] == 2
    assert {f["path"] for f in result["failures"]} == {"images/red/broken.jpg", "images/blue/gone.png"}
    assert result["n_classes"] == 6 and result["model"] == "test-colors/v1" and result["chance_top1"] == pytest.approx(1 / 6)
    assert result["images_per_second"] > 0
    json.dumps(result)  # JSON-ready

    limited = evaluate_zeroshot(fake_encoder, tmp_path / "data", labels, templates=COLOUR_TEMPLATES, limit=6)
    assert limited["n_images"] == 6 and limited["n_failed"] == 0 and limited["metrics"]["top1"] == 1.0
    defaults = evaluate_zeroshot(fake_encoder, tmp_path / "data", labels, batch_size=4, workers=2)
    assert defaults["metrics"]["top1"] == 1.0  # the default CLIP-paper templates ("a photo of a {}.") work too


def test_retrieval_is_perfect_on_colour_captions(tmp_path, fake_encoder):
    captions = _caption_dataset(tmp_path / "data")
    result = evaluate_retrieval(fake_encoder, tmp_path / "data", captions, batch_size=2, workers=2)
    assert result["n_images"] == 6 and result["n_evaluated"] == 4 and result["n_failed"] == 2
    assert result["n_captions"] == 8  # the failed images' captions are dropped
    assert all(value == 1.0 for value in result["metrics"].values()), result["metrics"]
    assert set(result["metrics"]) == {f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
    limited = evaluate_retrieval(fake_encoder, tmp_path / "data", captions, limit=2)
    assert limited["n_images"] == 2


# ---- CLI ------------------------------------------------------------------------------------------------------


@pytest.fixture
def eval_env(fake_encoder):
    return {"CLIPSEARCH_MODEL": "test-colors", "CLIPSEARCH_PRETRAINED": "v1"}


def test_cli_eval_zeroshot_end_to_end(tmp_path, eval_env):
    labels = _colour_dataset(tmp_path / "data")
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(COLOUR_TEMPLATES) + "\n", encoding="utf-8")
    out = tmp_path / "result.json"
    args = ["eval", "zeroshot", "--images", str(tmp_path / "data"), "--labels", str(labels),
            "--templates", str(templates), "--batch-size", "4", "--workers", "2"]
    result = CliRunner().invoke(main, args + ["--json-out", str(out)], env=eval_env)
    assert result.exit_code == 0, result.output
    assert "skipped images/red/broken.jpg" in result.stderr and "skipped images/blue/gone.png: missing file" in result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.startswith(("top-1", "model")))
    assert lines["top-1"].startswith("1.0000") and lines["model"].strip() == "test-colors/v1"
    assert "18 evaluated, 2 skipped" in result.stdout
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["metrics"]["top1"] == 1.0 and written["n_failed"] == 2

    result = CliRunner().invoke(main, args + ["--json", "--limit", "6"], env=eval_env)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["n_images"] == 6 and printed["metrics"]["mean_per_class_recall"] == 1.0


def test_cli_eval_retrieval_end_to_end(tmp_path, eval_env):
    captions = _caption_dataset(tmp_path / "data")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["eval", "retrieval", "--images", str(tmp_path / "data"), "--captions", str(captions),
                                       "--json-out", str(out)], env=eval_env)
    assert result.exit_code == 0, result.output
    assert "skipped images/broken.jpg" in result.stderr and "skipped images/gone.png: missing file" in result.stderr
    assert "text to image R@1" in result.stdout and "image to text R@10" in result.stdout
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["metrics"]["text_to_image_R@1"] == 1.0 and written["n_captions"] == 8

    result = CliRunner().invoke(main, ["eval", "retrieval", "--images", str(tmp_path / "data"), "--captions", str(captions),
                                       "--json"], env=eval_env)
    assert json.loads(result.stdout)["metrics"]["image_to_text_R@1"] == 1.0


def test_cli_eval_bad_inputs_are_clear_errors(tmp_path, eval_env):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.jpg,red\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", "zeroshot", "--images", str(tmp_path / "images"), "--labels", str(bad)], env=eval_env)
    assert result.exit_code == 2 and "relative_path" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["eval", "retrieval", "--images", str(tmp_path / "images"), "--captions", str(bad)], env=eval_env)
    assert result.exit_code == 2 and "caption" in result.output and "Traceback" not in result.output
    good = tmp_path / "good.csv"
    good.write_text("relative_path,label\na.jpg,red\n", encoding="utf-8")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo\n", encoding="utf-8")
    result = runner.invoke(main, ["eval", "zeroshot", "--images", str(tmp_path / "images"), "--labels", str(good),
                                  "--templates", str(templates)], env=eval_env)
    assert result.exit_code == 2 and "{}" in result.output


# ---- the shared datasets' layout ------------------------------------------------------------------------------


def test_cli_eval_zeroshot_reads_imagenette_layout(shared_datasets, tmp_path):
    root = shared_datasets / "imagenette_val_2k"
    if not (root / "labels.csv").is_file():
        pytest.skip("imagenette_val_2k is absent")
    out = tmp_path / "imagenette.json"
    result = CliRunner().invoke(main, [
        "eval", "zeroshot", "--images", str(root), "--labels", str(root / "labels.csv"),
        "--classes", str(root / "classes.csv"), "--limit", "50",
        "--model", "clipsearch-tiny", "--pretrained", "none", "--device", "cpu", "--json-out", str(out),
    ])
    assert result.exit_code == 0, result.output
    info = json.loads(out.read_text(encoding="utf-8"))
    assert info["n_classes"] == 10 and info["n_images"] == 50 and info["n_evaluated"] == 50 and info["n_failed"] == 0
    assert info["model"] == "clipsearch-tiny/random"
    assert 0.0 <= info["metrics"]["top1"] <= 1.0 and 0.0 <= info["metrics"]["top5"] <= 1.0
