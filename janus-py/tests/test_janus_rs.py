"""The Python package against the committed reference outputs (the same ones the Rust tests use),
plus image inputs, errors, GIL release, cancellation and streaming."""

from __future__ import annotations

import _thread
import json
import os
import pathlib
import threading
import time

import numpy as np
import PIL.Image
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import janus_rs

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
QUESTION = "What is shown in this image?"
CAT = "a photo of a cat"


def original_dir() -> pathlib.Path:
    """The original-layout checkpoint that scripts/setup.sh writes into the fixture cache."""
    cache = os.environ.get("JANUS_FIXTURE_CACHE") or os.path.expanduser("~/.cache/janus-rs-fixtures")
    path = pathlib.Path(cache) / "original-tiny" / "safetensors"
    assert (path / "config.json").is_file(), f"{path} is missing: run `bash scripts/setup.sh`"
    return path


def reference(path: pathlib.Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def eos_id(model_dir: pathlib.Path) -> int:
    """The end-of-sentence id, from the model's tokenizer files."""
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    eos = config["eos_token"]
    eos = eos["content"] if isinstance(eos, dict) else eos
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    return next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == eos)


def check_answer(got: list[int], want: np.ndarray, eos: int) -> None:
    """`got` is the reference's greedy continuation, cut after its first end-of-sentence."""
    want = [int(t) for t in want.reshape(-1)]
    n = want.index(eos) + 1 if eos in want else len(want)
    assert got == want[:n]


def upscaled(small: np.ndarray, size: int) -> np.ndarray:
    """The 48x48 understanding image of the official fixture, upscaled (nearest) to `size`."""
    h, w, _ = small.shape
    ys = np.arange(size) * h // size
    xs = np.arange(size) * w // size
    return np.ascontiguousarray(small[ys][:, xs])


def pixel_diff(image: PIL.Image.Image, want: np.ndarray) -> int:
    got = np.asarray(image, dtype=np.int16)
    assert got.shape == want.shape, "image size"
    return int(np.abs(got - want.astype(np.int16)).max())


_models: dict[tuple[str, str], janus_rs.Janus] = {}


def model(path: pathlib.Path, dtype: str = "f32") -> janus_rs.Janus:
    key = (str(path), dtype)
    if key not in _models:
        _models[key] = janus_rs.Janus.load(path, dtype=dtype)
    return _models[key]


@pytest.fixture(scope="module")
def hf() -> janus_rs.Janus:
    return model(FIXTURES / "hf-tiny")


@pytest.fixture(scope="module")
def hf_ref() -> dict[str, np.ndarray]:
    return reference(FIXTURES / "hf-tiny" / "expected" / "multimodal.safetensors")


# --- understanding -------------------------------------------------------------------------------


# hf-tiny-v4 holds hf-tiny-bf16-sharded's tensors in the files transformers 4.x writes
# (chat_template.json, preprocessor_config.json, ...).
@pytest.mark.parametrize(
    "name, expected",
    [("hf-tiny", "hf-tiny"), ("hf-tiny-bf16-sharded", "hf-tiny-bf16-sharded"), ("hf-tiny-v4", "hf-tiny-bf16-sharded")],
)
def test_hf_understanding_matches_transformers(name: str, expected: str) -> None:
    m = model(FIXTURES / name)
    r = reference(FIXTURES / expected / "expected" / "multimodal.safetensors")
    want = r["mm_greedy_ids"]
    answer = m.understand(PIL.Image.fromarray(r["image_u8"]), QUESTION, max_new_tokens=want.size)
    assert isinstance(answer, janus_rs.Answer)
    assert answer.prompt_tokens == r["mm_input_ids"].size
    check_answer(answer.token_ids, want, eos_id(FIXTURES / name))
    assert str(answer) == answer.text
    assert repr(answer).startswith("Answer(text=")


