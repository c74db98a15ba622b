"""janus_rs.ray on a real local Ray cluster (two worker CPUs) with the tiny checkpoint: captions and
images equal the model's own calls whatever the batches and actors, resumption, error rows."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import PIL.Image
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

import janus_rs  # noqa: E402
from janus_rs.ray import DEFAULT_QUESTION, path_seed  # noqa: E402
from janus_rs.ray.cli import main  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = str(ROOT / "tests" / "fixtures" / "hf-tiny")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=10**9, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model() -> janus_rs.Janus:
    return janus_rs.Janus.load(MODEL)


@pytest.fixture()
def photos(tmp_path) -> pathlib.Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (20, 40, 220), (30, 200, 60), (240, 240, 20)]):
        ext = ["png", "JPG", "bmp", "webp"][i]
        PIL.Image.new("RGB", (32 + 8 * i, 24), colour).save(folder / f"img{i}.{ext}")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either")
    (folder / "sub").mkdir()
    return folder


def pixels(path: pathlib.Path) -> PIL.Image.Image:
    """An image decoded as the captioner decodes it (PIL)."""
    with PIL.Image.open(path) as img:
        return img.convert("RGB")


def caption_args(photos, out, *extra) -> list[str]:
    return ["caption", "--model", MODEL, "--input", str(photos), "--output", str(out), "--max-new-tokens", "6", *extra]


def test_captions_equal_understand_and_a_bad_image_is_an_error_row(photos, tmp_path, model) -> None:
    out = tmp_path / "captions.parquet"
    assert main(caption_args(photos, out, "--actors", "2", "--batch-size", "2")) == 0
    table = pq.read_table(out).to_pylist()
    assert [r["path"] for r in table] == ["broken.png", "img0.png", "img1.JPG", "img2.bmp", "img3.webp"]
    assert not (tmp_path / "captions.parquet.parts").exists()
    broken = table[0]
    assert broken["answer"] is None and "cannot read the image" in broken["error"]
    for row in table[1:]:
        want = model.understand(pixels(photos / row["path"]), DEFAULT_QUESTION, max_new_tokens=6)
        assert row["error"] is None
        assert row["answer"] == want.text, row["path"]
    # Sampled: each row draws from its own seed, whatever the batches.
    sampled = tmp_path / "sampled.parquet"
    assert main(caption_args(photos, sampled, "--temperature", "1", "--batch-size", "3")) == 0
    for row in pq.read_table(sampled).to_pylist()[1:]:
        want = model.understand(
            pixels(photos / row["path"]), DEFAULT_QUESTION, max_new_tokens=6, temperature=1.0, seed=path_seed(row["path"])
        )
        assert row["answer"] == want.text, row["path"]


def test_a_second_run_finishes_what_an_interrupted_one_left(photos, tmp_path) -> None:
    out = tmp_path / "captions.parquet"
    # What an interrupted run leaves: one finished batch in the parts folder.
    parts = tmp_path / "captions.parquet.parts"
    parts.mkdir()
    done = [{"path": "img1.JPG", "answer": "kept from before", "error": None}]
    pq.write_table(pa.Table.from_pylist(done), parts / "part-earlier.parquet")
    assert main(caption_args(photos, out)) == 0
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 5
    assert rows["img1.JPG"]["answer"] == "kept from before", "a finished row is not redone"
    assert rows["img0.png"]["answer"] is not None
    assert not parts.exists()
    # A run over a finished output redoes nothing.
    table = pq.read_table(out).to_pylist()
    table[1]["answer"] = "also kept"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(out)), out)
    assert main(caption_args(photos, out)) == 0
    assert pq.read_table(out).to_pylist() == table


def test_generated_images_equal_generate_whatever_the_split(tmp_path, model) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a red fox"}, {"prompt": "a blue lake", "seed": 42}, {"prompt": "a green hill"}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    as_parquet = tmp_path / "images.parquet"
    as_folder = tmp_path / "images"
    base = ["generate", "--model", MODEL, "--prompts", str(prompts), "--images-per-prompt", "2", "--seed", "7"]
    assert main([*base, "--output", str(as_parquet), "--actors", "1", "--batch-size", "1"]) == 0
    assert main([*base, "--output", str(as_folder), "--actors", "2", "--batch-size", "3"]) == 0
    rows = pq.read_table(as_parquet).to_pylist()
    listed = pq.read_table(as_folder / "results.parquet").to_pylist()
    assert [(r["prompt"], r["seed"], r["index"]) for r in rows] == [
        ("a red fox", 7, 0),
        ("a red fox", 7, 1),
        ("a blue lake", 42, 0),
        ("a blue lake", 42, 1),
        ("a green hill", 9, 0),
        ("a green hill", 9, 1),
    ]
    for row, other in zip(rows, listed):
        want = model.generate(row["prompt"], count=2, seed=row["seed"])[row["index"]]
        assert row["error"] is None
        assert row["tokens"] == want.tokens.reshape(-1).tolist()
        assert other["tokens"] == row["tokens"], "the same whatever the batches and actors"
        image = PIL.Image.open(io.BytesIO(row["png"]))
        assert np.array_equal(np.asarray(image), np.asarray(want.image))
        assert other["file"] == f"{row['line']:06d}_{row['index']}.png"
        assert (as_folder / other["file"]).read_bytes() == row["png"]


def test_a_job_that_cannot_start_exits_1(photos, tmp_path, capsys) -> None:
    out = tmp_path / "x.parquet"
    assert main(caption_args(photos, out)[:2] + ["/no/such/model"] + caption_args(photos, out)[3:]) == 1
    assert main(caption_args(tmp_path / "missing", out)) == 1
    # A folder that holds no model: the actors cannot load it.
    (tmp_path / "empty").mkdir()
    assert main(caption_args(photos, out)[:2] + [str(tmp_path / "empty")] + caption_args(photos, out)[3:]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    assert main(["generate", "--model", MODEL, "--prompts", str(bad), "--output", str(out)]) == 1
    assert "error:" in capsys.readouterr().err