@pytest.mark.parametrize("name", ["hf-tiny", "hf-tiny-v4"])
def test_prompts_go_through_the_checkpoints_chat_template(name: str) -> None:
    """The prompt lengths of transformers' processor with the checkpoint's own template
    (expected/prompts.json), and the generation prompt reaches the model."""
    m = model(FIXTURES / name)
    cases = {c["name"]: c for c in json.loads((FIXTURES / name / "expected" / "prompts.json").read_text())["cases"]}
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    for case, images in (("one image", [image]), ("no image", [])):
        (turn,) = cases[case]["turns"]
        answer = m.understand(images, turn["text"], max_new_tokens=1)
        assert answer.prompt_tokens == len(cases[case]["input_ids"]), case
    cat = m.generate(CAT, temperature=0.0, seed=1)[0]
    fox = m.generate("a red fox in the snow", temperature=0.0, seed=1)[0]
    assert not np.array_equal(cat.tokens, fox.tokens), "two prompts gave the same image tokens"


def test_weights_say_how_they_are_held() -> None:
    """`auto` keeps a bf16 checkpoint in bf16 on the CPU and an f32 one in f32; `q8_0` holds
    fewer bytes and still answers with the reference's first token."""
    assert model(FIXTURES / "hf-tiny").weights == "f32"
    bf16 = model(FIXTURES / "hf-tiny-bf16-sharded")
    assert bf16.weights == "bf16" and "weights='bf16'" in repr(bf16)
    q8 = janus_rs.Janus.load(FIXTURES / "hf-tiny-bf16-sharded", weights="q8_0")
    assert q8.dtype == "f32", "quantized weights compute in f32"
    # `auto` computes an f32 checkpoint in f32 (bf16 files in bf16 where the CPU has bf16
    # instructions: the CLI tests check that).
    auto = janus_rs.Janus.load(FIXTURES / "hf-tiny")
    assert auto.dtype == "f32" and "dtype='f32'" in repr(auto)
    assert q8.weights == "q8_0"
    assert 0 < q8.weight_bytes < bf16.weight_bytes
    r = reference(FIXTURES / "hf-tiny-bf16-sharded" / "expected" / "multimodal.safetensors")
    answer = q8.understand(PIL.Image.fromarray(r["image_u8"]), QUESTION, max_new_tokens=1)
    assert answer.token_ids[0] == int(r["mm_greedy_ids"].reshape(-1)[0])


def test_original_understanding_matches_the_official_code() -> None:
    m = model(original_dir())
    r = reference(FIXTURES / "original-tiny" / "expected" / "understand.safetensors")
    want = r["greedy_ids"]
    image = upscaled(r["image_small_u8"], 384)
    # The 384-pixel vision tower takes a while: another thread runs meanwhile.
    advanced, elapsed, answer = count_while(
        lambda: m.understand(image, QUESTION, max_new_tokens=want.size)
    )
    assert answer.prompt_tokens == r["input_ids"].size
    check_answer(answer.token_ids, want, eos_id(original_dir()))
    assert advanced > 100, f"the other thread ran {advanced} times (x100) in {elapsed:.2f} s"


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_multi_turn_chat_matches_the_reference(layout: str) -> None:
    if layout == "hf":
        path, expected = FIXTURES / "hf-tiny", FIXTURES / "hf-tiny" / "expected" / "chat.safetensors"
    else:
        path, expected = original_dir(), FIXTURES / "original-tiny" / "expected" / "chat.safetensors"
    m = model(path)
    r = reference(expected)
    want = r["greedy_ids"]
    conversation = [
        {"role": "user", "content": "Describe the first image.", "images": [r["image_a_u8"]]},
        {"role": "assistant", "content": "A red disc on a gradient."},
        {
            "role": "user",
            "content": "Here is another one: <image_placeholder>\nWhat changed?",
            "images": PIL.Image.fromarray(r["image_b_u8"]),
        },
    ]
    if layout == "hf":
        stream = m.chat_stream(conversation, max_new_tokens=want.size)
        pieces = list(stream)
        answer = stream.answer
        assert answer is not None and "".join(pieces) == answer.text
    else:
        answer = m.chat(conversation, max_new_tokens=want.size)
    assert answer.prompt_tokens == r["input_ids"].size
    check_answer(answer.token_ids, want, eos_id(path))


def test_every_image_form_gives_the_same_answer(hf, hf_ref, tmp_path) -> None:
    pixels = hf_ref["image_u8"]
    want = hf.understand(pixels, QUESTION, max_new_tokens=3).token_ids
    png = tmp_path / "image.png"
    PIL.Image.fromarray(pixels).save(png)
    rgba = PIL.Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 7, np.uint8)]))
    # A strided view: every other column of an image twice as wide.
    wide = np.repeat(pixels, 2, axis=1)[:, ::2]
    assert not wide.flags["C_CONTIGUOUS"]
    for image in [PIL.Image.fromarray(pixels), rgba, str(png), png, [png], (wide,)]:
        assert hf.understand(image, QUESTION, max_new_tokens=3).token_ids == want, repr(image)
    # Placeholders: explicit tags take the images in order, like one image before the question.
    tagged = hf.understand([pixels], f"<image_placeholder>\n{QUESTION}", max_new_tokens=3)
    assert tagged.token_ids == want
    # No image at all.
    assert hf.understand(None, "Hello", max_new_tokens=2).prompt_tokens > 0
    assert hf.understand([], "Hello", max_new_tokens=2).prompt_tokens > 0


# --- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hf-tiny", "hf-tiny-bf16-sharded"])
def test_hf_greedy_generation_matches_transformers(name: str) -> None:
    m = model(FIXTURES / name)
    r = reference(FIXTURES / name / "expected" / "multimodal.safetensors")
    want = r["gen_tokens"].reshape(-1)
    for count in [1, 2]:
        images = m.generate(CAT, count=count, temperature=0.0, seed=0)
        assert len(images) == count
        for g in images:
            assert isinstance(g, janus_rs.GeneratedImage)
            assert g.tokens.dtype == np.int32 and g.tokens.ndim == 2
            assert g.tokens.size == want.size
            assert g.tokens.reshape(-1).tolist() == want.tolist()
            assert g.image.mode == "RGB"
            assert pixel_diff(g.image, r["gen_image_u8"][0]) <= 1
            assert g.seed == 0


def test_original_greedy_generation_matches_the_official_code() -> None:
    m = model(original_dir())
    r = reference(FIXTURES / "original-tiny" / "expected" / "generate.safetensors")
    want = r["tokens"].reshape(-1)
    (g,) = m.generate(CAT, temperature=0.0, seed=0)
    assert g.tokens.shape[0] * g.tokens.shape[1] == want.size
    differ = np.flatnonzero(g.tokens.reshape(-1) != want)
    assert differ.size == 0, f"{differ.size} tokens differ, the first at step {differ[:1]}"
    assert pixel_diff(g.image, r["image_u8"][0]) <= 1


def test_decode_image_matches_the_reference(hf, hf_ref) -> None:
    grid = hf.generate(CAT, temperature=0.0, seed=0)[0].tokens
    want = hf_ref["gen_tokens"].reshape(grid.shape)
    for tokens in [want, want.astype(np.uint16), want.tolist()]:
        assert pixel_diff(hf.decode_image(tokens), hf_ref["gen_image_u8"][0]) <= 1


def test_encode_image_matches_the_official_quantizer() -> None:
    m = model(original_dir())
    und = reference(FIXTURES / "original-tiny" / "expected" / "understand.safetensors")
    r = reference(FIXTURES / "original-tiny" / "expected" / "vq_preprocess.safetensors")
    got = m.encode_image(upscaled(und["image_small_u8"], 384))
    assert got.dtype == np.int32 and got.ndim == 2
    want = r["encode_tokens"].reshape(-1)
    gaps = r["encode_gaps"].reshape(-1)
    differ = np.flatnonzero(got.reshape(-1) != want)
    # Only a recorded near-tie may pick the other code.
    assert np.all(gaps[differ] < 1e-3), differ


def test_loss_matches_transformers(hf, tmp_path) -> None:
    expected = json.loads((FIXTURES / "hf-tiny" / "expected" / "losses.json").read_text())
    seen = []
    got = hf.loss(FIXTURES / "train" / "data.jsonl", progress=lambda done, total: seen.append((done, total)))
    # janus-rs quantises images as the official code does (see the fixture's `losses_l2norm`).
    assert got["losses"] == pytest.approx(expected["losses_l2norm"], rel=1e-4)
    assert got["mean"] == pytest.approx(expected["mean_l2norm"], rel=1e-4)
    assert seen == [(i, 6) for i in range(1, 7)]
    with pytest.raises(janus_rs.Cancelled):
        hf.loss(str(FIXTURES / "train" / "data.jsonl"), progress=lambda done, total: False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "text", "text": "a cat"}\n{"task": "draw"}\n')
    with pytest.raises(janus_rs.JanusError, match="line 2"):
        hf.loss(bad)


def test_train_lora_and_the_adapter_at_load(tmp_path) -> None:
    data = FIXTURES / "train" / "data.jsonl"
    model = FIXTURES / "hf-tiny"
    # PEFT's own adapter applied at load gives PEFT's losses (make_fixtures.py lora).
    lora = FIXTURES / "hf-tiny" / "lora"
    with safe_open(str(FIXTURES / "hf-tiny" / "expected" / "lora.safetensors"), "numpy") as f:
        want = f.get_tensor("line_losses").tolist()
    got = janus_rs.loss(model, data, dtype="f32", lora=lora)
    assert got["losses"] == pytest.approx(want, rel=1e-4)
    assert janus_rs.Janus.load(model, dtype="f32", lora=lora).loss(data)["losses"] == got["losses"]

    reports = []
    out = tmp_path / "adapter"
    summary = janus_rs.train(model, data, out, lora=2, lr=1e-2, steps=6, batch_size=2, cfg_drop=0.0,
                             progress=reports.append)
    assert summary["steps"] == 6 and not summary["stopped"]
    assert [r["step"] for r in reports] == list(range(1, 7))
    assert reports[-1]["samples"] == 12 and reports[-1]["steps"] == 6
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    before = janus_rs.loss(model, data, dtype="f32")["mean"]
    after = janus_rs.loss(model, data, dtype="f32", lora=out)["mean"]
    assert after < before

    # Stopped by its callback: a checkpoint that resume continues to the same log.
    cut = tmp_path / "cut"
    stopped = janus_rs.train(model, data, cut, lora=2, lr=1e-2, steps=6, batch_size=2, cfg_drop=0.0,
                             progress=lambda r: r["step"] < 3)
    assert stopped["stopped"] and stopped["steps"] == 3
    janus_rs.train(model, data, cut, lora=2, lr=1e-2, steps=6, batch_size=2, cfg_drop=0.0,
                   resume=stopped["checkpoint"])
    assert (cut / "train_log.jsonl").read_text() == (out / "train_log.jsonl").read_text()
    with pytest.raises(janus_rs.InvalidInputError):
        janus_rs.train(model, data, tmp_path / "x", steps=1, epochs=1)
    with pytest.raises(janus_rs.InvalidInputError, match="loaded from"):
        janus_rs.train(model, data, model, steps=1)


def test_round_trip_and_batches(hf) -> None:
    image = hf.decode_image(np.arange(16, dtype=np.int64).reshape(4, 4) % 100)
    tokens = hf.encode_image(image)
    assert np.array_equal(hf.encode_image(image), tokens)
    # A list of prompts: `count` images per prompt, prompt by prompt, each as its prompt alone.
    prompts = [CAT, "sky"]
    batch = hf.generate(prompts, count=2, seed=5)
    assert len(batch) == 4
    for i, prompt in enumerate(prompts):
        alone = hf.generate(prompt, count=2, seed=5)
        for a, b in zip(batch[2 * i : 2 * i + 2], alone):
            assert np.array_equal(a.tokens, b.tokens)


def test_understand_batch_equals_each_request_alone(hf) -> None:
    red = PIL.Image.new("RGB", (40, 30), (200, 30, 30))
    blue = np.full((24, 24, 3), (20, 40, 220), dtype=np.uint8)
    requests = [(red, QUESTION), (blue, "Describe it."), ([red, blue], "Compare them."), (None, "Say hello.")]
    sampled = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    for kwargs, seeds in [(dict(max_new_tokens=8), None), (sampled, [3, 4, 5, 6]), (sampled, 9)]:
        batch = hf.understand_batch(requests, seed=seeds, **kwargs)
        assert len(batch) == len(requests)
        for i, ((images, question), got) in enumerate(zip(requests, batch)):
            seed = seeds[i] if isinstance(seeds, list) else seeds
            alone = hf.understand(images, question, seed=seed, **kwargs)
            assert got.token_ids == alone.token_ids, (i, seeds)
            assert got.text == alone.text
    assert hf.understand_batch([]) == []
    with pytest.raises(janus_rs.InvalidInputError):
        hf.understand_batch(requests, temperature=1.0, seed=[1, 2])
    with pytest.raises(TypeError):
        hf.understand_batch("a question")
    with pytest.raises(TypeError):
        hf.understand_batch([(red,)])
    with pytest.raises(TypeError):
        hf.understand_batch([(red, QUESTION)], seed="1")


def test_seeds(hf) -> None:
    tokens = lambda imgs: [g.tokens.tolist() for g in imgs]  # noqa: E731
    assert tokens(hf.generate("a portrait", seed=11)) == tokens(hf.generate("a portrait", seed=11))
    assert tokens(hf.generate("a portrait", seed=11)) != tokens(hf.generate("a portrait", seed=12))
    seeds = {hf.generate("a portrait")[0].seed for _ in range(3)}
    assert len(seeds) == 3, "seed=None picks a random seed, reported on the image"
    (g,) = hf.generate("a portrait", seed=7)
    assert repr(g).startswith("GeneratedImage(") and "seed=7" in repr(g)


# --- errors --------------------------------------------------------------------------------------


def test_errors_are_typed(hf, hf_ref, tmp_path) -> None:
    with pytest.raises(janus_rs.MissingFileError) as e:
        janus_rs.Janus.load(tmp_path / "missing")
    assert isinstance(e.value, janus_rs.JanusError) and isinstance(e.value, OSError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(janus_rs.JanusError):
        janus_rs.Janus.load(tmp_path / "empty")
    with pytest.raises(janus_rs.InvalidInputError):
        janus_rs.Janus.load(FIXTURES / "hf-tiny", dtype="f64")
    with pytest.raises(janus_rs.InvalidInputError):
        janus_rs.Janus.load(FIXTURES / "hf-tiny", backend="tpu")
    with pytest.raises(janus_rs.InvalidInputError):
        janus_rs.Janus.load(FIXTURES / "hf-tiny", weights="int3")
    # Quantized weights compute in f32 only.
    with pytest.raises(janus_rs.InvalidInputError):
        janus_rs.Janus.load(FIXTURES / "hf-tiny", dtype="bf16", weights="q8_0")
    with pytest.raises(TypeError):
        janus_rs.Janus.load(42)

    img = hf_ref["image_u8"]
    # Placeholder count and image count disagree.
    with pytest.raises(janus_rs.InvalidInputError) as e:
        hf.understand(img, "<image_placeholder> and <image_placeholder>", max_new_tokens=2)
    assert isinstance(e.value, ValueError) and "placeholder" in str(e.value)
    with pytest.raises(janus_rs.InvalidInputError):
        hf.understand(None, "<image_placeholder> what?", max_new_tokens=2)
    # Bad numpy images.
    for bad in [img[:, :, 0], np.dstack([img, img[:, :, :1]]), img.astype(np.float32), img[:0]]:
        with pytest.raises(janus_rs.InvalidInputError):
            hf.understand(bad, QUESTION, max_new_tokens=2)
    with pytest.raises(TypeError):
        hf.understand(42, QUESTION)
    with pytest.raises(janus_rs.IoError) as e:
        hf.understand(tmp_path / "missing.png", QUESTION)
    assert isinstance(e.value, FileNotFoundError) and e.value.filename.endswith("missing.png")
    not_an_image = tmp_path / "x.png"
    not_an_image.write_bytes(b"hello")
    with pytest.raises(janus_rs.InvalidInputError):
        hf.understand(not_an_image, QUESTION)
    with pytest.raises(janus_rs.InvalidInputError):
        hf.understand(img, QUESTION, max_new_tokens=0)
    with pytest.raises(janus_rs.InvalidInputError):
        hf.understand(img, QUESTION, temperature=-1.0)
    with pytest.raises(janus_rs.InvalidInputError):
        hf.understand(img, QUESTION, max_new_tokens=5000)
    # Conversations.
    for bad in [[], [{"role": "assistant", "content": "hi"}], [{"role": "bot", "content": "hi"}],
                [{"content": "hi"}], [{"role": "user"}]]:
        with pytest.raises(janus_rs.InvalidInputError):
            hf.chat(bad, max_new_tokens=2)
    with pytest.raises(TypeError):
        hf.chat(["hi"])
    # Generation and token grids.
    with pytest.raises(janus_rs.InvalidInputError):
        hf.generate("   ")
    with pytest.raises(janus_rs.InvalidInputError):
        hf.generate(CAT, count=0)
    with pytest.raises(janus_rs.InvalidInputError):
        hf.generate([])
    with pytest.raises(janus_rs.InvalidInputError):
        hf.generate(CAT, cfg_weight=float("nan"))
    with pytest.raises(TypeError):
        hf.generate(3)
    for grid in [np.zeros((4, 3), np.int32), np.zeros(16, np.int32), np.full((4, 4), -1),
                 np.zeros((4, 4), np.float32), np.full((4, 4), 10**6)]:
        with pytest.raises(janus_rs.InvalidInputError):
            hf.decode_image(grid)


def test_hostile_input_gets_typed_errors_before_the_work(hf, hf_ref, tmp_path) -> None:
    img = hf_ref["image_u8"]
    # An overflowing max_new_tokens does not wrap the context check.
    with pytest.raises(janus_rs.InvalidInputError, match="exceed the context"):
        hf.understand(img, QUESTION, max_new_tokens=2**64 - 29)
    # count past max_count (64 by default), prompts x count.
    with pytest.raises(janus_rs.InvalidInputError, match="max_count"):
        hf.generate(CAT, count=100000)
    with pytest.raises(janus_rs.InvalidInputError, match="max_count"):
        hf.generate([CAT] * 9, count=8)
    # A guidance weight that overflows the guided logits: nothing is sampled from them.
    with pytest.raises(janus_rs.NumericError, match="non-finite logits at step 1") as e:
        hf.generate(CAT, cfg_weight=3.4e38)
    assert isinstance(e.value, ArithmeticError)
    # A device where an image file is expected, an empty question.
    with pytest.raises(janus_rs.InvalidInputError, match="regular file"):
        hf.understand("/dev/zero", QUESTION, max_new_tokens=2)
    for empty in ["", "  \n"]:
        with pytest.raises(janus_rs.InvalidInputError, match="empty"):
            hf.understand(img, empty, max_new_tokens=2)
    # A model path that is a file.
    with pytest.raises(janus_rs.InvalidInputError, match="is a file"):
        janus_rs.Janus.load(FIXTURES / "hf-tiny" / "config.json")
    # top_k=0 is "off", as None.
    plain = hf.understand(img, QUESTION, max_new_tokens=4, temperature=1.0, seed=5)
    off = hf.understand(img, QUESTION, max_new_tokens=4, temperature=1.0, top_k=0, seed=5)
    assert plain.token_ids == off.token_ids


def test_limits_are_load_keywords(hf_ref, tmp_path) -> None:
    with pytest.raises(janus_rs.InvalidInputError, match="max_count"):
        janus_rs.Janus.load(FIXTURES / "hf-tiny", max_count=0)
    small = janus_rs.Janus.load(
        FIXTURES / "hf-tiny", dtype="f32", max_images=1, max_image_pixels=100, max_count=2,
        max_input_mb=1,
    )
    img = hf_ref["image_u8"]
    with pytest.raises(janus_rs.InvalidInputError, match="max_images"):
        small.understand([img, img], QUESTION, max_new_tokens=2)
    with pytest.raises(janus_rs.InvalidInputError, match="max_image_pixels"):
        small.understand(img, QUESTION, max_new_tokens=2)
    with pytest.raises(janus_rs.InvalidInputError, match="max_count"):
        small.generate(CAT, count=3)
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * ((1 << 20) + 1))
    with pytest.raises(janus_rs.InvalidInputError, match="max_input_mb"):
        small.understand(big, QUESTION, max_new_tokens=2)
    tiny = PIL.Image.new("RGB", (8, 8), (10, 20, 30))
    assert len(small.understand(tiny, QUESTION, max_new_tokens=2).token_ids) >= 1


# --- threads, cancellation, streaming -----------------------------------------------------------


def count_while(call) -> tuple[int, float, object]:
    """How often another Python thread ran during the middle half of `call` (away from its
    start and end, where the interpreter may hand the other thread a time slice anyway)."""
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            if n % 100 == 0:
                stamps.append(time.perf_counter())

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.05)
    try:
        start = time.perf_counter()
        result = call()
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    elapsed = end - start
    lo, hi = start + elapsed / 4, end - elapsed / 4
    return sum(lo < t < hi for t in stamps), elapsed, result


def test_long_calls_release_the_gil(hf) -> None:
    # 32 images of 4 prompts in one call: long enough to measure.
    advanced, elapsed, images = count_while(lambda: hf.generate([CAT] * 4, count=8, seed=1))
    assert len(images) == 32
    assert elapsed > 0.2, "the call is too short to tell"
    assert advanced > 100, f"the other thread ran {advanced} times (x100) in {elapsed:.2f} s"
    # The same with a progress callback, which attaches to the interpreter at every step.
    advanced, elapsed, _ = count_while(
        lambda: hf.generate([CAT] * 4, count=8, seed=1, progress=lambda s, t: None)
    )
    assert advanced > 100, f"the other thread ran {advanced} times (x100) in {elapsed:.2f} s"


def test_calls_from_several_threads_agree(hf, hf_ref) -> None:
    want = hf.understand(hf_ref["image_u8"], QUESTION, max_new_tokens=4).token_ids
    results: list[list[int]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(hf.understand(hf_ref["image_u8"], QUESTION, max_new_tokens=4).token_ids)
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 3


def test_eight_threads_mixing_calls_get_their_serial_results(hf, hf_ref) -> None:
    img = hf_ref["image_u8"]
    calls = [
        lambda: hf.understand(img, QUESTION, max_new_tokens=4).token_ids,
        lambda: hf.understand(img, QUESTION, max_new_tokens=4, temperature=1.0, seed=3).token_ids,
        lambda: np.asarray(hf.generate(CAT, seed=1, count=2)[1].tokens).tolist(),
        lambda: np.asarray(hf.encode_image(img)).tolist(),
    ] * 2
    serial = [call() for call in calls]
    results: list[object] = [None] * len(calls)
    errors: list[BaseException] = []
    cancelled = threading.Event()

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def cancel() -> None:
        # A cancelled call among them leaves the handle usable for the others.
        with pytest.raises(janus_rs.Cancelled):
            hf.generate(CAT, seed=2, progress=lambda step, total: step < 3)
        cancelled.set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    threads.append(threading.Thread(target=cancel))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cancelled.is_set()
    assert results == serial


def test_progress_can_cancel(hf, hf_ref) -> None:
    total_steps = hf_ref["gen_tokens"].size
    seen: list[tuple[int, int]] = []

    def progress(step: int, total: int) -> bool:
        seen.append((step, total))
        return step < 3

    with pytest.raises(janus_rs.Cancelled):
        hf.generate(CAT, progress=progress)
    assert seen[-1] == (3, total_steps)

    # A callback that returns nothing goes on to the end.
    steps: list[int] = []
    assert len(hf.generate(CAT, progress=lambda s, t: steps.append(s))) == 1
    assert steps[-1] == total_steps

    # An exception raised by the callback stops the call and comes out as it is.
    def boom(step: int, total: int) -> bool:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hf.generate(CAT, progress=boom)


def test_ctrl_c_cancels(hf) -> None:
    def progress(step: int, total: int) -> None:
        if step == 2:
            _thread.interrupt_main()  # as if Ctrl-C were pressed

    with pytest.raises(janus_rs.Cancelled) as e:
        hf.generate(CAT, progress=progress)
    assert isinstance(e.value.__cause__, KeyboardInterrupt)


def test_stream_pieces_and_close(hf, hf_ref) -> None:
    img = hf_ref["image_u8"]
    answer = hf.understand(img, QUESTION, max_new_tokens=16)
    with hf.understand_stream(img, QUESTION, max_new_tokens=16) as stream:
        pieces = [p for p in stream]
    assert "".join(pieces) == answer.text
    assert stream.answer is not None and stream.answer.token_ids == answer.token_ids

    # Closing early stops the generation; the stream then ends.
    stream = hf.understand_stream(img, QUESTION, max_new_tokens=64)
    first = next(stream, None)
    stream.close()
    assert list(stream) == []
    assert stream.answer is None
    assert first is None or answer.text.startswith(first)

    # Errors surface from the iterator.
    with pytest.raises(janus_rs.InvalidInputError):
        list(hf.understand_stream(img, "<image_placeholder> <image_placeholder>"))
    # Dropping an unfinished stream is fine.
    hf.understand_stream(img, QUESTION, max_new_tokens=64)
