#!/usr/bin/env python3
"""Reference-fixture generator for janus-rs.

Everything under tests/fixtures/ (and tests/reference/original_manifest.json) is produced by this one
script, deterministically (fixed seeds, single-threaded torch, no wall-clock data in any output).

Sub-commands (run them in this order; `all` runs every step, re-executing itself with the right
PYTHONPATH for the steps that need the official DeepSeek code):

  tokenizer          train the tiny byte-level BPE, write tests/fixtures/tokenizer/ (+ tokenize.json)
                     [transformers 5.24 env]
  hf                 build the tiny JanusForConditionalGeneration (transformers layout), write the four
                     tests/fixtures/hf-tiny* folders and their expected/ outputs [transformers 5.24 env]
  original-manifest  build the official MultiModalityCausalLM from tests/fixtures/original-tiny/config.json
                     and write tests/reference/original_manifest.json [transformers 4.57.1 + official code]
  original-expected  load the weights written by gen_original.py (all three variants), check they are
                     identical, write tests/fixtures/original-tiny/expected/*.safetensors
                     [transformers 4.57.1 + official code]
  chat-hf            multi-turn, two-image understanding with the hf-tiny checkpoint: prompt, ids,
                     pixel_values, 8 greedy tokens and their logits -> hf-tiny/expected/chat.safetensors
                     [transformers 5.24 env]
  hf-v4              tests/fixtures/hf-tiny-v4/: the bf16 tensors saved by transformers 4.57.1 as its
                     conversion script saves a checkpoint (chat_template.json, preprocessor_config.json, ...)
                     [transformers 4.57.1 first on PYTHONPATH]
  hf-bf16            hf-tiny-bf16-sharded/expected/llm-bf16.safetensors: the same language-model passes as
                     expected/llm.safetensors with the model in torch.bfloat16 (PyTorch's bf16 CPU
                     path), for janus-rs's --dtype bf16 [transformers 5.24 env]
  prompts            expected/prompts.json of hf-tiny and hf-tiny-v4: prompt text and ids of understanding,
                     chat and generation cases through the processor [transformers 5.24 env]
  chat-original      the same conversation with the official code on the gen_original.py checkpoint
                     -> original-tiny/expected/chat.safetensors [transformers 4.57.1 + official code]
  check-tokenizer    re-check tokenize.json against transformers 4.57.1's AutoTokenizer and the Python
                     binding of tokenizers 0.22.x (= the Rust crate janus-core uses) [4.57.1 env]
  loss               tests/fixtures/train/ (data.jsonl: generate / understand / text lines, small PNG images) and
                     hf-tiny/expected/losses.json: the cross-entropy of each line through transformers' Janus
                     (image-token loss over the VQ codes, answer + EOS loss, next-token text loss) [5.24 env]
  grads              hf-tiny/expected/grads.safetensors: the gradients of the mean of those losses (generate lines
                     with the official l2-normalised codes, as janus-rs) for the aligners, generation embeddings and
                     head, four language-model tensors and lm_head, and those parameters after one AdamW step
                     (checked in float64 and by central differences) [5.24 env; run `loss` first]
  lora               hf-tiny/lora/ (a PEFT LoRA adapter, r 4, on the 7 projections of every language-model layer,
                     saved by PEFT's save_pretrained) and hf-tiny/expected/lora.safetensors: the line losses with the
                     adapter unmerged, the gradients of their mean for every lora_A / lora_B tensor and those tensors
                     after one AdamW step [5.24 env + peft 0.21.2; run `loss` first]
  check-adapter      (read-only, not in `all`) --adapter DIR: hf-tiny + PeftModel.from_pretrained(DIR); prints one
                     JSON line {"losses": [...], "mean": m} with the line losses of train/data.jsonl
  check-model        (read-only, not in `all`) --model DIR: a complete transformers-layout folder (same keys and
                     shapes as hf-tiny, asserted) in float32; prints the same JSON line
  loss-turns         tests/fixtures/train/turns.jsonl (multi-turn understanding lines: optional system turns, then
                     user / assistant turns, images on user turns) and hf-tiny/expected/losses_turns.json: input_ids,
                     target positions, targets and the loss over every answer + EOS of each line through
                     transformers' Janus (TURN_DEFINITIONS; the K = 1 case is asserted to be the single-turn
                     understand definition) [5.24 env; run `loss` first]
  loss-original      original-tiny/expected/losses.json: the same lines' losses through the official DeepSeek
                     code on the gen_original.py checkpoint (the official, l2-normalised VQ codes)
                     [transformers 4.57.1 + official code]
  loss-turns-original  original-tiny/expected/losses_turns.json: the lines of turns.jsonl through the official
                     DeepSeek code (its sft rendering, system turns as the system prompt) [transformers 4.57.1 +
                     official code; run `loss-original` and `loss-turns` first]
  preprocess         image decoding and preprocessing references: tests/fixtures/preprocess/ (configs,
                     encoded files, expected.safetensors) from transformers 5.24's JanusImageProcessor,
                     Pillow and torchvision, and (re-running itself as `preprocess-original` under
                     transformers 4.57.1 + official code) the official VLMImageProcessor [5.24 env]
  all                everything above, plus gen_original.py

See tests/reference/README.md for the exact environment and commands.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = REPO / "tests" / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer"
ORIGINAL_DIR = FIXTURES / "original-tiny"
MANIFEST = HERE / "original_manifest.json"

HF_F32 = FIXTURES / "hf-tiny"
HF_BF16_SHARDED = FIXTURES / "hf-tiny-bf16-sharded"
HF_BIN = FIXTURES / "hf-tiny-bin"
HF_BIN_SHARDED_BF16 = FIXTURES / "hf-tiny-bin-sharded-bf16"
HF_V4 = FIXTURES / "hf-tiny-v4"

# ------------------------------------------------------------------------------------------------
# Seeds and sizes (all fixture randomness flows from these numbers)
# ------------------------------------------------------------------------------------------------
HF_SEED = 20250141            # torch.Generator seed for the transformers-layout weights; of the seeds
                              # 20250136..43 tried (with the conversion script's template and default system
                              # prompt), the first whose top-2 margins are all >= MIN_MARGIN
ORIGINAL_SEED = 20241019      # numpy PCG64 seed for the original-layout weights (gen_original.py); of the
                              # seeds 20241018..26 whose LLM/understanding margins are all > 1e-2, the one
                              # whose greedy image generation meets its first near-tie (< 1e-2) latest (step 188)
INPUT_SEED = 7                # synthetic images / token grids
T_PREFILL = 12                # prompt length of the two LLM rows
S_STEPS = 4                   # greedy decode steps after the prefill
MIN_MARGIN = 1e-2             # required top-2 logit margin wherever an argmax is taken

# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"   # U+FF5C fullwidth bar, U+2581 lower one-eighth block
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
PATCH = "<patch_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
REF, REF_END, DET, DET_END, GROUNDING = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"

# The real DeepSeek/Janus ids are BOS 100000, EOS 100001, pad 100015, BOI 100016, image 100581, ...
# (contiguous, added after the BPE vocabulary).  Here the ids are small, scattered, in a different
# order, and of two kinds, so that a loader that hard-codes ids or only reads one of the two places
# where tokenizer.json declares a token fails:
#   * "embedded": the token is in model.vocab AND in added_tokens with the same id (Llama-2 style);
#   * "appended": the token is only in added_tokens, with an id after the BPE vocabulary
#     (DeepSeek style; the `tokenizers` library numbers these in list order).
EMBEDDED_SPECIALS = {
    2: USER,
    9: EOI,
    17: EOS,
    41: BOI,
    77: DET,
    128: REF_END,
    200: PATCH,
    263: BOS,
    301: GROUNDING,
    389: REF,
    444: DET_END,
}
APPENDED_SPECIALS = [IMAGE, ASSISTANT, PAD]
BPE_VOCAB_SIZE = 486          # 256 byte symbols + 230 merges, before the 11 embedded specials
# => total vocabulary = 486 + 11 + 3 = 500

ADDITIONAL_SPECIAL_TOKENS = [IMAGE, PATCH, REF, REF_END, DET, DET_END, GROUNDING, USER, ASSISTANT]

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

CORPUS = """
a photo of a cat. a photo of a dog. a photo of a cat sitting on a red sofa.
What is shown in this image? The image shows a cat. The image shows two dogs playing in the snow.
A portrait of a young girl. masterpiece, film grained, best quality.
A portrait of an old man with a grey beard, oil painting, soft light, highly detailed.
Describe the image in detail. Describe this picture. What color is the car? The car is blue.
A close-up photo of a bird on a branch, shallow depth of field, morning light.
A beautiful landscape with mountains, a lake and a forest at sunset.
A cute robot reading a book in a library, digital art, trending on artstation.
How many people are in the picture? There are three people standing near the window.
Is there a dog in this image? Yes, there is a small brown dog lying on the grass.
Please answer the question about the image. Answer with a single word.
The quick brown fox jumps over the lazy dog. A watercolor painting of a small village by the sea.
A photograph of a city street at night with neon lights and rain reflections.
Where is the cat? The cat is on the table next to a cup of coffee.
Generate an image of a red apple on a wooden table. A still life with flowers in a vase.
The user asks a question and the assistant answers it in a helpful and friendly way.
You are a helpful language and vision assistant. You are able to understand the visual content.
Read the text in the image. What does the sign say? The sign says stop.
A drawing of a house with a garden, children's book illustration, bright colors.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 42 64 100 384 576 1024 2048 16384.
Symbols and punctuation: (a, b) [c; d] {e: f} "quoted" 'single' - dash / slash ! ? ... #hash @at 50% $5 & *.
"""


def tokenizer_strings() -> list[str]:
    """All special strings, in a fixed order (used for the id table and for tokenize.json)."""
    return [BOS, EOS, PAD, IMAGE, PATCH, BOI, EOI, REF, REF_END, DET, DET_END, GROUNDING, USER, ASSISTANT]


def build_tokenizer_json() -> str:
    """Train the tiny byte-level BPE and return the tokenizer.json text (tokenizers' own pretty JSON)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # DeepSeek-LLM style: no normalizer, a Split in front of a ByteLevel pre-tokenizer with
    # add_prefix_space=False, ByteLevel decoder.  (The digit split isolates every number character.)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in CORPUS.strip().splitlines()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    trained = json.loads(tok.to_str())
    bpe = sorted(trained["model"]["vocab"].items(), key=lambda kv: kv[1])
    if len(bpe) != BPE_VOCAB_SIZE:
        raise SystemExit(f"BPE training produced {len(bpe)} tokens, expected {BPE_VOCAB_SIZE}")

    # Re-number: the embedded specials take their fixed ids, BPE tokens fill the rest in order.
    n_model = BPE_VOCAB_SIZE + len(EMBEDDED_SPECIALS)
    vocab: dict[str, int] = {}
    it = iter(bpe)
    for i in range(n_model):
        if i in EMBEDDED_SPECIALS:
            vocab[EMBEDDED_SPECIALS[i]] = i
        else:
            vocab[next(it)[0]] = i
    trained["model"]["vocab"] = vocab

    def added(i: int, s: str) -> dict:
        return {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    added_tokens = [added(i, s) for i, s in sorted(EMBEDDED_SPECIALS.items())]
    added_tokens += [added(n_model + k, s) for k, s in enumerate(APPENDED_SPECIALS)]
    trained["added_tokens"] = added_tokens
    trained["post_processor"] = None
    tok2 = Tokenizer.from_str(json.dumps(trained, ensure_ascii=False))
    bos_id = tok2.token_to_id(BOS)
    # Exactly what transformers' LlamaTokenizerFast.update_post_processor() builds for
    # add_bos_token=True, add_eos_token=False, and so what a tokenizer.json saved by transformers
    # from such a tokenizer carries (DeepSeek's tokenizer_config.json has add_bos_token: true).
    tok2.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    text = tok2.to_str(pretty=True)
    # Sanity: the ids we asked for are the ids the library uses after a round trip.
    tok3 = Tokenizer.from_str(text)
    for i, s in EMBEDDED_SPECIALS.items():
        assert tok3.token_to_id(s) == i, (s, tok3.token_to_id(s), i)
    for k, s in enumerate(APPENDED_SPECIALS):
        assert tok3.token_to_id(s) == n_model + k, (s, tok3.token_to_id(s))
    assert tok3.get_vocab_size(with_added_tokens=True) == n_model + len(APPENDED_SPECIALS)
    return text + "\n"


def added_token_dict(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True}


def original_tokenizer_config() -> dict:
    """tokenizer_config.json in the style of the DeepSeek/Janus hub folders."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added_token_dict(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added_token_dict(EOS),
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": added_token_dict(PAD),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
    }


def original_special_tokens_map() -> dict:
    def tok(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        # Plain strings here: transformers 5.24 cannot read AddedToken dicts inside this list
        # ("Input must be a List[Union[str, AddedToken]]"), while 4.57 reads both.
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": tok(BOS),
        "eos_token": tok(EOS),
        "pad_token": tok(PAD),
    }


def write_json(path: Path, obj, sort_keys: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8")


def write_compact_json(path: Path, obj: dict, list_key: str) -> None:
    """Like write_json, but every element of obj[list_key] on one line (readable diffs)."""
    lines = ["{"]
    keys = list(obj.keys())
    for k_i, key in enumerate(keys):
        comma = "," if k_i < len(keys) - 1 else ""
        if key == list_key:
            lines.append(f"  {json.dumps(key)}: [")
            items = obj[key]
            for i, item in enumerate(items):
                tail = "," if i < len(items) - 1 else ""
                lines.append("    " + json.dumps(item, ensure_ascii=False) + tail)
            lines.append("  ]" + comma)
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(obj[key], ensure_ascii=False)}{comma}")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def tokenize_cases() -> list[dict]:
    """Strings for tokenize.json.  `kind` is informational."""
    und = (
        SYSTEM_PROMPT + "\n\n" + f"{USER}: {IMAGE}\nWhat is shown in this image?" + "\n\n" + f"{ASSISTANT}:"
    )
    gen = f"{USER}: A portrait of a young girl. masterpiece, film grained, best quality.\n\n{ASSISTANT}:{BOI}"
    return [
        {"kind": "plain", "text": "a photo of a cat"},
        {"kind": "plain", "text": "What is shown in this image?"},
        {"kind": "plain", "text": "A portrait of young girl. masterpiece, film grained, best quality."},
        {"kind": "empty", "text": ""},
        {"kind": "whitespace", "text": "  two leading spaces,\ttab, trailing  \n\nnew paragraph\r\nCRLF "},
        {"kind": "digits", "text": "12345 and 384x384, 16384 codes, 3.14"},
        {"kind": "unicode", "text": "café naïve Ünïcödé — 猫の写真 🐱🖼️ Ωμέγα ½ ﬁ"},
        {"kind": "unicode_specials_lookalike", "text": "<｜begin of sentence｜> < image_placeholder> <|user|> <image_placeholder"},
        {"kind": "specials", "text": f"{USER}: {IMAGE}\nWhat is shown in this image?\n\n{ASSISTANT}:"},
        {"kind": "specials_adjacent", "text": "".join(tokenizer_strings())},
        {"kind": "specials_spaced", "text": " ".join(tokenizer_strings())},
        {"kind": "understanding_prompt", "text": und},
        {"kind": "generation_prompt", "text": gen},
        {"kind": "generation_prompt_janus1", "text": f"User: a photo of a cat\n\nAssistant:{BOI}"},
        {"kind": "multi_turn", "text": f"{USER}: hi\n\n{ASSISTANT}: hello!{EOS}{USER}: a portrait, please\n\n{ASSISTANT}:"},
        {"kind": "grounding", "text": f"{GROUNDING}Find {REF}the cat{REF_END}{DET}[[10, 20, 300, 400]]{DET_END}"},
        {"kind": "image_expanded", "text": f"{USER}: {BOI}{IMAGE * 4}{EOI}\nDescribe.\n\n{ASSISTANT}:"},
    ]


def tokenize_record(tokenizer, layout_note: str) -> dict:
    """Run a transformers tokenizer over tokenize_cases()."""
    cases = []
    for case in tokenize_cases():
        text = case["text"]
        with_sp = tokenizer(text, add_special_tokens=True)["input_ids"]
        without_sp = tokenizer(text, add_special_tokens=False)["input_ids"]
        cases.append(
            {
                **case,
                "ids": with_sp,
                "ids_no_special": without_sp,
                "tokens": tokenizer.convert_ids_to_tokens(with_sp),
                "decoded": tokenizer.decode(with_sp, skip_special_tokens=False),
                "decoded_skip_special": tokenizer.decode(with_sp, skip_special_tokens=True),
            }
        )
    return {"produced_by": layout_note, "cases": cases}


def special_ids_from_tokenizer_json(path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return {s: tok.token_to_id(s) for s in tokenizer_strings()}


def cmd_tokenizer(args) -> None:
    import tokenizers
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    text = build_tokenizer_json()
    (TOKENIZER_DIR / "tokenizer.json").write_text(text, encoding="utf-8")
    write_json(TOKENIZER_DIR / "tokenizer_config.json", original_tokenizer_config())
    write_json(TOKENIZER_DIR / "special_tokens_map.json", original_special_tokens_map())

    auto = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    raw = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    rec = tokenize_record(
        auto, f"transformers {transformers.__version__} AutoTokenizer ({type(auto).__name__}), "
              f"tokenizers {tokenizers.__version__}"
    )
    # The raw `tokenizers` library (what the Rust crate does with tokenizer.json) must agree.
    for case in rec["cases"]:
        raw_ids = raw.encode(case["text"], add_special_tokens=True).ids
        raw_ids_ns = raw.encode(case["text"], add_special_tokens=False).ids
        assert raw_ids == case["ids"], (case["text"], raw_ids, case["ids"])
        assert raw_ids_ns == case["ids_no_special"], (case["text"], raw_ids_ns, case["ids_no_special"])
        assert raw.decode(case["ids"], skip_special_tokens=False) == case["decoded"], case["text"]
        assert raw.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"], case["text"]
    rec["vocab_size"] = raw.get_vocab_size(with_added_tokens=True)
    rec["special_token_ids"] = special_ids_from_tokenizer_json(TOKENIZER_DIR / "tokenizer.json")
    rec["bos_is_added_by"] = "tokenizer.json post_processor (TemplateProcessing: BOS $A), add_bos_token=true"
    write_compact_json(TOKENIZER_DIR / "tokenize.json", rec, list_key="cases")
    print(f"tokenizer: vocab {rec['vocab_size']}, specials {rec['special_token_ids']}")


def check_tokenizer_folder(folder: Path) -> None:
    """AutoTokenizer (current transformers) and raw tokenizers on `folder` reproduce tokenize.json."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    rec = read_json(TOKENIZER_DIR / "tokenize.json")
    auto = AutoTokenizer.from_pretrained(str(folder))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for case in rec["cases"]:
        for add_sp, key in ((True, "ids"), (False, "ids_no_special")):
            a = auto(case["text"], add_special_tokens=add_sp)["input_ids"]
            r = raw.encode(case["text"], add_special_tokens=add_sp).ids
            if a != case[key] or r != case[key]:
                raise SystemExit(f"{folder}: tokenization mismatch for {case['text']!r}: {a} / {r} vs {case[key]}")
        if auto.decode(case["ids"], skip_special_tokens=True) != case["decoded_skip_special"]:
            raise SystemExit(f"{folder}: decode mismatch for {case['text']!r}")


# ------------------------------------------------------------------------------------------------
# Shared numerics helpers (torch)
# ------------------------------------------------------------------------------------------------
def torch_setup():
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    return torch


def top2_margins(logits):
    """Top-1 minus top-2 along the last axis (float64 numpy)."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    part = np.sort(x, axis=-1)
    return part[..., -1] - part[..., -2]


def save_expected(path: Path, tensors: dict, metadata: dict) -> None:
    """Write a safetensors file byte-for-byte reproducibly.

    safetensors.torch.save_file keeps __metadata__ in a Rust HashMap, so the header order (and the
    file hash) changes from run to run when there is more than one metadata key.  This writer emits
    the header with sorted keys and the tensors in name order.
    """
    import torch

    dtypes = {torch.float32: "F32", torch.int64: "I64", torch.uint8: "U8", torch.int32: "I32",
              torch.bfloat16: "BF16", torch.float16: "F16"}
    header: dict = {"__metadata__": {k: str(v) for k, v in sorted(metadata.items())}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
        else:
            raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    head += b" " * (-len(head) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)
    # read back with the real library
    from safetensors.torch import load_file

    back = load_file(str(path))
    for name, t in tensors.items():
        assert torch.equal(back[name], t.detach().cpu()), name


def llm_expected(lm, lm_head, input_ids, steps: int):
    """Prefill + greedy KV-cache steps + full forward for a LLaMA model (float32, eager).

    `lm(input_ids=..., use_cache=True)` must return an object with last_hidden_state and a cache
    (attribute `cache` in transformers 5, `past_key_values` in 4.x); `lm_head` maps hidden -> logits.
    """
    import torch

    with torch.no_grad():
        out = lm(input_ids=input_ids, use_cache=True)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        prefill_hidden = out.last_hidden_state
        prefill_logits = lm_head(prefill_hidden)
        next_ids = prefill_logits[:, -1].argmax(-1)
        step_ids, step_logits = [], []
        for _ in range(steps):
            step_ids.append(next_ids)
            cur = next_ids[:, None]
            kw = {"cache": cache} if hasattr(out, "cache") else {"past_key_values": cache}
            out = lm(input_ids=cur, use_cache=True, **kw)
            cache = getattr(out, "cache", None) if hasattr(out, "cache") else out.past_key_values
            logits = lm_head(out.last_hidden_state)[:, -1]
            step_logits.append(logits)
            next_ids = logits.argmax(-1)
        step_ids = torch.stack(step_ids, dim=1)
        step_logits = torch.stack(step_logits, dim=1)
        full_ids = torch.cat([input_ids, step_ids], dim=1)
        full = lm(input_ids=full_ids, use_cache=False)
        full_logits = lm_head(full.last_hidden_state)
    T = input_ids.shape[1]
    diff_prefill = (full_logits[:, :T] - prefill_logits).abs().max().item()
    diff_steps = (full_logits[:, T:] - step_logits).abs().max().item()
    assert diff_prefill < 1e-4 and diff_steps < 1e-4, (diff_prefill, diff_steps)
    # greedy positions: last prefill position and all steps but the last
    greedy_margins = torch.cat([prefill_logits[:, -1:], step_logits[:, :-1]], dim=1)
    return {
        "input_ids": input_ids.to(torch.int64),
        "prefill_logits": prefill_logits.float(),
        "prefill_hidden": prefill_hidden.float(),
        "step_ids": step_ids.to(torch.int64),
        "step_logits": step_logits.float(),
        "full_logits": full_logits.float(),
    }, {
        "max_abs_full_vs_prefill": diff_prefill,
        "max_abs_full_vs_steps": diff_steps,
        "min_margin_all": float(top2_margins(full_logits.numpy()).min()),
        "min_margin_greedy": float(top2_margins(greedy_margins.numpy()).min()),
    }


def prompt_rows(tok_encode) -> "list[list[int]]":
    """The two LLM rows: BOS first, special tokens inside, both cut to T_PREFILL tokens."""
    texts = [
        f"{USER}: What is shown in this image?\n\n{ASSISTANT}:",
        f"{USER}: a portrait of a cat{EOS}{IMAGE}{BOI}{PAD} photo",
    ]
    rows = []
    for t in texts:
        ids = tok_encode(t)
        if len(ids) < T_PREFILL:
            raise SystemExit(f"prompt {t!r} has only {len(ids)} tokens")
        rows.append(ids[:T_PREFILL])
    return rows


# ------------------------------------------------------------------------------------------------
# Layout A: transformers (model_type "janus")
# ------------------------------------------------------------------------------------------------
# The chat template of every converted deepseek-community checkpoint: the `CHAT_TEMPLATE` constant of
# transformers' convert_janus_weights_to_hf.py, copied verbatim into janus_chat_template.py (the script
# is not in the transformers wheel).
sys.path.insert(0, str(HERE))
from janus_chat_template import CHAT_TEMPLATE as HF_CHAT_TEMPLATE  # noqa: E402

# Renderings that transformers' own tests (tests/models/janus/test_processing_janus.py) expect from that
# template; checked before any fixture is written, so a wrong copy cannot produce fixtures.
HF_TEMPLATE_CHECKS = [
    ([{"role": "user", "content": [{"type": "text", "text": "What is shown in this image?"}, {"type": "image"}]}],
     "<|User|>: What is shown in this image?\n<image_placeholder>\n\n<|Assistant|>:"),
    ([{"role": "user", "content": [{"type": "text", "text": "Compare this image"}, {"type": "image"},
                                   {"type": "text", "text": "with this image"}, {"type": "image"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "The first image is an equation, the second is a pie chart."}]},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What about this third image? To which of the previous to is it more similar?"}]}],
     "<|User|>: Compare this image\n<image_placeholder>\nwith this image\n<image_placeholder>\n\n<|Assistant|>: "
     "The first image is an equation, the second is a pie chart.<｜end▁of▁sentence｜><|User|>: <image_placeholder>\n"
     "What about this third image? To which of the previous to is it more similar?\n\n<|Assistant|>:"),
]


def check_hf_template(processor) -> None:
    for messages, want in HF_TEMPLATE_CHECKS:
        got = processor.apply_chat_template(messages, add_generation_prompt=True)
        if got != want:
            raise SystemExit(f"the chat template renders {got!r}, transformers' tests expect {want!r}")


def api_parts(text: str, images: int) -> list:
    """janus-rs' rule for turning a turn's text and image count into typed content parts: without
    <image_placeholder> tags, one image part per image and then the text; with tags, the text split at each
    tag into text and image parts in order; every text part trimmed, empty ones left out."""
    def text_part(t):
        t = t.strip()
        return [{"type": "text", "text": t}] if t else []
    if IMAGE not in text:
        return [{"type": "image"}] * images + text_part(text)
    pieces = text.split(IMAGE)
    assert len(pieces) - 1 == images, (text, images)
    parts = text_part(pieces[0])
    for piece in pieces[1:]:
        parts += [{"type": "image"}] + text_part(piece)
    return parts


def api_messages(turns: list) -> list:
    """[(role, text, images)] -> transformers messages with typed parts."""
    return [{"role": role, "content": api_parts(text, n)} for role, text, n in turns]


HF_TEXT = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=2048, hidden_act="silu")
HF_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=16, image_size=64,
                 mlp_ratio=4.0, projection_dim=64, depth=2, num_image_tokens=16, layer_norm_eps=1e-6,
                 hidden_act="gelu", attention_bias=True)
HF_VQ = dict(embed_dim=8, num_embeddings=128, latent_channels=32, base_channels=32,
             channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1, projection_dim=64, num_hidden_layers=2,
             image_token_embed_dim=64, hidden_act="gelu", in_channels=3, out_channels=3)


def hf_build_config(ids: dict[str, int], vocab_size: int):
    from transformers import GenerationConfig, JanusConfig, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    text_config = LlamaConfig(
        vocab_size=vocab_size, **HF_TEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
    )
    vision_config = JanusVisionConfig(**HF_VISION)
    vq_config = JanusVQVAEConfig(**HF_VQ)
    config = JanusConfig(
        text_config=text_config, vision_config=vision_config, vq_config=vq_config,
        image_token_id=ids[IMAGE],
        # JanusConfig defaults to tie_word_embeddings=True in transformers 5.24 (the real checkpoints
        # have a separate lm_head.weight); say it explicitly.
        tie_word_embeddings=False,
    )
    gen = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
        generation_kwargs={"boi_token_id": ids[BOI]}, guidance_scale=5.0, temperature=1.0,
        max_new_tokens=S_STEPS,
    )
    return config, gen


def hf_init_rule(name: str, shape: tuple) -> tuple[float, float]:
    """(mean, std) for one transformers-layout parameter."""
    import math

    last = name.rsplit(".", 2)
    leaf = last[-1]
    module = last[-2] if len(last) > 1 else ""
    is_norm = "norm" in module  # LlamaRMSNorm, LayerNorm (layer_norm1/2, post_layernorm), GroupNorm
    if is_norm:
        return (1.0, 0.1) if leaf == "weight" else (0.0, 0.05)
    if leaf == "bias":
        return (0.0, 0.02)
    if name in ("lm_head.weight", "model.generation_head.vision_head.weight"):
        return (0.0, 0.5)
    if name.endswith("embed_tokens.weight") or name.endswith("generation_embeddings.weight") \
            or name.endswith("quantize.embedding.weight"):
        return (0.0, 1.0)
    if name.endswith("position_embedding.weight"):
        return (0.0, 0.5)
    fan_in = math.prod(shape[1:])
    return (0.0, 1.0 / math.sqrt(fan_in))


def hf_reinit(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = hf_init_rule(name, tuple(p.shape))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(noise * std + mean)


def hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(folder), model_max_length=16384,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )


def hf_processor(tokenizer):
    from transformers import JanusImageProcessor, JanusProcessor

    image_processor = JanusImageProcessor(
        size={"height": HF_VISION["image_size"], "width": HF_VISION["image_size"]},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], min_size=14,
        do_normalize=True, rescale_factor=1 / 255,
    )
    # As convert_janus_weights_to_hf.py builds it (chat template, default system prompt on), with this
    # model's image-token count.
    processor = JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=HF_CHAT_TEMPLATE,
        use_default_system_prompt=True, num_image_tokens=HF_VISION["num_image_tokens"],
    )
    check_hf_template(processor)
    return processor


def torch_save_sharded(state_dict: "OrderedDict", folder: Path, n_shards: int) -> None:
    """pytorch_model-0000k-of-0000n.bin (torch.save) + pytorch_model.bin.index.json."""
    import torch

    names = list(state_dict.keys())
    sizes = [state_dict[n].numel() * state_dict[n].element_size() for n in names]
    total = sum(sizes)
    target = total / n_shards
    shards: list[list[str]] = [[]]
    acc = 0
    for n, s in zip(names, sizes):
        if acc >= target * len(shards) and len(shards) < n_shards:
            shards.append([])
        shards[-1].append(n)
        acc += s
    assert len(shards) == n_shards, len(shards)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"pytorch_model-{k:05d}-of-{n_shards:05d}.bin"
        torch.save(OrderedDict((n, state_dict[n]) for n in shard), folder / fname)
        for n in shard:
            weight_map[n] = fname
    write_json(folder / "pytorch_model.bin.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def copy_non_weight_files(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in (".json", ".jinja") and not f.name.endswith(".index.json"):
            shutil.copyfile(f, dst / f.name)


def hf_fresh_dir(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def hf_load(folder: Path):
    import torch
    from transformers import JanusForConditionalGeneration

    model, info = JanusForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"{folder}: loading problems {bad}")
    model.eval()
    raw = state_dict_of_folder(folder)
    sd = model.state_dict()
    assert sorted(raw) == sorted(sd), set(raw) ^ set(sd)
    for k, v in raw.items():
        assert torch.equal(sd[k], v.float()), k      # exactly the stored values, upcast
    return model


def state_dict_of_folder(folder: Path) -> "dict":
    """Read the tensors of a folder directly (safetensors or torch .bin, single or sharded)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            out.update(load_file(str(f)))
        elif f.suffix == ".bin":
            out.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return out


def env_versions() -> dict:
    import numpy
    import safetensors
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0]}


def cmd_hf(args) -> None:
    torch = torch_setup()
    from transformers import JanusForConditionalGeneration

    ids = special_ids_from_tokenizer_json(TOKENIZER_DIR / "tokenizer.json")
    tokenizer = hf_tokenizer(TOKENIZER_DIR)
    vocab_size = len(tokenizer)
    assert vocab_size == read_json(TOKENIZER_DIR / "tokenize.json")["vocab_size"], vocab_size
    processor = hf_processor(tokenizer)
    config, gen = hf_build_config(ids, vocab_size)

    torch.manual_seed(HF_SEED)
    model = JanusForConditionalGeneration(config)
    hf_reinit(model, HF_SEED)
    model.generation_config = gen
    model.eval()

    # ---- write the four folders -------------------------------------------------------------
    hf_fresh_dir(HF_F32)
    model.save_pretrained(str(HF_F32))
    processor.save_pretrained(str(HF_F32))

    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    hf_fresh_dir(HF_BF16_SHARDED)
    model_bf16.save_pretrained(str(HF_BF16_SHARDED), max_shard_size="500KB")
    processor.save_pretrained(str(HF_BF16_SHARDED))

    hf_fresh_dir(HF_BIN)
    torch.save(OrderedDict(model.state_dict()), HF_BIN / "pytorch_model.bin")
    copy_non_weight_files(HF_F32, HF_BIN)

    hf_fresh_dir(HF_BIN_SHARDED_BF16)
    torch_save_sharded(OrderedDict(model_bf16.state_dict()), HF_BIN_SHARDED_BF16, n_shards=3)
    copy_non_weight_files(HF_BF16_SHARDED, HF_BIN_SHARDED_BF16)
    del model, model_bf16

    n_st = len(list(HF_BF16_SHARDED.glob("model-*.safetensors")))
    assert n_st >= 3, f"only {n_st} safetensors shards"

    # ---- same tensors in every format --------------------------------------------------------
    sd_f32 = state_dict_of_folder(HF_F32)
    sd_bin = state_dict_of_folder(HF_BIN)
    sd_bf16 = state_dict_of_folder(HF_BF16_SHARDED)
    sd_bin_bf16 = state_dict_of_folder(HF_BIN_SHARDED_BF16)
    assert sd_f32.keys() == sd_bin.keys() == sd_bf16.keys() == sd_bin_bf16.keys()
    for k in sd_f32:
        assert sd_f32[k].dtype == torch.float32 and sd_bf16[k].dtype == torch.bfloat16, k
        assert torch.equal(sd_f32[k], sd_bin[k]), k
        assert torch.equal(sd_bf16[k], sd_bin_bf16[k]), k
        assert torch.equal(sd_f32[k].to(torch.bfloat16), sd_bf16[k]), k

    # ---- tokenizer files written by transformers still tokenize like tokenize.json ------------
    for folder in (HF_F32, HF_BF16_SHARDED, HF_BIN, HF_BIN_SHARDED_BF16):
        check_tokenizer_folder(folder)

    # ---- expected outputs ---------------------------------------------------------------------
    report = {}
    for folder, bin_folder, label in ((HF_F32, HF_BIN, "f32"), (HF_BF16_SHARDED, HF_BIN_SHARDED_BF16, "bf16")):
        model = hf_load(folder)
        model_bin = hf_load(bin_folder)
        for (k, a), (k2, b) in zip(model.state_dict().items(), model_bin.state_dict().items()):
            assert k == k2 and torch.equal(a, b), k
        del model_bin
        assert model.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
        rows = prompt_rows(lambda t: tokenizer(t)["input_ids"])
        input_ids = torch.tensor(rows, dtype=torch.int64)
        tensors, stats = llm_expected(model.model.language_model, model.lm_head, input_ids, S_STEPS)
        meta = {
            "layout": "transformers JanusForConditionalGeneration (model_type janus)",
            "weights": f"{folder.name} ({'float32' if label == 'f32' else 'bfloat16 values, upcast to float32'})",
            "also_valid_for": bin_folder.name,
            "compute": "float32, CPU, eager attention, 1 thread",
            "lm": "model.model.language_model + model.lm_head",
            "step_ids": "greedy (argmax) continuation, fed one at a time through the KV cache",
            **{f"stat_{k}": v for k, v in stats.items()},
            **{f"version_{k}": v for k, v in env_versions().items()},
        }
        save_expected(folder / "expected" / "llm.safetensors", tensors, meta)
        report[label] = stats
        extras = hf_extra_expected(model, tokenizer, processor, ids, folder, label)
        report[label].update(extras)
        del model
    for label, stats in report.items():
        print(f"hf {label}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in stats.items()))
        worst = min(v for k, v in stats.items() if "margin" in k)
        if worst < MIN_MARGIN:
            raise SystemExit(f"hf {label}: a top-2 margin is {worst} < {MIN_MARGIN}; change HF_SEED")


def synthetic_image(height: int, width: int, seed: int):
    """A deterministic RGB uint8 test image [H, W, 3]: smooth gradients, a disc, a bar, a little noise."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(seed))
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (x + y) / (0.75 * max(height, width)))
    img = np.stack([r, g, b], axis=-1)
    disc = (x - 0.62 * width) ** 2 + (y - 0.4 * height) ** 2 < (0.22 * min(height, width)) ** 2
    img[disc] = [230.0, 40.0, 60.0]
    img[int(0.75 * height):int(0.85 * height), int(0.1 * width):int(0.5 * width)] = [20.0, 200.0, 90.0]
    img += rng.normal(0.0, 6.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def to_u8_original(images_f32):
    """Janus post-processing (generation_inference.py): clip((x + 1) / 2 * 255, 0, 255) -> uint8 (truncation)."""
    import numpy as np

    x = np.asarray(images_f32, dtype=np.float32)
    return np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8)


def hf_extra_expected(model, tokenizer, processor, ids, folder, label) -> dict:
    """expected/multimodal.safetensors: vision tower, aligner, understanding prompt with an image,
    CFG image-token generation (greedy) and VQ decoding, all float32 from the same weights."""
    import numpy as np
    import torch

    size = HF_VISION["image_size"]
    n_img = HF_VISION["num_image_tokens"]
    w = float(model.generation_config.guidance_scale)
    out: dict = {}
    stats: dict = {}
    image = synthetic_image(size, size, INPUT_SEED)
    out["image_u8"] = torch.from_numpy(image.copy())

    # -- understanding ---------------------------------------------------------------------------
    messages = api_messages([("user", "What is shown in this image?", 1)])
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == f"{USER}: {IMAGE}\nWhat is shown in this image?\n\n{ASSISTANT}:", repr(prompt)
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    pixel_values = inputs["pixel_values"].float()
    # a square input of exactly image_size only gets rescaled and normalised: (u8 / 255 - 0.5) / 0.5
    manual = (torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255 - 0.5) / 0.5
    stats["pixel_values_vs_formula"] = (pixel_values.double() - manual).abs().max().item()
    assert stats["pixel_values_vs_formula"] < 1e-6, stats
    mm_ids = inputs["input_ids"]
    assert int((mm_ids == ids[IMAGE]).sum()) == n_img
    with torch.no_grad():
        vis = model.model.vision_model(pixel_values)
        vision_hidden = vis.last_hidden_state
        image_embeds = model.model.aligner(vision_hidden)
        gen_out = model.generate(input_ids=mm_ids, attention_mask=inputs["attention_mask"], pixel_values=pixel_values,
                                 max_new_tokens=S_STEPS, do_sample=False, generation_mode="text")
        mm_greedy = gen_out[:, mm_ids.shape[1]:]
        full_ids = torch.cat([mm_ids, mm_greedy], dim=1)
        mm_logits = model(input_ids=full_ids, pixel_values=pixel_values).logits
    L = mm_ids.shape[1]
    assert torch.equal(mm_logits[0, L - 1:L - 1 + S_STEPS].argmax(-1), mm_greedy[0]), "text greedy mismatch"
    out.update(pixel_values=pixel_values, vision_hidden=vision_hidden, image_embeds=image_embeds,
               mm_input_ids=mm_ids.to(torch.int64), mm_greedy_ids=mm_greedy.to(torch.int64), mm_logits=mm_logits)
    stats["mm_min_margin_all"] = float(top2_margins(mm_logits.numpy()).min())
    stats["mm_min_margin_greedy"] = float(top2_margins(mm_logits[0, L - 1:L - 1 + S_STEPS].numpy()).min())

    # -- text-to-image generation (greedy, CFG) --------------------------------------------------
    gprompt = processor.apply_chat_template(api_messages([("user", "a photo of a cat", 0)]), add_generation_prompt=True)
    assert gprompt == f"{USER}: a photo of a cat\n\n{ASSISTANT}:", repr(gprompt)
    ginputs = processor(text=gprompt, generation_mode="image", return_tensors="pt")
    gen_ids = ginputs["input_ids"]
    assert gen_ids[0, 0].item() == ids[BOS] and gen_ids[0, -1].item() == ids[BOI]
    uncond = gen_ids.clone()
    keep = (uncond == ids[BOS]) | (uncond == ids[BOI])
    uncond[~keep] = ids[PAD]
    with torch.no_grad():
        tokens_hf = model.generate(input_ids=gen_ids, attention_mask=ginputs["attention_mask"],
                                   generation_mode="image", do_sample=False)
        lm = model.model.language_model
        embeds = lm.embed_tokens(torch.cat([gen_ids, uncond], dim=0))
        cache = None
        cond_l, uncond_l, cfg_l, toks = [], [], [], []
        for i in range(n_img):
            o = lm(inputs_embeds=embeds, cache=cache, use_cache=True)
            cache = o.cache
            scores = model.model.generation_head(o.last_hidden_state[:, -1])
            c, u = scores[:1], scores[1:]
            cfg = u + (c - u) * w
            tok = cfg.argmax(-1)
            cond_l.append(c[0]); uncond_l.append(u[0]); cfg_l.append(cfg[0]); toks.append(tok[0])
            embeds = model.prepare_embeddings_for_image_generation(torch.cat([tok, tok])[:, None])
        tokens = torch.stack(toks)[None]
        assert torch.equal(tokens, tokens_hf.to(tokens.dtype)), (tokens, tokens_hf)
        gen_image = model.decode_image_tokens(tokens)  # [1, H, W, 3] (transformers permutes to NHWC)
    cfg_logits = torch.stack(cfg_l)[None]
    out.update(gen_input_ids=gen_ids.to(torch.int64), gen_uncond_input_ids=uncond.to(torch.int64),
               gen_cond_logits=torch.stack(cond_l)[None], gen_uncond_logits=torch.stack(uncond_l)[None],
               gen_cfg_logits=cfg_logits, gen_tokens=tokens.to(torch.int64), gen_image=gen_image.float(),
               gen_image_u8=torch.from_numpy(to_u8_original(gen_image.numpy())))
    stats["gen_min_margin_cfg"] = float(top2_margins(cfg_logits.numpy()).min())

    # -- VQ decode of a fixed random token grid ----------------------------------------------------
    rng = np.random.Generator(np.random.PCG64(INPUT_SEED + 1))
    vq_tokens = torch.from_numpy(rng.integers(0, HF_VQ["num_embeddings"], size=(1, n_img), dtype=np.int64))
    with torch.no_grad():
        vq_decoded = model.model.vqmodel.decode(vq_tokens)  # [1, 3, H, W]
    out.update(vq_tokens=vq_tokens, vq_decoded=vq_decoded.float())
    stats["vq_decoded_std"] = float(vq_decoded.std())

    meta = {
        "weights": f"{folder.name}" + (" (bfloat16 values, upcast to float32)" if label == "bf16" else " (float32)"),
        "compute": "float32, CPU, eager attention, 1 thread",
        "prompt_understanding": prompt,
        "use_default_system_prompt": "true: the processor puts its default system prompt before the "
                                     "understanding prompt (mm_input_ids include it)",
        "prompt_generation": gprompt + BOI,
        "guidance_scale": w,
        "image_u8": "synthetic_image(64, 64, seed 7), HWC",
        "pixel_values": "JanusProcessor output (NCHW) = (u8/255 - 0.5)/0.5 for this square 64x64 input",
        "vision_hidden": "model.model.vision_model(pixel_values).last_hidden_state (after post_layernorm)",
        "image_embeds": "model.model.aligner(vision_hidden)",
        "mm_logits": "lm_head logits over mm_input_ids + mm_greedy_ids, image embeddings scattered at <image_placeholder>",
        "gen_*": "CFG rows: cond = gen_input_ids, uncond = every token but BOS/BOI replaced by pad; "
                 "cfg = u + (c - u) * guidance_scale; greedy argmax; next input = generation_aligner(generation_embeddings(tok))",
        "gen_image": "decode_image_tokens(gen_tokens), NHWC float32 in about [-1, 1]",
        "gen_image_u8": "clip((gen_image + 1) / 2 * 255, 0, 255) -> uint8 by truncation",
        "vq_decoded": "model.model.vqmodel.decode(vq_tokens), NCHW float32",
        **{f"stat_{k}": v for k, v in stats.items()},
        **{f"version_{k}": v for k, v in env_versions().items()},
    }
    save_expected(folder / "expected" / "multimodal.safetensors", out, meta)
    return stats


# ------------------------------------------------------------------------------------------------
# Layout B: original DeepSeek layout (model_type "multi_modality")
# ------------------------------------------------------------------------------------------------
ORIG_D = 64
ORIG_LANGUAGE = {
    # Like the real Janus-Pro-7B config.json, only what differs from transformers' LlamaConfig
    # defaults is written.  Absent on purpose (a loader must apply LlamaConfig defaults):
    # num_key_value_heads (-> num_attention_heads = 4, MHA), rms_norm_eps (1e-6),
    # rope_theta (10000.0), hidden_act ("silu"), tie_word_embeddings (false).
    "hidden_size": ORIG_D,
    "intermediate_size": 160,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "torch_dtype": "bfloat16",
}


def original_config(vocab_size: int) -> dict:
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                          "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                     "select_feature": "same", "select_layer": -1}},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"depth": 2, "input_dim": 1024, "n_embed": ORIG_D, "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                              "params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                               "params": {"depth": 2, "input_dim": 8, "n_embed": ORIG_D, "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                            "params": {"image_token_embed": ORIG_D, "image_token_size": 16384, "n_embed": ORIG_D}},
        "language_config": {**ORIG_LANGUAGE, "vocab_size": vocab_size},
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
    }


ORIG_PREPROCESSOR = {
    "background_color": [127, 127, 127], "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "VLMImageProcessor", "image_size": 384, "image_std": [0.5, 0.5, 0.5],
    "min_size": 14, "processor_class": "VLChatProcessor", "rescale_factor": 0.00392156862745098,
}
ORIG_PROCESSOR = {
    "add_special_token": False, "ignore_id": -100, "image_tag": IMAGE, "mask_prompt": True,
    "num_image_tokens": 576, "processor_class": "VLChatProcessor", "sft_format": "deepseek",
}
ORIGINAL_JSON_FILES = ["config.json", "preprocessor_config.json", "processor_config.json",
                       "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"]


def write_original_folder() -> None:
    """The committed, weight-less original-layout folder."""
    ORIGINAL_DIR.mkdir(parents=True, exist_ok=True)
    vocab = read_json(TOKENIZER_DIR / "tokenize.json")["vocab_size"]
    write_json(ORIGINAL_DIR / "config.json", original_config(vocab))
    write_json(ORIGINAL_DIR / "preprocessor_config.json", ORIG_PREPROCESSOR)
    write_json(ORIGINAL_DIR / "processor_config.json", ORIG_PROCESSOR)
    for name in ("special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"):
        shutil.copyfile(TOKENIZER_DIR / name, ORIGINAL_DIR / name)


def original_init_rule(name: str, shape: tuple) -> dict:
    """Init rule of one original-layout tensor (what gen_original.py executes)."""
    import math

    parts = name.split(".")
    leaf, module = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if name.endswith("quantize.codebook_used"):
        return {"mean": 0.0, "std": 0.0}          # unused buffer: constant zeros
    if "norm" in module:                           # LayerNorm / GroupNorm / RMSNorm
        return {"mean": 1.0, "std": 0.1} if leaf == "weight" else {"mean": 0.0, "std": 0.05}
    if leaf == "bias":
        return {"mean": 0.0, "std": 0.02}
    if name in ("language_model.lm_head.weight", "gen_head.vision_head.weight"):
        return {"mean": 0.0, "std": 0.5}           # clear greedy margins
    if name in ("language_model.model.embed_tokens.weight", "gen_embed.weight",
                "gen_vision_model.quantize.embedding.weight"):
        return {"mean": 0.0, "std": 1.0}
    if name.endswith("pos_embed"):
        return {"mean": 0.0, "std": 0.5}
    if name.endswith("attn_pool.latent"):
        return {"mean": 0.0, "std": 0.5}
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return {"mean": 0.0, "std": round(1.0 / math.sqrt(fan_in), 8)}


def official_model_class():
    try:
        import transformers
        from janus.models import MultiModalityCausalLM  # noqa: F401
        from janus.models.modeling_vlm import MultiModalityConfig
    except Exception as e:  # pragma: no cover
        raise SystemExit(
            "this step needs the official DeepSeek Janus code and transformers 4.57.1 on PYTHONPATH "
            f"(see tests/reference/README.md): {e!r}")
    if not transformers.__version__.startswith("4.57"):
        raise SystemExit(f"this step needs transformers 4.57.x, found {transformers.__version__}")
    return MultiModalityCausalLM, MultiModalityConfig


def cmd_original_manifest(args) -> None:
    torch_setup()
    MultiModalityCausalLM, MultiModalityConfig = official_model_class()
    write_original_folder()
    config = MultiModalityConfig(**read_json(ORIGINAL_DIR / "config.json"))
    # (the meta device does not work: timm's drop-path schedule calls .item() while building)
    model = MultiModalityCausalLM(config)
    tensors = []
    total = 0
    for name, t in model.state_dict().items():
        shape = [int(s) for s in t.shape]
        rule = original_init_rule(name, tuple(shape))
        n = 1
        for s in shape:
            n *= s
        total += n
        tensors.append({"name": name, "shape": shape, **rule})
    manifest = {
        "format": "janus-rs original-layout weight manifest v1",
        "seed": ORIGINAL_SEED,
        "storage_dtype": "bfloat16",
        "generator": ("numpy.random.Generator(numpy.random.PCG64(seed)); for each tensor in this order: "
                      "z = standard_normal(numel, dtype=float32); v = z * float32(std) + float32(mean) "
                      "(float32); stored value = round-to-nearest-even of v to bfloat16"),
        "source": "MultiModalityCausalLM(config).state_dict() of deepseek-ai/Janus (official code) with "
                  "tests/fixtures/original-tiny/config.json, transformers 4.57.1",
        "num_tensors": len(tensors),
        "total_numel": total,
    }
    old = read_json(MANIFEST) if MANIFEST.exists() else {}
    if old.get("data_sha256") and old.get("tensors") == tensors and old.get("seed") == ORIGINAL_SEED:
        # unchanged weights: keep the digest that gen_original.py --update-digest recorded
        manifest["data_sha256"] = old["data_sha256"]
    manifest["tensors"] = tensors
    write_compact_json(MANIFEST, manifest, list_key="tensors")
    print(f"manifest: {len(tensors)} tensors, {total} elements ({2 * total / 1e6:.1f} MB in bf16)")


def fixture_cache(args) -> Path:
    if getattr(args, "cache", None):
        return Path(args.cache).expanduser().resolve()
    env = os.environ.get("JANUS_FIXTURE_CACHE")
    return (Path(env) if env else Path("~/.cache/janus-rs-fixtures")).expanduser().resolve()


def load_official(folder: Path):
    """MultiModalityCausalLM.from_pretrained in float32 (bf16 checkpoint values upcast), eager attention."""
    import torch

    MultiModalityCausalLM, MultiModalityConfig = official_model_class()
    config = MultiModalityConfig.from_pretrained(str(folder))
    config.language_config._attn_implementation = "eager"
    model, info = MultiModalityCausalLM.from_pretrained(
        str(folder), config=config, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad or info.get("error_msgs"):
        raise SystemExit(f"{folder}: loading problems {info}")
    model = model.float().eval()
    lm = model.language_model
    assert lm.config._attn_implementation == "eager", lm.config._attn_implementation
    assert lm.model.rotary_emb.inv_freq.dtype == torch.float32, lm.model.rotary_emb.inv_freq.dtype
    return model


def official_commit() -> str:
    """Commit of the official code: $JANUS_OFFICIAL_COMMIT (set by `all`), else the default git mirror."""
    if os.environ.get("JANUS_OFFICIAL_COMMIT"):
        return os.environ["JANUS_OFFICIAL_COMMIT"]
    git = os.environ.get("JANUS_OFFICIAL_GIT", DEFAULT_JANUS_GIT)
    if Path(git).exists():
        r = subprocess.run(["git", f"--git-dir={git}", "rev-parse", "HEAD"], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    return "unknown"


def cmd_original_expected(args) -> None:
    torch = torch_setup()

    cache = fixture_cache(args) / "original-tiny"
    manifest = read_json(MANIFEST)
    stamp = read_json(cache / "STAMP.json")
    if stamp.get("data_sha256") != manifest.get("data_sha256"):
        raise SystemExit(f"{cache} is stale or missing: run tests/reference/gen_original.py first")

    # ---- the three variants hold identical tensors (as loaded by torch / the official code) ----
    raw_bin = torch.load(cache / "bin" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    names = [t["name"] for t in manifest["tensors"]]
    assert list(raw_bin.keys()) == names
    for t in manifest["tensors"]:
        v = raw_bin[t["name"]]
        assert v.dtype == torch.bfloat16 and list(v.shape) == t["shape"], t["name"]
    model = load_official(cache / "bin")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(ref) == sorted(names), set(ref) ^ set(names)
    for k in names:
        assert torch.equal(ref[k], raw_bin[k].float()), k
    del raw_bin
    for variant in ("bin-sharded", "safetensors"):
        other = load_official(cache / variant)
        for k, v in other.state_dict().items():
            assert torch.equal(v, ref[k]), (variant, k)
        del other
    del ref

    from janus.models import VLChatProcessor

    proc = VLChatProcessor.from_pretrained(str(cache / "bin"))
    tok = proc.tokenizer
    ids = {s: tok.vocab[s] for s in tokenizer_strings()}
    assert ids == read_json(TOKENIZER_DIR / "tokenize.json")["special_token_ids"], ids
    out_dir = ORIGINAL_DIR / "expected"
    versions = env_versions()
    common_meta = {
        "layout": "original DeepSeek MultiModalityCausalLM (model_type multi_modality), official code "
                  "deepseek-ai/Janus + transformers 4.57.1",
        "weights": "gen_original.py output (bfloat16 values), loaded with from_pretrained and upcast to float32",
        "weights_sha256": manifest["data_sha256"],
        "compute": "float32, CPU, eager attention, 1 thread; rotary inv_freq float32",
        "official_code_commit": official_commit(),
        **{f"version_{k}": v for k, v in versions.items()},
    }

    # ---- LLM: same construction as the transformers layout ----------------------------------
    rows = prompt_rows(lambda t: tok.encode(t))
    hf_rows = None
    hf_expected = HF_F32 / "expected" / "llm.safetensors"
    if hf_expected.exists():
        from safetensors.torch import load_file

        hf_rows = load_file(str(hf_expected))["input_ids"].tolist()
        assert hf_rows == rows, "transformers 4.57 and 5.24 tokenize the LLM rows differently"
    input_ids = torch.tensor(rows, dtype=torch.int64)
    lm = model.language_model
    tensors, stats = llm_expected(lm.model, lm.lm_head, input_ids, S_STEPS)
    save_expected(out_dir / "llm.safetensors", tensors, {
        **common_meta, "lm": "vl_gpt.language_model.model + vl_gpt.language_model.lm_head",
        "step_ids": "greedy (argmax) continuation, fed one at a time through the KV cache",
        **{f"stat_{k}": v for k, v in stats.items()}})
    report = {"llm": stats}

    report.update(original_understanding(model, proc, ids, out_dir, common_meta))
    report.update(original_generation(model, proc, ids, out_dir, common_meta))
    report.update(original_vq_and_preprocess(model, proc, out_dir, common_meta))
    for k, v in report.items():
        print(f"original {k}: {v}")
    # hard requirement: every argmax of the LLM fixture and the greedy understanding steps; the 576-step
    # image generation and the understanding tail logits only record their margins
    worst = min(report["llm"]["min_margin_all"], report["understand"]["min_margin_greedy"])
    if worst < MIN_MARGIN:
        raise SystemExit(f"original: a top-2 margin is {worst} < {MIN_MARGIN}")


def und_image_small():
    return synthetic_image(48, 48, INPUT_SEED + 2)


def und_image_384():
    """The understanding input: the 48x48 synthetic image repeated 8x8 (nearest) -> 384x384."""
    import numpy as np

    small = und_image_small()
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)


def original_understanding_conversation(question: str, images: list) -> list:
    """The official conversation of a question about `images` (names): one `<image_placeholder>` per
    image, each on its own line before the question (janus-rs's placement when the question has no
    tags), and an empty assistant turn. VLChatProcessor adds its system prompt (sft format deepseek)."""
    return [
        {"role": USER, "content": f"{IMAGE}\n" * len(images) + question, "images": list(images)},
        {"role": ASSISTANT, "content": ""},
    ]


def original_generation_prompt(proc, prompt: str) -> str:
    """The official generation prompt (generation_inference.py): the sft format of a user turn with the
    prompt and an empty assistant turn, no system prompt, then the image start tag."""
    conversation = [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": ""}]
    sft = proc.apply_sft_template_for_multi_turn_prompts(conversations=conversation, sft_format=proc.sft_format,
                                                         system_prompt="")
    return sft + proc.image_start_tag


def original_understanding(model, proc, ids, out_dir, common_meta) -> dict:
    import torch
    from PIL import Image

    image = und_image_384()
    conversation = original_understanding_conversation("What is shown in this image?", ["synthetic"])
    prep = proc(conversations=conversation, images=[Image.fromarray(image)], force_batchify=True)
    pixel_values = prep.pixel_values.float()                     # [1, 1, 3, 384, 384]
    formula = ((torch.from_numpy(image).permute(2, 0, 1).double() / 255 - 0.5) / 0.5)[None, None]
    assert (pixel_values.double() - formula).abs().max().item() < 1e-6
    input_ids = prep.input_ids.clone()
    mask = prep.attention_mask
    assert int((input_ids == ids[IMAGE]).sum()) == 576
    with torch.no_grad():
        feats = model.vision_model(pixel_values[:, 0])           # [1, 576, 1024]
        image_embeds = model.aligner(feats)                      # [1, 576, D]
        emb = model.prepare_inputs_embeds(input_ids=prep.input_ids.clone(), pixel_values=pixel_values,
                                          images_seq_mask=prep.images_seq_mask,
                                          images_emb_mask=prep.images_emb_mask)
        lm = model.language_model
        greedy = lm.generate(inputs_embeds=emb, attention_mask=mask, pad_token_id=proc.tokenizer.eos_token_id,
                             bos_token_id=proc.tokenizer.bos_token_id, eos_token_id=proc.tokenizer.eos_token_id,
                             max_new_tokens=S_STEPS, do_sample=False, use_cache=True)
        greedy = greedy[:, -S_STEPS:]
        emb2 = torch.cat([emb, lm.get_input_embeddings()(greedy)], dim=1)
        logits = lm(inputs_embeds=emb2).logits                   # [1, L + S, V]
    L = input_ids.shape[1]
    greedy_logits = logits[:, L - 1:L - 1 + S_STEPS]
    assert torch.equal(greedy_logits.argmax(-1), greedy), "greedy mismatch"
    tensors = {
        "image_small_u8": torch.from_numpy(und_image_small().copy()),
        "input_ids": input_ids.to(torch.int64),
        "vision_features_head": feats[:, :8].contiguous(),
        "image_embeds": image_embeds,
        "logits_tail": logits[:, L - 8:L].contiguous(),
        "greedy_ids": greedy.to(torch.int64),
        "greedy_logits": greedy_logits.contiguous(),
    }
    meta = {
        **common_meta,
        "sft_prompt": prep.sft_format[0],
        "image": "image_small_u8 (48x48) repeated 8x along H and W (nearest) = 384x384 RGB; the official "
                 "VLMImageProcessor leaves a 384x384 input unresized, so pixel_values = (u8/255 - 0.5)/0.5 "
                 "(float32 here; the official scripts cast to bfloat16)",
        "input_ids": "VLChatProcessor(conversations, images) input_ids: system prompt + SFT format, the "
                     "placeholder expanded to <begin_of_image> + 576 x <image_placeholder> + <end_of_image>",
        "vision_features_head": "vision_model(pixel_values)[:, :8] (SigLIP-L/16 output after the final norm)",
        "image_embeds": "aligner(vision_model(pixel_values)), [1, 576, 64]",
        "logits_tail": "language_model(inputs_embeds=prepare_inputs_embeds(...)).logits at the last 8 prompt positions",
        "greedy_ids": "language_model.generate(inputs_embeds, do_sample=False, max_new_tokens=4)",
        "greedy_logits": "logits at positions L-1 .. L+2 that choose greedy_ids",
    }
    margins = top2_margins(greedy_logits.numpy())
    meta["stat_min_margin_greedy"] = float(margins.min())
    save_expected(out_dir / "understand.safetensors", tensors, meta)
    return {"understand": {"seq_len": L, "min_margin_greedy": float(margins.min()),
                           "min_margin_tail": float(top2_margins(tensors["logits_tail"].numpy()).min())}}


def original_generation(model, proc, ids, out_dir, common_meta) -> dict:
    """generation_inference.py with parallel_size 1, cfg_weight 5, temperature 1, and argmax instead of
    multinomial; float32 throughout."""
    import numpy as np
    import torch

    cfg_weight = 5.0
    n_tokens, img_size, patch = 576, 384, 16
    prompt = original_generation_prompt(proc, "a photo of a cat")
    input_ids = torch.LongTensor(proc.tokenizer.encode(prompt))
    tokens = torch.zeros((2, len(input_ids)), dtype=torch.int)
    tokens[0] = input_ids
    tokens[1] = input_ids
    tokens[1, 1:-1] = proc.pad_id
    lm = model.language_model
    cond_logits, uncond_logits, margins, generated = [], [], [], []
    with torch.no_grad():
        inputs_embeds = lm.get_input_embeddings()(tokens)
        past = None
        for i in range(n_tokens):
            outputs = lm.model(inputs_embeds=inputs_embeds, use_cache=True, past_key_values=past)
            past = outputs.past_key_values
            logits = model.gen_head(outputs.last_hidden_state[:, -1, :])
            logit_cond, logit_uncond = logits[0::2, :], logits[1::2, :]
            cfg = logit_uncond + cfg_weight * (logit_cond - logit_uncond)
            next_token = cfg.argmax(-1)
            if i < 2:
                cond_logits.append(logit_cond[0]); uncond_logits.append(logit_uncond[0])
            margins.append(float(top2_margins(cfg[0].numpy())))
            generated.append(int(next_token[0]))
            next_token = torch.cat([next_token.unsqueeze(1), next_token.unsqueeze(1)], dim=1).view(-1)
            inputs_embeds = model.prepare_gen_img_embeds(next_token).unsqueeze(dim=1)
        gen_tokens = torch.tensor([generated], dtype=torch.int64)
        dec = model.gen_vision_model.decode_code(gen_tokens.to(dtype=torch.int),
                                                 shape=[1, 8, img_size // patch, img_size // patch])
    dec_nhwc = dec.float().numpy().transpose(0, 2, 3, 1)
    image_u8 = to_u8_original(dec_nhwc)
    margins = np.array([margins], dtype=np.float32)
    tensors = {
        "input_ids": tokens.to(torch.int64),
        "cond_logits": torch.stack(cond_logits)[None],
        "uncond_logits": torch.stack(uncond_logits)[None],
        "tokens": gen_tokens,
        "margins": torch.from_numpy(margins),
        "image_u8": torch.from_numpy(image_u8),
        "image_crop_top_left": dec[:, :, :32, :32].contiguous().float(),
        "image_crop_bottom_right": dec[:, :, -32:, -32:].contiguous().float(),
        "image_channel_mean_std": torch.tensor([[float(dec[0, c].double().mean()), float(dec[0, c].double().std())]
                                                for c in range(3)], dtype=torch.float32),
    }
    meta = {
        **common_meta,
        "prompt": prompt,
        "input_ids": "row 0 = tokenizer.encode(prompt) (cond), row 1 = same with positions 1..-2 set to the pad id (uncond)",
        "loop": "576 steps: gen_head(last hidden after final norm) -> cfg = u + 5 * (c - u) -> argmax -> "
                "next input = gen_aligner(gen_embed(token)) for both rows (KV cache)",
        "cond_logits/uncond_logits": "gen_head logits of the first 2 steps (cfg is derived with weight 5)",
        "margins": "top-2 margin of the CFG logits at each of the 576 steps (greedy ties are possible where small)",
        "tokens": "the 576 greedy image tokens",
        "image_u8": "gen_vision_model.decode_code(tokens, [1, 8, 24, 24]) -> NHWC -> clip((x+1)/2*255, 0, 255) -> uint8 (truncation)",
        "image_crop_*": "decoded float32 NCHW image, 32x32 corners",
        "image_channel_mean_std": "per-channel mean and std of the decoded float32 image",
        "cfg_weight": cfg_weight,
    }
    small = int((margins < MIN_MARGIN).sum())
    first_small = int(np.argmax(margins[0] < MIN_MARGIN)) if small else -1
    meta["stat_steps_with_margin_below_1e-2"] = small
    meta["stat_first_step_with_margin_below_1e-2"] = first_small
    save_expected(out_dir / "generate.safetensors", tensors, meta)
    return {"generate": {"min_margin_gen_all": float(margins.min()), "min_margin_first_step": float(margins[0, 0]),
                         "steps_below_1e-2": small, "first_step_below_1e-2": first_small,
                         "image_mean": float(dec.mean()), "image_std": float(dec.std())}}


def original_vq_and_preprocess(model, proc, out_dir, common_meta) -> dict:
    import torch
    from PIL import Image

    # -- VQ encode (official quantizer: l2-normalised latents and codebook) -------------------------
    image = und_image_384()
    x = ((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)[None]
    vq = model.gen_vision_model
    with torch.no_grad():
        _, _, info = vq.encode(x)
        tokens = info[2].view(1, -1)
        h = vq.quant_conv(vq.encoder(x))                                  # [1, 8, 24, 24]
        z = torch.nn.functional.normalize(h.permute(0, 2, 3, 1).reshape(-1, 8), p=2, dim=-1)
        e = torch.nn.functional.normalize(vq.quantize.embedding.weight, p=2, dim=-1)
        d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.T
        top2 = torch.topk(d, 2, dim=1, largest=False).values
    assert torch.equal(d.argmin(1), tokens[0])
    gaps = (top2[:, 1] - top2[:, 0])[None]

    # -- preprocessing of a non-square image (PIL bicubic resize + pad) ---------------------------
    src = synthetic_image(45, 70, INPUT_SEED + 3)
    pv = proc.image_processor([Image.fromarray(src)], return_tensors="pt").pixel_values[0]   # [3, 384, 384]
    u8 = torch.round((pv.double() * 0.5 + 0.5) * 255).clamp(0, 255).to(torch.uint8)
    back = (u8.double() / 255 - 0.5) / 0.5
    assert (back - pv.double()).abs().max().item() < 1e-6
    tensors = {
        "encode_tokens": tokens.to(torch.int64),
        "encode_gaps": gaps.float(),
        "encode_latent": h.float(),
        "pre_src_u8": torch.from_numpy(src.copy()),
        "pre_processed_u8": u8.permute(1, 2, 0).contiguous(),
    }
    meta = {
        **common_meta,
        "encode input": "the understanding image (understand.safetensors image_small_u8 repeated 8x8), (u8/255-0.5)/0.5, NCHW",
        "encode_tokens": "gen_vision_model.encode(x) indices (l2-normalised latent vs l2-normalised codebook, argmin distance)",
        "encode_gaps": "second-smallest minus smallest distance per position (a near-tie may flip)",
        "encode_latent": "quant_conv(encoder(x)) before normalisation, [1, 8, 24, 24]",
        "pre_src_u8": "a 45x70 (HxW) synthetic RGB image",
        "pre_processed_u8": "VLMImageProcessor output as uint8 HWC: resize to [int(45/70*384), 384] = [246, 384] with "
                            "torchvision/PIL bicubic antialias, pad to 384x384 with (127,127,127) centred "
                            "(top offset (384-246)//2); pixel_values = (u8/255 - 0.5)/0.5",
    }
    meta["stat_min_encode_gap"] = float(gaps.min())
    save_expected(out_dir / "vq_preprocess.safetensors", tensors, meta)
    return {"vq_preprocess": {"min_encode_gap": float(gaps.min()), "distinct_tokens": int(tokens.unique().numel())}}


# ------------------------------------------------------------------------------------------------
# Image preprocessing and decoding (tests/fixtures/preprocess/)
# ------------------------------------------------------------------------------------------------
PREPROCESS_DIR = FIXTURES / "preprocess"
PRE_SEED = 1000               # synthetic_image seeds of the preprocessing sources: PRE_SEED + case index

# (name, width, height): sources for the tiny (64 x 64) processors, covering wide / tall, up- and
# downscaling, truncation vs round-half-even of the short side (128x31: 15.5 -> 15 vs 16), the
# min_size floor (1x40, 200x13), Pillow's vertical-first pass order (40x200: the height shrinks by
# more than twice as many pixels as the width) and an image already at the model size.
PRE_TINY_CASES = [
    ("w37h23", 37, 23), ("w23h37", 23, 37), ("w100h41", 100, 41), ("w13h50", 13, 50),
    ("w50h13", 50, 13), ("w7h5", 7, 5), ("w150h70", 150, 70), ("w1h40", 1, 40),
    ("w200h13", 200, 13), ("w128h31", 128, 31), ("w40h200", 40, 200), ("w64h64", 64, 64),
    ("w65h64", 65, 64),
]
# Sources for the official processor at its real size (original-tiny/preprocessor_config.json,
# image_size 384): only the resized content (not the padding) is stored, to keep the file small.
# (w20h450 runs Pillow's vertical pass first.)
PRE_384_CASES = [
    ("w9h50", 9, 50), ("w300h41", 300, 41), ("w400h30", 400, 30), ("w20h450", 20, 450), ("w40h7", 40, 7),
]
# Short side -> size, centre crop (preprocess_for_vq): (name, width, height, size).
# (51x32 and 53x32 at 32: no resize, crop offsets round(9.5) = 10 and round(10.5) = 10.)
PRE_VQ_CASES = [
    ("w37h23", 37, 23, 64), ("w100h41", 100, 41, 64), ("w23h37", 23, 37, 64), ("w150h70", 150, 70, 64),
    ("w51h32", 51, 32, 32), ("w53h32", 53, 32, 32), ("w32h53", 32, 53, 32), ("w37h23", 37, 23, 16),
]
# The processor configurations: (name, folder, layout).  original-64 = original-tiny at image size 64;
# the *-clip folders give only the size, so every other setting is the class default (CLIP mean/std,
# background (122, 116, 104)).
PRE_CONFIGS = [
    ("original-64", PREPROCESS_DIR / "original-64", "original"),
    ("original-clip", PREPROCESS_DIR / "original-clip", "original"),
    ("hf-tiny", HF_F32, "hf"),
    ("hf-clip", PREPROCESS_DIR / "hf-clip", "hf"),
]
PRE_PIL_BACKEND_CASES = ["allvals", "w37h23", "w40h200", "w128h31"]   # JanusImageProcessorPil (hf-tiny)
PRE_NON_SQUARE_PIXEL_CASE = "w37h23"   # the case whose pixel_values (and padded image) the *-clip configs store


def pre_source(name: str):
    """The deterministic source image of a preprocessing case (HWC uint8)."""
    import numpy as np

    if name == "allvals":
        # 64 x 64: every uint8 value in every channel (the 64 x 64 processors leave it unresized)
        i = np.arange(64 * 64).reshape(64, 64)
        return np.stack([i % 256, (i * 7 + 85) % 256, (255 - i) % 256], axis=-1).astype(np.uint8)
    sizes = {n: (w, h) for n, w, h in PRE_TINY_CASES + PRE_384_CASES}
    sizes.update({n: (w, h) for n, w, h, _ in PRE_VQ_CASES})
    names = sorted(sizes)
    w, h = sizes[name]
    return synthetic_image(h, w, PRE_SEED + names.index(name))


def write_preprocess_configs() -> None:
    cfg = read_json(ORIGINAL_DIR / "preprocessor_config.json")
    cfg["image_size"] = 64
    write_json(PREPROCESS_DIR / "original-64" / "preprocessor_config.json", cfg)
    write_json(PREPROCESS_DIR / "original-clip" / "preprocessor_config.json",
               {"image_processor_type": "VLMImageProcessor", "image_size": 64})
    write_json(PREPROCESS_DIR / "hf-clip" / "processor_config.json",
               {"image_processor": {"image_processor_type": "JanusImageProcessor",
                                    "size": {"height": 64, "width": 64}},
                "processor_class": "JanusProcessor"})


def cmd_preprocess_original(args) -> None:
    """Child step (transformers 4.57.1 + official code): the official VLMImageProcessor outputs, as .npz."""
    import numpy as np
    from PIL import Image

    from janus.models.image_processing_vlm import VLMImageProcessor

    out = {}
    procs = {"original-384": VLMImageProcessor.from_pretrained(str(ORIGINAL_DIR))}
    for name, folder, layout in PRE_CONFIGS:
        if layout == "original":
            procs[name] = VLMImageProcessor.from_pretrained(str(folder))
    for name, ip in procs.items():
        bg = tuple(int(x * 255) for x in ip.image_mean)
        assert tuple(ip.background_color) == bg, (name, ip.background_color, bg)
        cases = PRE_384_CASES if name == "original-384" else PRE_TINY_CASES + [("allvals", 64, 64)]
        for case, w, h in cases:
            src = pre_source(case)
            pil = Image.fromarray(src)
            padded = np.ascontiguousarray(ip.resize(pil).transpose(1, 2, 0))          # HWC uint8
            pv = ip([pil], return_tensors="pt").pixel_values[0].numpy()
            assert padded.dtype == np.uint8 and pv.dtype == np.float32, (padded.dtype, pv.dtype)
            # pixel_values is an elementwise function of the padded image: recompute it the numpy way
            x = (padded.transpose(2, 0, 1).astype(np.float64) * ip.rescale_factor).astype(np.float32)
            if ip.do_normalize:
                x = (x - np.array(ip.image_mean, np.float32)[:, None, None]) / np.array(ip.image_std, np.float32)[:, None, None]
            assert np.array_equal(x, pv), (name, case)
            out[f"{name}.{case}.padded_u8"] = padded
            out[f"{name}.{case}.pixel_values"] = pv
    np.savez(args.out, **out)


def pre_encoded_files(src) -> "list[tuple[str, bytes]]":
    """Small encoded images (name with extension, bytes) for the decoding tests, written by Pillow."""
    import io
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    def save(im, fmt, **kw):
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    def png16(arr, color_type):
        # Pillow cannot write 16-bit RGB PNGs: a minimal encoder (one IDAT, filter 0)
        h, w = arr.shape[:2]
        raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))

    rgb = Image.fromarray(src)
    h, w = src.shape[:2]
    alpha = ((np.arange(h * w).reshape(h, w) * 37) % 256).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([src, alpha]), "RGBA")
    grey = rgb.convert("L")
    la = Image.fromarray(np.dstack([np.asarray(grey), alpha]), "LA")
    pal = rgb.quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    wide = np.asarray(src, np.uint16) * 257 + np.arange(w, dtype=np.uint16)[None, :, None]
    grey16 = (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 997 % 65536).astype(np.uint16)
    return [
        ("rgb.png", save(rgb, "PNG")),
        ("rgba.png", save(rgba, "PNG")),
        ("grey.png", save(grey, "PNG")),
        ("grey_alpha.png", save(la, "PNG")),
        ("palette.png", save(pal, "PNG")),
        ("palette_transparency.png", save(pal, "PNG", transparency=3)),
        ("grey16.png", save(Image.fromarray(grey16), "PNG")),
        ("rgb16.png", png16(wide, 2)),
        ("rgb_q90_420.jpg", save(rgb, "JPEG", quality=90, subsampling=2)),
        ("rgb_q90_444.jpg", save(rgb, "JPEG", quality=90, subsampling=0)),
        ("grey_q90.jpg", save(grey, "JPEG", quality=90)),
        ("rgb.bmp", save(rgb, "BMP")),
        ("palette.bmp", save(pal, "BMP")),
        ("rgba.bmp", save(rgba, "BMP")),
        ("rgb_lossless.webp", save(rgb, "WEBP", lossless=True)),
        ("rgba_lossless.webp", save(rgba, "WEBP", lossless=True)),
        ("rgb_q80.webp", save(rgb, "WEBP", quality=80, method=4)),
    ]


def cmd_preprocess(args) -> None:
    import io
    import tempfile

    import numpy as np
    import PIL
    import torch
    import torchvision
    import torchvision.transforms as T
    from PIL import Image
    from transformers import AutoImageProcessor

    torch_setup()
    write_preprocess_configs()
    tensors: dict = {}

    def put(name, arr):
        arr = np.ascontiguousarray(arr)
        tensors[name] = torch.from_numpy(arr.copy())

    # -- official VLMImageProcessor (child process: transformers 4.57.1 + official code) -----------
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "original.npz"
        run_step("preprocess-original", official_env(args), ["--out", str(npz)])
        orig = dict(np.load(npz))

    # -- transformers 5 JanusImageProcessor (torchvision backend, as AutoImageProcessor loads it) ----
    hf = {}
    for name, folder, layout in PRE_CONFIGS:
        if layout != "hf":
            continue
        ip = AutoImageProcessor.from_pretrained(str(folder))
        assert type(ip).__name__ == "JanusImageProcessor", type(ip)
        bg = tuple(int(x * 255) for x in ip.image_mean)
        assert tuple(ip.background_color) == bg, (name, ip.background_color, bg)
        for case, w, h in PRE_TINY_CASES + [("allvals", 64, 64)]:
            pil = Image.fromarray(pre_source(case))
            pv = ip(images=[pil], return_tensors="pt").pixel_values[0]
            padded = ip(images=[pil], do_rescale=False, do_normalize=False, return_tensors="pt").pixel_values[0]
            assert padded.dtype == torch.uint8 and pv.dtype == torch.float32, (padded.dtype, pv.dtype)
            hf[f"{name}.{case}.padded_u8"] = padded.permute(1, 2, 0).contiguous().numpy()
            hf[f"{name}.{case}.pixel_values"] = pv.numpy()

    # the PIL backend of the same class (backend="pil", or no torchvision): Pillow bicubic and numpy
    # arithmetic with transformers' rounding
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    ip = JanusImageProcessorPil.from_pretrained(str(HF_F32))
    for case in PRE_PIL_BACKEND_CASES:
        pil = Image.fromarray(pre_source(case))
        pv = ip(images=[pil], return_tensors="np").pixel_values[0]
        padded = ip(images=[pil], do_rescale=False, do_normalize=False, return_tensors="np").pixel_values[0]
        assert padded.dtype == np.uint8 and pv.dtype == np.float32, (padded.dtype, pv.dtype)
        hf[f"hf-tiny-pil.{case}.padded_u8"] = padded.transpose(1, 2, 0)
        hf[f"hf-tiny-pil.{case}.pixel_values"] = pv

    everything = {**orig, **hf}
    for name, arr in sorted(everything.items()):
        cfg, case, kind = name.split(".")
        if cfg == "original-384":
            # keep only the resized content of the padded 384 x 384 image (expand2square offsets)
            w, h = {n: (a, b) for n, a, b in PRE_384_CASES}[case]
            if kind != "padded_u8":
                continue
            size = 384
            nw, nh = (size, max(int(h / max(w, h) * size), 14)) if w >= h else (max(int(w / max(w, h) * size), 14), size)
            top, left = ((size - nh) // 2, 0) if w > h else (0, (size - nw) // 2)
            content = arr[top:top + nh, left:left + nw]
            outside = arr.copy()
            outside[top:top + nh, left:left + nw] = 127
            assert (outside == 127).all(), case            # the padding is the background colour
            put(f"{cfg}.{case}.content_u8", content)
            put(f"{cfg}.{case}.content_top_left", np.array([top, left], np.int64))
            continue
        if kind == "pixel_values" and case != "allvals" and not (
                cfg.endswith("-clip") and case == PRE_NON_SQUARE_PIXEL_CASE):
            continue
        if kind == "padded_u8" and cfg.endswith("-clip") and case not in ("allvals", PRE_NON_SQUARE_PIXEL_CASE):
            continue
        put(name, arr)
    for case, w, h in PRE_TINY_CASES + PRE_384_CASES + [("allvals", 64, 64)]:
        put(f"src.{case}", pre_source(case))

    # -- VQ input: torchvision Resize(size) (PIL bicubic) + CenterCrop(size), (u8/255 - 0.5)/0.5 ----
    for case, w, h, size in PRE_VQ_CASES:
        src = pre_source(case)
        put(f"src.{case}", src)
        crop_pil = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC,
                                               antialias=True)(Image.fromarray(src)))
        crop = np.asarray(crop_pil)
        put(f"vq{size}.{case}.crop_u8", crop)
        if case == "w37h23" and size == 64:
            x = (torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
            put(f"vq{size}.{case}.pixel_values", x.numpy())

    # -- decoding: Pillow's Image.open(f).convert("RGB") of small encoded files ---------------------
    decode_dir = PREPROCESS_DIR / "decode"
    if decode_dir.exists():
        shutil.rmtree(decode_dir)
    decode_dir.mkdir(parents=True)
    dsrc = synthetic_image(17, 23, PRE_SEED + 500)
    for fname, data in pre_encoded_files(dsrc):
        (decode_dir / fname).write_bytes(data)
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert rgb.shape == (17, 23, 3), (fname, rgb.shape)
        put(f"decode.{fname}", rgb)

    meta = {
        "layout": "preprocessing references; tensor names are <config>.<case>.<kind>",
        "src.<case>": "source image, HWC uint8 (synthetic_image(H, W, PRE_SEED + index) or the all-values 64x64 "
                      "image); the case name gives width and height",
        "original-64 / original-clip": "official VLMImageProcessor (deepseek-ai/Janus, transformers 4.57.1, "
                                       "Pillow bicubic) from tests/fixtures/preprocess/<config>/",
        "original-384": "official VLMImageProcessor from tests/fixtures/original-tiny (image_size 384): "
                        "content_u8 = the resized image inside the padded square, content_top_left = its offset "
                        "(the rest of the square is the background 127)",
        "hf-tiny / hf-clip": "transformers JanusImageProcessor (torchvision backend, AutoImageProcessor) from "
                             "tests/fixtures/hf-tiny and tests/fixtures/preprocess/hf-clip, CPU",
        "hf-tiny-pil": "transformers JanusImageProcessorPil (the PIL backend) from tests/fixtures/hf-tiny",
        "padded_u8": "the resized and padded image, HWC uint8 (official: VLMImageProcessor.resize; transformers: "
                     "do_rescale=False, do_normalize=False)",
        "pixel_values": "the processor's pixel_values[0], CHW float32 (stored for the allvals image, and for "
                        f"{PRE_NON_SQUARE_PIXEL_CASE} with the *-clip configs; elsewhere it is the same "
                        "elementwise map of padded_u8)",
        "vq<size>.<case>": "torchvision Resize(size, BICUBIC, antialias) + CenterCrop(size) on the PIL image: "
                           "crop_u8 HWC uint8, pixel_values = (u8/255 - 0.5)/0.5 CHW float32",
        "decode.<file>": "Pillow Image.open(tests/fixtures/preprocess/decode/<file>).convert('RGB'), HWC uint8",
        "versions": f"Pillow {PIL.__version__}, torchvision {torchvision.__version__}, "
                    + ", ".join(f"{k} {v}" for k, v in env_versions().items()),
        "official_code_commit": official_commit(),
    }
    save_expected(PREPROCESS_DIR / "expected.safetensors", tensors, meta)
    size = (PREPROCESS_DIR / "expected.safetensors").stat().st_size
    print(f"preprocess: {len(tensors)} tensors, expected.safetensors {size / 1e6:.2f} MB")
    if size > 1_500_000:
        raise SystemExit("tests/fixtures/preprocess/expected.safetensors is over 1.5 MB")


# ------------------------------------------------------------------------------------------------
# Cross-check of the tokenizer with transformers 4.57 and tokenizers 0.22 (the Rust crate's version)
# ------------------------------------------------------------------------------------------------
def cmd_check_tokenizer(args) -> None:
    import tokenizers
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    rec = read_json(TOKENIZER_DIR / "tokenize.json")
    folders = [TOKENIZER_DIR, ORIGINAL_DIR, HF_F32]
    for folder in folders:
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        try:
            auto = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # transformers 4.x does not know tokenizer_class "TokenizersBackend"
            auto = None
            print(f"{folder.name}: transformers {transformers.__version__} AutoTokenizer cannot load it: "
                  f"{type(e).__name__}: {str(e)[:120]}")
        for case in rec["cases"]:
            for add_sp, key in ((True, "ids"), (False, "ids_no_special")):
                got = [("tokenizers", raw.encode(case["text"], add_special_tokens=add_sp).ids)]
                if auto is not None:
                    got.append(("AutoTokenizer", auto(case["text"], add_special_tokens=add_sp)["input_ids"]))
                for who, ids in got:
                    if ids != case[key]:
                        raise SystemExit(f"{folder.name}: {who} {key} differ for {case['text']!r}: {ids} vs {case[key]}")
            dec = raw.decode(case["ids"], skip_special_tokens=True)
            if dec != case["decoded_skip_special"]:
                raise SystemExit(f"{folder.name}: tokenizers decode differs for {case['text']!r}: {dec!r}")
        print(f"{folder.name}: tokenize.json reproduced by tokenizers {tokenizers.__version__}"
              + (f" and transformers {transformers.__version__} {type(auto).__name__}" if auto is not None else ""))


# ------------------------------------------------------------------------------------------------
# Multi-turn, two-image understanding (both layouts): expected/chat.safetensors
# ------------------------------------------------------------------------------------------------
CHAT_STEPS = 8                # greedy tokens of the chat fixture
CHAT_FIRST = "Describe the first image."
CHAT_REPLY = "A red disc on a gradient."
# the second user turn places its image with an explicit tag; the first candidate whose greedy
# steps all have top-2 margins >= MIN_MARGIN in both layouts is used
CHAT_SECOND = ["Here is another one: <image_placeholder>\nWhat changed?",
               "And this one? <image_placeholder>\nCompare the two.",
               "<image_placeholder>\nWhat is different here?"]


def chat_images():
    """Two non-square inputs: a wide 40x64 and a tall 72x48 synthetic image."""
    return synthetic_image(40, 64, INPUT_SEED + 3), synthetic_image(72, 48, INPUT_SEED + 4)


def greedy_by_full_forward(forward, steps: int):
    """`steps` argmax tokens, each chosen from a full forward pass over the prompt and the tokens so far
    (no cache, no early stop at EOS); returns (ids [1, steps], logits [1, steps, V])."""
    import torch

    ids, logits = [], []
    for _ in range(steps):
        last = forward(ids)[:, -1]
        logits.append(last)
        ids.append(int(last.argmax(-1)[0]))
    return torch.tensor([ids], dtype=torch.int64), torch.stack(logits, dim=1)


def chat_record(prompt: str, input_ids, pixel_values, greedy, logits, extra_meta: dict, out: Path) -> float:
    import torch

    margins = top2_margins(logits.numpy())
    tensors = {"input_ids": input_ids.to(torch.int64), "pixel_values": pixel_values.float().contiguous(),
               "greedy_ids": greedy, "greedy_logits": logits.float().contiguous()}
    a, b = chat_images()
    tensors["image_a_u8"] = torch.from_numpy(a.copy())
    tensors["image_b_u8"] = torch.from_numpy(b.copy())
    meta = {
        "prompt": prompt,
        "turns": json.dumps([["user", CHAT_FIRST, "image_a"], ["assistant", CHAT_REPLY],
                             ["user", extra_meta.pop("second"), "image_b"]]),
        "input_ids": "processor output: prompt with each <image_placeholder> expanded to <begin_of_image> "
                     "+ N x <image_placeholder> + <end_of_image>",
        "pixel_values": "the processor's pixel_values of image_a and image_b, [2, 3, S, S]",
        "greedy_ids": f"{CHAT_STEPS} argmax tokens, each from a full forward pass (no early stop at EOS)",
        "greedy_logits": "the logits that chose greedy_ids; the first row is the first-step logits",
        "stat_min_margin_greedy": float(margins.min()),
        **extra_meta,
        **{f"version_{k}": v for k, v in env_versions().items()},
    }
    save_expected(out, tensors, meta)
    return float(margins.min())


def hf_chat(model, processor, second: str):
    import torch

    a, b = chat_images()
    messages = api_messages([("user", CHAT_FIRST, 1), ("assistant", CHAT_REPLY, 0), ("user", second, 1)])
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[a, b], return_tensors="pt")
    ids, pv = inputs["input_ids"], inputs["pixel_values"].float()
    assert pv.shape[0] == 2, pv.shape

    def forward(new):
        full = torch.cat([ids, torch.tensor([new], dtype=torch.int64)], dim=1) if new else ids
        with torch.no_grad():
            return model(input_ids=full, pixel_values=pv).logits

    greedy, logits = greedy_by_full_forward(forward, CHAT_STEPS)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=pv,
                             max_new_tokens=CHAT_STEPS, do_sample=False, generation_mode="text")[:, ids.shape[1]:]
    n = gen.shape[1]
    assert torch.equal(gen[0], greedy[0, :n]), (gen, greedy)
    return prompt, ids, pv, greedy, logits


def cmd_chat_hf(args) -> None:
    torch_setup()
    from transformers import AutoProcessor

    model = hf_load(HF_F32)
    processor = AutoProcessor.from_pretrained(str(HF_F32))
    for second in CHAT_SECOND:
        prompt, ids, pv, greedy, logits = hf_chat(model, processor, second)
        worst = float(top2_margins(logits.numpy()).min())
        print(f"hf chat {second!r}: margin {worst:.4g}")
        if worst >= MIN_MARGIN:
            break
    else:
        raise SystemExit("hf chat: no candidate has all margins >= MIN_MARGIN")
    chat_record(prompt, ids, pv, greedy, logits, {
        "second": second, "layout": "transformers JanusForConditionalGeneration, AutoProcessor of hf-tiny",
        "compute": "float32, CPU, eager attention, 1 thread"}, HF_F32 / "expected" / "chat.safetensors")


def cmd_chat_original(args) -> None:
    torch = torch_setup()
    from PIL import Image
    from janus.models import VLChatProcessor

    cache = fixture_cache(args) / "original-tiny" / "safetensors"
    model = load_official(cache)
    proc = VLChatProcessor.from_pretrained(str(cache))
    a, b = chat_images()
    for second in CHAT_SECOND:
        conversation = [
            {"role": USER, "content": f"{IMAGE}\n{CHAT_FIRST}", "images": ["a"]},
            {"role": ASSISTANT, "content": CHAT_REPLY},
            {"role": USER, "content": second, "images": ["b"]},
            {"role": ASSISTANT, "content": ""},
        ]
        prep = proc(conversations=conversation, images=[Image.fromarray(a), Image.fromarray(b)],
                    force_batchify=True)
        pv = prep.pixel_values.float()                          # [1, 2, 3, 384, 384]
        with torch.no_grad():
            emb = model.prepare_inputs_embeds(input_ids=prep.input_ids.clone(), pixel_values=pv,
                                              images_seq_mask=prep.images_seq_mask,
                                              images_emb_mask=prep.images_emb_mask)
        lm = model.language_model

        def forward(new):
            e = emb
            if new:
                e = torch.cat([emb, lm.get_input_embeddings()(torch.tensor([new]))], dim=1)
            with torch.no_grad():
                return lm(inputs_embeds=e).logits

        greedy, logits = greedy_by_full_forward(forward, CHAT_STEPS)
        worst = float(top2_margins(logits.numpy()).min())
        print(f"original chat {second!r}: margin {worst:.4g}")
        if worst >= MIN_MARGIN:
            break
    else:
        raise SystemExit("original chat: no candidate has all margins >= MIN_MARGIN")
    chat_record(prep.sft_format[0], prep.input_ids, pv[0], greedy, logits, {
        "second": second,
        "layout": "original DeepSeek MultiModalityCausalLM + VLChatProcessor (official code, transformers 4.57.1)",
        "weights": "gen_original.py output (bfloat16 values) upcast to float32",
        "official_code_commit": official_commit(),
        "compute": "float32, CPU, eager attention, 1 thread"}, ORIGINAL_DIR / "expected" / "chat.safetensors")


# ------------------------------------------------------------------------------------------------
# A checkpoint as transformers 4.x converted the deepseek-community ones, and prompt ids of both forms
# ------------------------------------------------------------------------------------------------
def cmd_hf_v4(args) -> None:
    """tests/fixtures/hf-tiny-v4/ written by transformers 4.57.1 the way convert_janus_weights_to_hf.py
    writes a converted checkpoint (chat template in chat_template.json, preprocessor_config.json,
    special_tokens_map.json, 4.x config.json), holding the tensors of hf-tiny-bf16-sharded."""
    torch = torch_setup()
    import transformers
    from safetensors.torch import load_file
    from transformers import (AutoTokenizer, JanusConfig, JanusForConditionalGeneration, JanusImageProcessor,
                              JanusProcessor, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig)

    assert transformers.__version__.startswith("4."), transformers.__version__
    ids = special_ids_from_tokenizer_json(TOKENIZER_DIR / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(
        str(TOKENIZER_DIR), model_max_length=16384,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI})
    image_processor = JanusImageProcessor(
        size={"height": HF_VISION["image_size"], "width": HF_VISION["image_size"]},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], min_size=14, do_normalize=True,
        rescale_factor=1 / 255)
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=HF_CHAT_TEMPLATE, use_default_system_prompt=True)
    hf_fresh_dir(HF_V4)
    # save_jinja_files=False: the chat_template.json form, the 4.x default when the hub checkpoints
    # were converted
    processor.save_pretrained(str(HF_V4), save_jinja_files=False)
    assert (HF_V4 / "chat_template.json").is_file() and not (HF_V4 / "chat_template.jinja").exists()

    text = {k: v for k, v in HF_TEXT.items()}
    config = JanusConfig(
        text_config=LlamaConfig(vocab_size=len(tokenizer), rope_theta=10000.0, tie_word_embeddings=False,
                                attention_bias=False, mlp_bias=False, bos_token_id=ids[BOS],
                                eos_token_id=ids[EOS], pad_token_id=ids[PAD], **text),
        vision_config=JanusVisionConfig(**HF_VISION), vq_config=JanusVQVAEConfig(**HF_VQ),
        image_token_id=ids[IMAGE], tie_word_embeddings=False)
    model = JanusForConditionalGeneration(config).to(torch.bfloat16)
    state = {}
    for f in sorted(HF_BF16_SHARDED.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    # the generation settings the conversion script sets
    gen = model.generation_config
    gen._from_model_config = False
    gen.temperature = 1
    gen.guidance_scale = 5
    gen.pad_token_id = ids[PAD]
    gen.bos_token_id = ids[BOS]
    gen.eos_token_id = ids[EOS]
    gen.generation_kwargs = {"boi_token_id": ids[BOI]}
    model.save_pretrained(str(HF_V4), safe_serialization=True)
    written = load_file(str(HF_V4 / "model.safetensors"))
    assert written.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(written[k], v), k
    print(f"{HF_V4.name}: written by transformers {transformers.__version__}: "
          + ", ".join(sorted(f.name for f in HF_V4.iterdir())))


# The prompt cases of expected/prompts.json: what janus-rs is asked (turns of (role, text, images), or a
# generation prompt) -> the messages by api_parts -> the processor's text and input_ids.
PROMPT_CASES = [
    ("one image", "understand", [("user", "What is shown in this image?", 1)]),
    ("two images before the text", "understand", [("user", "  Compare the two pictures. ", 2)]),
    ("two images placed by tags", "understand",
     [("user", "Compare <image_placeholder> with\n<image_placeholder>, please.", 2)]),
    ("a tag first", "understand", [("user", "<image_placeholder>\nWhat is different here?", 1)]),
    ("no image", "understand", [("user", "Hello there!", 0)]),
    ("three turns, two images", "understand",
     [("user", CHAT_FIRST, 1), ("assistant", CHAT_REPLY, 0),
      ("user", "Here is another one: <image_placeholder>\nWhat changed?", 1)]),
    ("generation", "generate", [("user", "a photo of a cat", 0)]),
    ("another generation prompt", "generate", [("user", " a red fox in the snow ", 0)]),
]


def prompt_record(processor, folder: Path) -> dict:
    import numpy as np

    cases = []
    for name, mode, turns in PROMPT_CASES:
        messages = api_messages(turns)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        n_images = sum(n for _, _, n in turns)
        images = [synthetic_image(HF_VISION["image_size"], HF_VISION["image_size"], INPUT_SEED + 10 + i)
                  for i in range(n_images)] or None
        mode_kw = "text" if mode == "understand" else "image"
        out = processor(text=text, images=images, generation_mode=mode_kw, return_tensors="np")
        input_ids = np.asarray(out["input_ids"])[0].tolist()
        cases.append({"name": name, "mode": mode,
                      "turns": [{"role": r, "text": t, "images": n} for r, t, n in turns],
                      "messages": messages, "chat_template_output": text, "input_ids": input_ids})
    gens = [c["input_ids"] for c in cases if c["mode"] == "generate"]
    assert gens[0] != gens[1], "two generation prompts gave the same ids"
    return {
        "description": "Prompt ids for janus-rs' understanding/chat and generation calls on this folder: each case's "
                       "turns become `messages` (typed parts, the rule in make_fixtures.py api_parts), then "
                       "`processor.apply_chat_template(messages, add_generation_prompt=True)` and "
                       "`processor(text=..., images=<one per image part>, generation_mode='text' | 'image').input_ids` "
                       "(image placeholders expanded, default system prompt in text mode, <begin_of_image> appended "
                       "in image mode).",
        "processor": f"AutoProcessor.from_pretrained('{folder.name}'"
                     + (f", num_image_tokens={HF_VISION['num_image_tokens']})" if folder == HF_V4 else ")"),
        "versions": env_versions(),
        "cases": cases,
    }


def cmd_prompts(args) -> None:
    """expected/prompts.json for hf-tiny (chat_template.jinja, transformers 5.x files) and hf-tiny-v4
    (chat_template.json, transformers 4.x files), with transformers 5.24's processor; also checks that
    transformers 5.24 loads hf-tiny-v4 to exactly the tensors of hf-tiny-bf16-sharded."""
    import torch
    from transformers import AutoProcessor, JanusForConditionalGeneration

    torch_setup()
    v4 = JanusForConditionalGeneration.from_pretrained(str(HF_V4), dtype=torch.bfloat16)
    ref = state_dict_of_folder(HF_BF16_SHARDED)
    sd = v4.state_dict()
    assert sorted(sd) == sorted(ref), set(sd) ^ set(ref)
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k
    del v4
    for folder, kwargs in ((HF_F32, {}), (HF_V4, {"num_image_tokens": HF_VISION["num_image_tokens"]})):
        processor = AutoProcessor.from_pretrained(str(folder), **kwargs)
        assert processor.use_default_system_prompt is True, folder
        assert processor.num_image_tokens == HF_VISION["num_image_tokens"], folder
        check_hf_template(processor)
        record = prompt_record(processor, folder)
        (folder / "expected").mkdir(exist_ok=True)
        write_json(folder / "expected" / "prompts.json", record, sort_keys=False)
        print(f"{folder.name}: {len(record['cases'])} prompt cases")


# ------------------------------------------------------------------------------------------------
# Training data and the cross-entropy losses transformers' Janus gives for it
# ------------------------------------------------------------------------------------------------
TRAIN_DIR = FIXTURES / "train"
TRAIN_SEED = INPUT_SEED + 30      # synthetic_image seeds of the training images: TRAIN_SEED + index in TRAIN_IMAGES
MIN_CODE_GAP = 1e-3               # required second-minus-best VQ distance at every encoded position
# (file name, kind): "vq" images are made at the VQ encoder's input size, "vision" ones at SigLIP's
TRAIN_IMAGES = [("fox.png", "vq"), ("lake.png", "vq"), ("cat.png", "vision"), ("dog.png", "vision"),
                ("bird.png", "vision")]
TRAIN_LINES = [
    {"task": "generate", "prompt": "a red fox in the snow", "image": "fox.png"},
    {"task": "understand", "images": ["cat.png"], "question": "What is this?", "answer": "A cat asleep."},
    {"task": "text", "text": "The quick brown fox jumps over the lazy dog."},
    {"task": "generate", "prompt": "A beautiful landscape with mountains and a lake at sunset.", "image": "lake.png"},
    {"task": "understand", "images": ["dog.png", "bird.png"], "question": "How are these two pictures different?",
     "answer": "The first one shows a dog, the second a bird."},
    {"task": "text", "text": "A watercolor painting of a small village by the sea, soft light."},
]


def vq_input_size(config) -> int:
    """Side of the square image the VQ encoder maps onto its num_patches x num_patches grid: one halving
    per level but the last (JanusVQVAEEncoder downsamples after every level except the last)."""
    vq = config.vq_config
    return vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1)


def write_train_data(vision_size: int, vq_size: int) -> None:
    """tests/fixtures/train/: data.jsonl (TRAIN_LINES) and its PNG images (Pillow, RGB)."""
    from PIL import Image

    sizes = {"vq": vq_size, "vision": vision_size}
    if TRAIN_DIR.exists():
        shutil.rmtree(TRAIN_DIR)
    TRAIN_DIR.mkdir(parents=True)
    for i, (name, kind) in enumerate(TRAIN_IMAGES):
        Image.fromarray(synthetic_image(sizes[kind], sizes[kind], TRAIN_SEED + i)).save(TRAIN_DIR / name, "PNG")
    lines = [json.dumps(line, ensure_ascii=False) for line in TRAIN_LINES]
    (TRAIN_DIR / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_turns_data()


def train_image(name: str, size: int):
    """A training image as a reader of data.jsonl sees it: the PNG decoded to RGB (checked against its source)."""
    import numpy as np
    from PIL import Image

    names = [n for n, _ in TRAIN_IMAGES]
    with Image.open(TRAIN_DIR / name) as im:
        arr = np.asarray(im.convert("RGB"))
    assert np.array_equal(arr, synthetic_image(size, size, TRAIN_SEED + names.index(name))), name
    return arr


def generate_inputs(model, processor, ids, line, vq_size) -> dict:
    """The prompt ids `P` and the VQ codes of both quantizers of one `generate` line (see LOSS_DEFINITIONS);
    no gradient flows into the VQ model."""
    import torch
    import torch.nn.functional as F

    vq = model.model.vqmodel
    text = processor.apply_chat_template(api_messages([("user", line["prompt"], 0)]), add_generation_prompt=True)
    prompt = processor(text=text, generation_mode="image", return_tensors="pt")["input_ids"]
    assert prompt[0, 0].item() == ids[BOS] and prompt[0, -1].item() == ids[BOI], prompt
    image = train_image(line["image"], vq_size)
    # VQ input: the image is already vq_size x vq_size, so every resize / pad / crop is the identity and
    # the input is (u8/255 - 0.5)/0.5; the processor's own output (resize + pad + rescale + normalise) agrees.
    x = (torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    ip = processor.image_processor
    if (ip.size["height"], ip.size["width"]) == (vq_size, vq_size):
        pv = ip(images=[image], return_tensors="pt").pixel_values
        assert torch.equal(pv.float(), x), (pv.float() - x).abs().max()
    with torch.no_grad():
        enc = vq.encode(x)
        codes = enc.image_tokens.reshape(-1)                              # [N], row-major over the grid
        n = codes.numel()
        assert n == vq.config.num_patches ** 2 and enc.quantized_last_hidden_state.shape[-2:] == (
            vq.config.num_patches, vq.config.num_patches)
        # the same codes by hand (transformers' quantizer: plain squared distances, no l2 normalisation)
        z = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(n, -1).double()
        e = vq.quantize.embedding.weight.double()
        dist = torch.cdist(z, e) ** 2
        assert torch.equal(dist.argmin(-1), codes), (dist.argmin(-1), codes)
        # the official Janus quantizer (VectorQuantizer with codebook_l2_norm=True): l2-normalised latents
        # and codebook
        dist_l2 = torch.cdist(F.normalize(z, dim=-1), F.normalize(e, dim=-1)) ** 2
        codes_l2 = dist_l2.argmin(-1)
        gaps = [float((d.sort(-1).values[:, 1] - d.sort(-1).values[:, 0]).min()) for d in (dist, dist_l2)]
    return {"prompt": prompt, "codes": codes, "codes_l2norm": codes_l2, "gaps": gaps}


def generate_loss(model, prompt, codes):
    """Teacher-forced image-token loss (a 0-d tensor; differentiable unless run under torch.no_grad): one causal
    pass over [embed_tokens(P); generation_aligner(generation_embeddings(c[:N-1]))], generation_head at the
    positions |P|-1 .. |P|+N-2 against the N codes."""
    import torch
    import torch.nn.functional as F

    lm = model.model.language_model
    n = codes.numel()
    emb = torch.cat([lm.embed_tokens(prompt), model.prepare_embeddings_for_image_generation(codes[None, :-1])], 1)
    hidden = lm(inputs_embeds=emb, use_cache=False).last_hidden_state[0]
    P = prompt.shape[1]
    scores = model.model.generation_head(hidden[P - 1:P - 1 + n])  # [N, codes]
    return F.cross_entropy(scores, codes)


def loss_generate(model, processor, ids, line, vq_size):
    """Teacher-forced image-token loss of one `generate` line (see LOSS_DEFINITIONS)."""
    import torch

    g = generate_inputs(model, processor, ids, line, vq_size)
    prompt, codes, codes_l2, gaps = g["prompt"], g["codes"], g["codes_l2norm"], g["gaps"]
    n = codes.numel()
    with torch.no_grad():
        loss = generate_loss(model, prompt, codes)
        loss_l2 = generate_loss(model, prompt, codes_l2)
        # cross-check: the generation loop's path (prefill, then one code at a time through the KV cache),
        # the aligner applied by hand, log-softmax + gather by hand
        lm = model.model.language_model
        o = lm(inputs_embeds=lm.embed_tokens(prompt), use_cache=True)
        nll = []
        for i in range(n):
            logp = torch.log_softmax(model.model.generation_head(o.last_hidden_state[0, -1]), -1)
            nll.append(-logp[codes[i]])
            if i + 1 < n:
                step = model.model.generation_aligner(model.model.generation_embeddings(codes[i:i + 1]))[None]
                o = lm(inputs_embeds=step, cache=o.cache, use_cache=True)
        check = torch.stack(nll).mean()
    assert abs(check.item() - loss.item()) <= 1e-5 * abs(loss.item()), (check.item(), loss.item())
    return {"task": "generate", "input_ids": prompt[0].tolist(), "codes": codes.tolist(),
            "targets": codes.tolist(), "loss": float(loss),
            "codes_l2norm": codes_l2.tolist(), "loss_l2norm": float(loss_l2)}, {
        "min_code_gap": gaps[0], "min_code_gap_l2norm": gaps[1],
        "codes_equal_l2norm": int((codes == codes_l2).sum()), "cross_check_rel": abs(check.item() / loss.item() - 1)}


def understand_inputs(processor, ids, line, vision_size) -> dict:
    """input_ids (prompt + answer + EOS), prompt length and pixel_values of one `understand` line."""
    import torch

    tok = processor.tokenizer
    text = processor.apply_chat_template(api_messages([("user", line["question"], len(line["images"]))]),
                                         add_generation_prompt=True)
    images = [train_image(name, vision_size) for name in line["images"]]
    inputs = processor(text=text, images=images, return_tensors="pt")
    prompt = inputs["input_ids"][0]
    assert prompt[0].item() == ids[BOS] and int((prompt == ids[IMAGE]).sum()) == len(images) * processor.num_image_tokens
    answer = tok(line["answer"], add_special_tokens=False)["input_ids"]
    assert ids[BOS] not in answer and answer
    targets = answer + [tok.eos_token_id]
    full = torch.cat([prompt, torch.tensor(targets, dtype=torch.int64)])[None]
    return {"input_ids": full, "prompt_len": prompt.shape[0], "pixel_values": inputs["pixel_values"].float(),
            "targets": targets}


def understand_loss(model, full, L: int, pv):
    """Answer + EOS loss (a 0-d tensor; differentiable unless under torch.no_grad): the logits of
    model(full, pixel_values) at positions L-1 .. len-2 against full[L:]."""
    import torch.nn.functional as F

    logits = model(input_ids=full, pixel_values=pv).logits[0]
    return F.cross_entropy(logits[L - 1:full.shape[1] - 1], full[0, L:])


def loss_understand(model, processor, ids, line, vision_size):
    """Answer + EOS loss of one `understand` line (see LOSS_DEFINITIONS)."""
    import torch

    u = understand_inputs(processor, ids, line, vision_size)
    full, L, pv, targets = u["input_ids"], u["prompt_len"], u["pixel_values"], u["targets"]
    with torch.no_grad():
        loss = understand_loss(model, full, L, pv)
        # cross-check: transformers' own causal-LM loss (labels, -100 on the prompt positions)
        labels = full.clone()
        labels[0, :L] = -100
        check = model(input_ids=full, pixel_values=pv, labels=labels).loss
    assert abs(check.item() - loss.item()) <= 1e-5 * abs(loss.item()), (check.item(), loss.item())
    return {"task": "understand", "input_ids": full[0].tolist(), "targets": targets, "loss": float(loss)}, {
        "cross_check_rel": abs(check.item() / loss.item() - 1)}


def text_inputs(processor, ids, line):
    """input_ids [1, T] of one `text` line (BOS from the tokenizer, no EOS)."""
    import torch

    tok_ids = processor.tokenizer(line["text"])["input_ids"]
    assert tok_ids[0] == ids[BOS] and ids[EOS] not in tok_ids, tok_ids
    return torch.tensor([tok_ids], dtype=torch.int64)


def text_loss(model, x):
    """Next-token loss (a 0-d tensor; differentiable unless under torch.no_grad) of input_ids x [1, T]."""
    import torch.nn.functional as F

    logits = model(input_ids=x).logits[0]
    return F.cross_entropy(logits[:-1], x[0, 1:])


def loss_text(model, processor, ids, line):
    """Next-token loss of one `text` line (see LOSS_DEFINITIONS)."""
    import torch

    x = text_inputs(processor, ids, line)
    with torch.no_grad():
        loss = text_loss(model, x)
        check = model(input_ids=x, labels=x).loss                # transformers' causal-LM loss
    assert abs(check.item() - loss.item()) <= 1e-5 * abs(loss.item()), (check.item(), loss.item())
    tok_ids = x[0].tolist()
    return {"task": "text", "input_ids": tok_ids, "targets": tok_ids[1:], "loss": float(loss)}, {
        "cross_check_rel": abs(check.item() / loss.item() - 1)}


LOSS_DEFINITIONS = (
    "Model: tests/fixtures/hf-tiny loaded by transformers' JanusForConditionalGeneration.from_pretrained "
    "(float32, eager attention, eval, no grad, CPU, 1 thread); processor and tokenizer: AutoProcessor of the same "
    "folder (chat template, use_default_system_prompt true). Images: the PNG files named in data.jsonl, decoded to "
    "RGB. Every cross-entropy is torch.nn.functional.cross_entropy in float32, mean over the listed targets. "
    "generate: P = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), "
    "generation_mode='image').input_ids with messages = [{'role': 'user', 'content': [{'type': 'text', 'text': "
    "prompt.strip()}]}] (BOS first, <begin_of_image> last; no system prompt in image mode) = input_ids. The image is "
    "already the VQ input size (vq_config.num_patches * 2^(len(channel_multiplier) - 1)), so its VQ input is "
    "x = (u8/255 - 0.5)/0.5, NCHW (the same as the processor's pixel_values for it). codes c = "
    "model.model.vqmodel.encode(x).image_tokens: encoder -> quant_conv -> nearest codebook row by plain squared "
    "distance (transformers' JanusVQVAEVectorQuantizer: NO l2 normalisation of latents or codebook), row-major over "
    "the num_patches x num_patches grid, N codes. Input embeddings = [model.model.language_model.embed_tokens(P); "
    "model.model.generation_aligner(model.model.generation_embeddings(c[0..N-1)))] (= "
    "model.prepare_embeddings_for_image_generation); last_hidden_state of model.model.language_model over them "
    "(causal, no cache, positions 0..); scores = model.model.generation_head(hidden) at positions len(P)-1 .. "
    "len(P)+N-2, so <begin_of_image> predicts c[0]; targets = c; loss = mean CE over the N codes. codes_l2norm / "
    "loss_l2norm: the same with the official Janus quantizer (VectorQuantizer, codebook_l2_norm=True: nearest "
    "l2-normalised codebook row to the l2-normalised latent), as the official code and janus-rs encode images; "
    "losses_l2norm / mean_l2norm: losses and mean with loss_l2norm in place of loss on the generate lines. "
    "understand: prompt = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), "
    "images=[the line's images]).input_ids with messages = [{'role': 'user', 'content': [{'type': 'image'}] * n + "
    "[{'type': 'text', 'text': question.strip()}]}] (default system prompt, each image expanded to "
    "<begin_of_image> + num_image_tokens x <image_placeholder> + <end_of_image>); input_ids = prompt + "
    "tokenizer(answer, add_special_tokens=False).input_ids + [EOS]; logits = model(input_ids, "
    "pixel_values=processor pixel_values).logits (image embeddings scattered at the placeholders, lm_head); "
    "targets = the answer ids and EOS, each predicted from the position before it; loss = mean CE over them. "
    "text: input_ids = tokenizer(text).input_ids (BOS from the post-processor, no EOS); logits = "
    "model(input_ids).logits; targets = input_ids[1:], each predicted from the position before it. "
    "losses[i] = examples[i].loss for line i of data.jsonl; mean = their unweighted mean (float64 sum / count). "
    "Cross-checks (asserted within 1e-5 relative): understand and text against model(..., labels=...).loss "
    "(transformers' ForCausalLMLoss; labels -100 on the prompt positions); generate against the generation loop's "
    "path: a prefill over P, then one code embedding at a time through the KV cache, log-softmax of "
    "generation_head and a gather by hand. Every code's second-best minus best distance is at least "
    f"{MIN_CODE_GAP:g} for both quantizers."
)


def loss_setup(folder: Path = HF_F32, processor_folder: Path | None = None):
    """What `loss` and `grads` share: hf-tiny (or another transformers-layout folder: check-model) in float32
    (hf_load: eager attention, eval mode), its processor and tokenizer (from processor_folder, default the model
    folder), the special-token ids and the two image sizes (vision, VQ input)."""
    from transformers import AutoProcessor

    model = hf_load(folder)
    # The PIL image processor (transformers picks the torchvision one whenever torchvision is installed):
    # losses.json was written with it, and its rescale then normalise gives exactly (u8/255 - 0.5)/0.5, the VQ
    # input of the generate lines. The torchvision backend fuses both into (u8 - 127.5)/127.5 (janus-rs's
    # PixelArithmetic::TorchFused, its default for this layout), one float32 ulp away for 128 of the 256 byte
    # values: that fails the generate lines' pixel check and moves the understand losses by ~1e-7 relative.
    processor = AutoProcessor.from_pretrained(str(processor_folder or folder), backend="pil")
    assert type(processor.image_processor).__name__ == "JanusImageProcessorPil", type(processor.image_processor)
    assert processor.use_default_system_prompt is True
    check_hf_template(processor)
    tok = processor.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in tokenizer_strings()}
    assert ids == read_json(TOKENIZER_DIR / "tokenize.json")["special_token_ids"], ids
    cfg = model.config
    assert tok.eos_token_id == ids[EOS] == cfg.text_config.eos_token_id
    assert tok.bos_token_id == ids[BOS] and cfg.image_token_id == ids[IMAGE]
    vision_size = cfg.vision_config.image_size
    ip_size = processor.image_processor.size
    assert (ip_size["height"], ip_size["width"]) == (vision_size, vision_size), ip_size
    assert processor.num_image_tokens == (vision_size // cfg.vision_config.patch_size) ** 2
    return model, processor, ids, vision_size, vq_input_size(cfg)


def train_lines() -> list:
    return [json.loads(s) for s in (TRAIN_DIR / "data.jsonl").read_text(encoding="utf-8").splitlines()]


def cmd_loss(args) -> None:
    """tests/fixtures/train/ (data.jsonl + PNG images) and hf-tiny/expected/losses.json: the cross-entropy
    losses of transformers' Janus on each line (image-token loss, answer loss, text loss)."""
    torch_setup()
    model, processor, ids, vision_size, vq_size = loss_setup()
    write_train_data(vision_size, vq_size)

    examples, stats = [], []
    for line in train_lines():
        if line["task"] == "generate":
            ex, st = loss_generate(model, processor, ids, line, vq_size)
        elif line["task"] == "understand":
            ex, st = loss_understand(model, processor, ids, line, vision_size)
        else:
            ex, st = loss_text(model, processor, ids, line)
        examples.append(ex)
        stats.append(st)
        print(f"loss: {line['task']:<10} {ex['loss']:.6f}  {len(ex['input_ids'])} ids, {len(ex['targets'])} targets  "
              + ", ".join(f"{k}={v:.3g}" for k, v in st.items()))
        if "min_code_gap" in st and min(st["min_code_gap"], st["min_code_gap_l2norm"]) < MIN_CODE_GAP:
            raise SystemExit(f"a VQ code of {line['image']} is nearly tied; change TRAIN_SEED")
    losses = [ex["loss"] for ex in examples]
    losses_l2 = [ex.get("loss_l2norm", ex["loss"]) for ex in examples]
    record = {
        "data": os.path.relpath(TRAIN_DIR / "data.jsonl", HF_F32 / "expected"),
        "losses": losses,
        "mean": sum(losses) / len(losses),
        "losses_l2norm": losses_l2,
        "mean_l2norm": sum(losses_l2) / len(losses_l2),
        "examples": examples,
        "definitions": LOSS_DEFINITIONS,
        "versions": env_versions(),
    }
    write_compact_json(HF_F32 / "expected" / "losses.json", record, list_key="examples")
    print(f"loss: {len(losses)} lines, mean {record['mean']:.6f} (l2norm codes {record['mean_l2norm']:.6f}); "
          f"sizes vision {vision_size}, VQ {vq_size}")


# ------------------------------------------------------------------------------------------------
# Gradients of the batch loss and one AdamW step (transformers' Janus on hf-tiny)
# ------------------------------------------------------------------------------------------------
GRAD_MODULES = ("aligner", "generation_embeddings", "generation_aligner", "generation_head")   # of model.model
GRAD_LM_PARAMS = ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight",
                  "layers.0.input_layernorm.weight", "embed_tokens.weight")               # of model.model.language_model
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
GRAD_CHECK_SEED = 11         # torch.Generator seed of the random unit directions of the central-difference check
GRAD_CHECK_STEP = 1e-4       # its step (float64)

GRAD_DEFINITIONS = (
    "Model, processor, images and the six lines of tests/fixtures/train/data.jsonl exactly as for "
    "hf-tiny/expected/losses.json (make_fixtures.py loss: hf-tiny in float32, eager attention, eval mode (the model "
    "has no dropout), CPU, 1 thread, deterministic algorithms; AutoProcessor of hf-tiny with backend='pil', whose "
    "pixel_values are (u8/255 - 0.5)/0.5), but with gradients enabled. Per-line losses "
    "(line_losses, [6]): as losses.json's losses_l2norm, i.e. generate lines with the official l2-normalised "
    "quantizer's codes c = codes_l2norm, used both as the targets and as the teacher-forced inputs: input "
    "embeddings [embed_tokens(P); generation_aligner(generation_embeddings(c[0..N-1)))], generation_head at "
    "positions |P|-1 .. |P|+N-2 against c (the janus-rs definition); understand: answer + EOS; text: every id "
    "after BOS; each a float32 mean cross-entropy over its targets. The VQ model only encodes (no gradient). "
    "Batch loss L (loss, [1]) = torch.stack(line_losses).mean() in float32: unweighted mean over the 6 lines "
    "(not over tokens). L.backward() once from zero gradients; grad.<name> = the .grad of parameter <name> "
    "(a name of model.named_parameters(), which is also its key in hf-tiny/model.safetensors, same shape: "
    "asserted), for every parameter of model.model.aligner, model.model.generation_embeddings, "
    "model.model.generation_aligner and model.model.generation_head, and for model.model.language_model's "
    + ", ".join(GRAD_LM_PARAMS) + ", and lm_head.weight. Then one step of torch.optim.AdamW over exactly those "
    "parameters (one group; lr {lr:g}, betas ({b1:g}, {b2:g}), eps {eps:g}, weight_decay {wd:g}, amsgrad False, "
    "maximize False, foreach False: the single-tensor loop) from fresh state: p <- p * (1 - lr * weight_decay) "
    "(decoupled decay), m = (1 - b1) g, v = (1 - b2) g^2, p <- p - (lr / (1 - b1)) * m / (sqrt(v) / "
    "sqrt(1 - b2) + eps), i.e. p(1 - lr wd) - lr g / (|g| + eps) at step 1 (a parameter element with g = 0 "
    "only decays); after_adamw.<name> = the parameter after that step. The starting values are "
    "hf-tiny/model.safetensors' tensors of the same names (not repeated here). Checks (asserted): every "
    "line loss equals losses.json's losses_l2norm within 1e-6 relative, and the prompt ids and codes are "
    "the ones recorded there; the same loss and gradients in float64 (a float64 copy of the model, same "
    "inputs) agree with the float32 ones (stat_grad_rel_f32_vs_f64); for each saved tensor the float64 "
    "gradient's directional derivative along a random unit direction (torch.Generator seed {seed}) matches "
    "a central difference of the float64 batch loss with step {h:g} (stat_central_difference_rel); the "
    "AdamW result matches the formula above evaluated in float64 from the float32 gradients. "
    "stat_adamw_max_abs_vs_f64_grads: how far the step result moves when the float64 gradients replace the "
    "float32 ones (an element whose |g| were within float32 noise of 0 could swing by up to 2 lr; on these data "
    "this stat bounds the effect). Gradient rows that are exactly 0: in embed_tokens.weight every id that is not "
    "an input, and also <image_placeholder> (its embeddings are replaced by the aligner's image embeddings) and "
    "EOS (only the last input of the understand lines, an output no target uses); in "
    "generation_embeddings.weight every code not in c[0..N-1) of a generate line (stat_all_zero_gradient_rows)."
).format(lr=ADAMW["lr"], b1=ADAMW["betas"][0], b2=ADAMW["betas"][1], eps=ADAMW["eps"], wd=ADAMW["weight_decay"],
         seed=GRAD_CHECK_SEED, h=GRAD_CHECK_STEP)


def grad_param_names(model) -> list:
    """The parameters whose gradients and AdamW step `grads` saves, as named by model.named_parameters()."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = []
    for m in GRAD_MODULES:
        names += [by_id[id(p)] for p in getattr(model.model, m).parameters()]
    lm = dict(model.model.language_model.named_parameters())
    names += [by_id[id(lm[n])] for n in GRAD_LM_PARAMS]
    names.append(by_id[id(model.lm_head.weight)])
    assert len(set(names)) == len(names), names
    return names


def grads_inputs(model, processor, ids, lines, vision_size, vq_size) -> list:
    """The inputs of each line's loss (generate: the prompt and the l2-normalised quantizer's codes)."""
    out = []
    for line in lines:
        if line["task"] == "generate":
            g = generate_inputs(model, processor, ids, line, vq_size)
            out.append({"task": "generate", "prompt": g["prompt"], "codes": g["codes_l2norm"]})
        elif line["task"] == "understand":
            out.append({"task": "understand", **understand_inputs(processor, ids, line, vision_size)})
        else:
            out.append({"task": "text", "input_ids": text_inputs(processor, ids, line)})
    return out


def grads_line_losses(model, inputs, dtype):
    """The per-line losses [len(inputs)] (differentiable unless under torch.no_grad)."""
    import torch

    losses = []
    for x in inputs:
        if x["task"] == "generate":
            losses.append(generate_loss(model, x["prompt"], x["codes"]))
        elif x["task"] == "understand":
            losses.append(understand_loss(model, x["input_ids"], x["prompt_len"], x["pixel_values"].to(dtype)))
        else:
            losses.append(text_loss(model, x["input_ids"]))
    return torch.stack(losses)


class Float64Compute:
    """Inside `with Float64Compute(model64):` the float32 casts of transformers' eager attention
    (softmax(..., dtype=torch.float32)) and of LlamaRMSNorm (hidden states to float32) leave float64 tensors in
    float64, so a `.double()` copy of the model computes in float64 throughout (the rotary cos/sin remain
    float32 values cast to float64: they depend on no parameter). Without it the float32 rounding inside a
    float64 model makes central differences useless."""

    def __init__(self, model):
        self.norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
        assert self.norms

    def __enter__(self):
        import types

        import torch

        functional = torch.nn.functional
        self.softmax = softmax = functional.softmax

        def softmax64(input, dim=None, _stacklevel=3, dtype=None):
            if input.dtype == torch.float64 and dtype == torch.float32:
                dtype = None
            return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

        def rms_norm64(module, hidden_states):
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon))

        functional.softmax = softmax64
        for m in self.norms:
            m.forward = types.MethodType(rms_norm64, m)
        return self

    def __exit__(self, *exc):
        import torch

        torch.nn.functional.softmax = self.softmax
        for m in self.norms:
            del m.forward
        return False


def adamw_step1_f64(p, g):
    """One AdamW step from fresh state, in float64 (see GRAD_DEFINITIONS)."""
    lr, (b1, b2), eps, wd = ADAMW["lr"], ADAMW["betas"], ADAMW["eps"], ADAMW["weight_decay"]
    p, g = p.double(), g.double()
    m, v = (1 - b1) * g, (1 - b2) * g * g
    return p * (1 - lr * wd) - (lr / (1 - b1)) * m / ((v.sqrt() / (1 - b2) ** 0.5) + eps)


def cmd_grads(args) -> None:
    """hf-tiny/expected/grads.safetensors: gradients of the mean line loss of train/data.jsonl (janus-rs's
    definition: the official quantizer's codes) for a set of parameters, and those parameters after one AdamW
    step."""
    torch = torch_setup()
    from safetensors import safe_open

    model, processor, ids, vision_size, vq_size = loss_setup()
    lines = train_lines()
    if lines != TRAIN_LINES:
        raise SystemExit(f"{TRAIN_DIR / 'data.jsonl'} is not the script's TRAIN_LINES: run `make_fixtures.py loss` first")
    ref = read_json(HF_F32 / "expected" / "losses.json")
    inputs = grads_inputs(model, processor, ids, lines, vision_size, vq_size)
    for x, ex in zip(inputs, ref["examples"], strict=True):
        assert x["task"] == ex["task"], (x["task"], ex["task"])
        if x["task"] == "generate":
            assert x["prompt"][0].tolist() == ex["input_ids"] and x["codes"].tolist() == ex["codes_l2norm"], ex
        else:
            assert x["input_ids"][0].tolist() == ex["input_ids"], ex

    names = grad_param_names(model)
    params = dict(model.named_parameters())
    with safe_open(str(HF_F32 / "model.safetensors"), framework="pt") as f:
        file_shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    for n in names:
        assert file_shapes.get(n) == list(params[n].shape), (n, file_shapes.get(n), params[n].shape)
    start = {n: params[n].detach().clone() for n in names}

    # float32: the fixture
    model.zero_grad(set_to_none=True)
    line_losses = grads_line_losses(model, inputs, torch.float32)
    loss = line_losses.mean()
    rel = [abs(a / b - 1) for a, b in zip(line_losses.tolist(), ref["losses_l2norm"], strict=True)]
    assert max(rel) <= 1e-6, (line_losses.tolist(), ref["losses_l2norm"])
    loss.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert not [n for n in names if n in no_grad], no_grad
    grads = {n: params[n].grad.detach().clone() for n in names}
    # the embedding rows with a gradient: the inputs before each line's last scored position, except
    # <image_placeholder> (replaced by image embeddings); the codes fed to generation_embeddings
    fed, codes_fed = set(), set()
    for x in inputs:
        if x["task"] == "generate":
            fed |= set(x["prompt"][0].tolist())
            codes_fed |= set(x["codes"][:-1].tolist())
        else:
            fed |= set(x["input_ids"][0, :-1].tolist())
    fed.discard(ids[IMAGE])
    for n, want in (("model.language_model.embed_tokens.weight", fed), ("model.generation_embeddings.weight", codes_fed)):
        assert set((grads[n] != 0).any(-1).nonzero().reshape(-1).tolist()) == want, n

    # float64: the same loss and gradients, and central differences of it along one direction per tensor
    model64 = copy.deepcopy(model).double()
    model64.zero_grad(set_to_none=True)
    p64 = dict(model64.named_parameters())
    with Float64Compute(model64):
        loss64 = grads_line_losses(model64, inputs, torch.float64).mean()
        loss64.backward()
    g64 = {n: p64[n].grad.detach().clone() for n in names}
    grad_rel = {n: float((grads[n].double() - g64[n]).norm() / g64[n].norm()) for n in names}
    assert max(grad_rel.values()) <= 1e-4, grad_rel
    gen = torch.Generator().manual_seed(GRAD_CHECK_SEED)
    fd_rel = {}
    with torch.no_grad(), Float64Compute(model64):
        for n in names:
            d = torch.randn(p64[n].shape, generator=gen, dtype=torch.float64)
            d /= d.norm()
            orig = p64[n].detach().clone()
            p64[n].copy_(orig + GRAD_CHECK_STEP * d)
            up = grads_line_losses(model64, inputs, torch.float64).mean()
            p64[n].copy_(orig - GRAD_CHECK_STEP * d)
            down = grads_line_losses(model64, inputs, torch.float64).mean()
            p64[n].copy_(orig)
            fd = float((up - down) / (2 * GRAD_CHECK_STEP))
            an = float((g64[n] * d).sum())
            fd_rel[n] = abs(fd - an) / abs(an)
    assert max(fd_rel.values()) <= 1e-5, fd_rel
    del model64

    # one AdamW step over exactly these parameters
    opt = torch.optim.AdamW([params[n] for n in names], lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"], amsgrad=False, maximize=False, foreach=False)
    opt.step()
    after = {n: params[n].detach().clone() for n in names}
    by_hand = max(float((adamw_step1_f64(start[n], grads[n]) - after[n].double()).abs().max()) for n in names)
    assert by_hand <= 1e-6, by_hand
    vs64 = max(float((adamw_step1_f64(start[n], g64[n]) - after[n].double()).abs().max()) for n in names)
    for n in names:                      # every one moved (rows without gradient through the weight decay)
        assert not torch.equal(after[n], start[n]), n

    tensors = {"loss": loss.detach().reshape(1), "line_losses": line_losses.detach()}
    tensors.update({f"grad.{n}": grads[n] for n in names})
    tensors.update({f"after_adamw.{n}": after[n] for n in names})
    grad_norms = {n: float(grads[n].double().norm()) for n in names}
    zero_rows = {n: int((grads[n].reshape(grads[n].shape[0], -1) == 0).all(-1).sum())
                 for n in names if grads[n].dim() == 2}
    meta = {
        "definitions": GRAD_DEFINITIONS,
        "parameters": json.dumps(names),
        "file_keys": "every <name> in grad.<name> / after_adamw.<name> is the name in model.named_parameters() "
                     "and the key of the starting value in hf-tiny/model.safetensors (same shape; asserted)",
        "data": os.path.relpath(TRAIN_DIR / "data.jsonl", HF_F32 / "expected"),
        "losses_json": "losses.json (line_losses = its losses_l2norm)",
        "adamw_lr": ADAMW["lr"], "adamw_beta1": ADAMW["betas"][0], "adamw_beta2": ADAMW["betas"][1],
        "adamw_eps": ADAMW["eps"], "adamw_weight_decay": ADAMW["weight_decay"],
        "adamw": "torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, amsgrad=False, "
                 "maximize=False, foreach=False), one group, one step() from fresh state",
        "loss_float64": repr(loss64.item()),
        "stat_line_loss_rel_vs_losses_json": json.dumps(rel),
        "stat_grad_norms": json.dumps(grad_norms),
        "stat_grad_rel_f32_vs_f64": json.dumps(grad_rel),
        "stat_central_difference_rel": json.dumps(fd_rel),
        "stat_adamw_max_abs_vs_formula": by_hand,
        "stat_adamw_max_abs_vs_f64_grads": vs64,
        "stat_all_zero_gradient_rows": json.dumps(zero_rows),
        "parameters_without_gradient": f"{len(no_grad)} of {len(params)} (the VQ model: it only encodes, "
                                       "under torch.no_grad)",
        **{f"version_{k}": v for k, v in env_versions().items()},
    }
    assert all(n.startswith("model.vqmodel.") for n in no_grad), no_grad
    out = HF_F32 / "expected" / "grads.safetensors"
    save_expected(out, tensors, meta)
    print(f"grads: loss {loss.item():.6f} (float64 {loss64.item():.6f}), {len(names)} parameters, "
          f"{out.stat().st_size} bytes; max rel |g32 - g64| {max(grad_rel.values()):.3g}, central differences "
          f"{max(fd_rel.values()):.3g}, AdamW vs formula {by_hand:.3g}, vs float64 grads {vs64:.3g}")
    for n in names:
        print(f"  {n:<60} {str(list(grads[n].shape)):<12} |g| {grad_norms[n]:.6g}"
              + (f"  zero rows {zero_rows[n]}" if n in zero_rows else ""))


# ------------------------------------------------------------------------------------------------
# A LoRA adapter (PEFT) on hf-tiny's language model: the adapter files, its loss, gradients, one AdamW step
# ------------------------------------------------------------------------------------------------
LORA_DIR = HF_F32 / "lora"
LORA_TARGET_MODULES = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LORA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")        # of every model.language_model layer
LORA_R = 4
LORA_ALPHA = 8
LORA_INIT_SEED = 20250301    # torch.manual_seed before get_peft_model: PEFT's own init of every lora_A
LORA_B_SEED = 20250302       # torch.Generator seed of lora_B = randn * LORA_B_STD (PEFT initialises B to zero)
LORA_B_STD = 0.1
LORA_BASE_NAME = "hf-tiny"   # base_model_name_or_path in the saved adapter_config.json (not an absolute path)
LORA_FILES = ["adapter_config.json", "adapter_model.safetensors"]

LORA_DEFINITIONS = (
    "Model, processor, images, the lines of tests/fixtures/train/data.jsonl and every per-line loss definition "
    "exactly as for hf-tiny/expected/grads.safetensors (make_fixtures.py grads: hf-tiny in float32, eager "
    "attention, eval mode, CPU, 1 thread, deterministic algorithms; generate lines with the official "
    "l2-normalised quantizer's codes as targets and teacher-forced inputs; understand: answer + EOS; text: every id "
    "after BOS; each a float32 mean cross-entropy), but with a LoRA adapter applied UNMERGED: "
    "peft.get_peft_model(model, LoraConfig(r={r}, lora_alpha={alpha}, lora_dropout=0.0, bias='none', "
    "target_modules=r'{target}')) (regex, re.fullmatch on module names: the 7 projections q,k,v,o,gate,up,down of "
    "every layer of model.language_model, nothing in the vision tower; asserted), so every adapted Linear computes "
    "y = W x + (alpha / r) * B (A x) with scaling alpha / r = {scaling:g}, A [r, in], B [out, r]. Values: A as "
    "PEFT initialises it (kaiming-uniform) under torch.manual_seed({init_seed}) just before get_peft_model; every "
    "B = torch.randn(shape, generator=torch.Generator().manual_seed({b_seed})) * {b_std:g}, drawn module by module "
    "in named_parameters() order (PEFT's B = 0 would make the adapter a no-op and give A no gradient). The adapter "
    "is lora/adapter_config.json + lora/adapter_model.safetensors, written by PeftModel.save_pretrained "
    "(save_embedding_layers=False; base_model_name_or_path set to '{base}'; the model card README.md it also writes "
    "is removed). Only the LoRA parameters are trainable (PEFT freezes the base model). Per-line losses "
    "(line_losses, [6]) through the PEFT-injected model; loss [1] = their float32 mean (torch.stack(...).mean()). "
    "loss.backward() once from zero gradients; grad.<key> = the .grad of every lora_A / lora_B parameter, where "
    "<key> is the tensor's key in lora/adapter_model.safetensors (e.g. "
    "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight: PEFT's parameter name without "
    "the adapter name 'default'; same shape: asserted). Then one step of torch.optim.AdamW over exactly all of them "
    "(one group; lr {lr:g}, betas ({b1:g}, {b2:g}), eps {eps:g}, weight_decay {wd:g}, amsgrad False, maximize "
    "False, foreach False) from fresh state, as in grads.safetensors: p(1 - lr wd) - lr g / (|g| + eps) at step 1; "
    "after_adamw.<key> = the tensor after that step (its start value is the same key in adapter_model.safetensors). "
    "Checks (asserted): the base model without the adapter reproduces losses.json's losses_l2norm (1e-6 relative) "
    "and the adapter moves the mean loss by more than 1e-3 relative (base_line_losses); PeftModel.forward gives "
    "the same logits as the injected base model; a float64 copy (Float64Compute) gives the same gradients within "
    "1e-4 relative (stat_grad_rel_f32_vs_f64); the AdamW result matches the formula in float64 (1e-6); "
    "PeftModel.from_pretrained(fresh hf-tiny, lora/) loads exactly the saved tensors and reproduces line_losses "
    "within 1e-6 relative (stat_reload_line_loss_rel); merge_and_unload() of a deep copy gives merged_line_losses "
    "(stat_merged_max_rel vs the unmerged ones)."
).format(r=LORA_R, alpha=LORA_ALPHA, target=LORA_TARGET_MODULES, scaling=LORA_ALPHA / LORA_R,
         init_seed=LORA_INIT_SEED, b_seed=LORA_B_SEED, b_std=LORA_B_STD, base=LORA_BASE_NAME, lr=ADAMW["lr"],
         b1=ADAMW["betas"][0], b2=ADAMW["betas"][1], eps=ADAMW["eps"], wd=ADAMW["weight_decay"])


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=LORA_TARGET_MODULES)


def lora_param_keys(peft_model, adapter: str = "default") -> dict:
    """{PEFT parameter name: key in adapter_model.safetensors} for every lora_A / lora_B parameter, in
    named_parameters() order (the saved key is the name without the adapter name)."""
    out = {}
    for n, _ in peft_model.named_parameters():
        for ab in ("lora_A", "lora_B"):
            if f".{ab}.{adapter}." in n:
                out[n] = n.replace(f".{ab}.{adapter}.", f".{ab}.")
    return out


def lora_check_targets(peft_model) -> list:
    """Assert the adapted modules are exactly model.language_model.layers.* x LORA_PROJECTIONS; returns their names."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    n_layers = base.config.text_config.num_hidden_layers
    want = [f"model.language_model.layers.{i}.{p}" for i in range(n_layers) for p in LORA_PROJECTIONS]
    got = [n for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    assert got == want, (got, want)
    assert sorted(peft_model.targeted_module_names) == sorted(want), peft_model.targeted_module_names
    return want


def data_line_losses(model, processor, ids, vision_size, vq_size, lines=None) -> list:
    """The per-line losses (grads' definitions, float32, no grad) of tests/fixtures/train/data.jsonl."""
    import torch

    lines = train_lines() if lines is None else lines
    inputs = grads_inputs(model, processor, ids, lines, vision_size, vq_size)
    with torch.no_grad():
        return grads_line_losses(model, inputs, torch.float32).tolist()


def lora_load_adapter(model, folder: Path):
    """PeftModel.from_pretrained(model, folder) in eval mode, asserting that every LoRA tensor of the model is
    exactly the tensor of the same key in the folder's weights, and that the folder holds no other key."""
    import torch
    from peft import PeftModel
    from peft.utils import load_peft_weights

    pm = PeftModel.from_pretrained(model, str(folder))
    pm.eval()
    lora_check_targets(pm)
    stored = load_peft_weights(str(folder), device="cpu")
    keys = lora_param_keys(pm)
    assert sorted(keys.values()) == sorted(stored), set(keys.values()) ^ set(stored)
    params = dict(pm.named_parameters())
    for n, k in keys.items():
        assert torch.equal(params[n].detach(), stored[k].to(params[n].dtype)), k
    return pm


def print_losses_json(losses: list) -> None:
    print(json.dumps({"losses": losses, "mean": sum(losses) / len(losses)}), flush=True)


def cmd_lora(args) -> None:
    """hf-tiny/lora/ (a PEFT LoRA adapter saved by PEFT) and hf-tiny/expected/lora.safetensors: the line losses,
    gradients of the mean loss for every LoRA tensor, and those tensors after one AdamW step."""
    torch = torch_setup()
    import peft
    from peft import get_peft_model
    from safetensors import safe_open
    from safetensors.torch import load_file

    model, processor, ids, vision_size, vq_size = loss_setup()
    lines = train_lines()
    if lines != TRAIN_LINES:
        raise SystemExit(f"{TRAIN_DIR / 'data.jsonl'} is not the script's TRAIN_LINES: run `make_fixtures.py loss` first")
    ref = read_json(HF_F32 / "expected" / "losses.json")
    inputs = grads_inputs(model, processor, ids, lines, vision_size, vq_size)

    # the base model (no adapter): losses.json's losses_l2norm
    with torch.no_grad():
        base_losses = grads_line_losses(model, inputs, torch.float32).tolist()
    base_rel = [abs(a / b - 1) for a, b in zip(base_losses, ref["losses_l2norm"], strict=True)]
    assert max(base_rel) <= 1e-6, (base_losses, ref["losses_l2norm"])

    # the adapter: PEFT's init of A under a fixed seed, B seeded randn * LORA_B_STD
    torch.manual_seed(LORA_INIT_SEED)
    pm = get_peft_model(model, lora_config())
    pm.eval()
    targets = lora_check_targets(pm)
    keys = lora_param_keys(pm)
    assert len(keys) == 2 * len(targets), keys
    params = dict(pm.named_parameters())
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable == list(keys), (trainable, list(keys))
    gen = torch.Generator().manual_seed(LORA_B_SEED)
    with torch.no_grad():
        for n in keys:
            if ".lora_B." in n:
                assert not params[n].any(), n                    # PEFT's B = 0
                params[n].copy_(torch.randn(params[n].shape, generator=gen) * LORA_B_STD)
            else:
                assert params[n].abs().min() > 0, n              # PEFT's A: random
    base = pm.get_base_model()
    assert base is model
    for t in targets:
        layer = base.get_submodule(t)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert tuple(a.shape) == (LORA_R, layer.in_features) and tuple(b.shape) == (layer.out_features, LORA_R), t
        assert layer.scaling["default"] == LORA_ALPHA / LORA_R, layer.scaling
    start = {k: params[n].detach().clone() for n, k in keys.items()}

    # the adapter files, written by PEFT
    pm.peft_config["default"].base_model_name_or_path = LORA_BASE_NAME
    hf_fresh_dir(LORA_DIR)
    pm.save_pretrained(str(LORA_DIR), save_embedding_layers=False)
    card = LORA_DIR / "README.md"          # PEFT's model card template (holds the absolute base-model path)
    if card.exists():
        card.unlink()
    assert sorted(p.name for p in LORA_DIR.iterdir()) == LORA_FILES, list(LORA_DIR.iterdir())
    for name in LORA_FILES:                # safetensors creates its file with mode 0600
        (LORA_DIR / name).chmod(0o644)
    saved = load_file(str(LORA_DIR / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(keys.values()), set(saved) ^ set(keys.values())
    for k, v in saved.items():
        assert k.startswith("base_model.model.model.language_model.layers.") and (
            k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")), k
        assert v.dtype == torch.float32 and torch.equal(v, start[k]), k
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    with safe_open(str(LORA_DIR / "adapter_model.safetensors"), framework="pt") as f:
        adapter_file_meta = f.metadata()
    cfg_text = (LORA_DIR / "adapter_config.json").read_text(encoding="utf-8")
    cfg_json = json.loads(cfg_text)
    assert cfg_json["base_model_name_or_path"] == LORA_BASE_NAME, cfg_json
    assert (cfg_json["r"], cfg_json["lora_alpha"], cfg_json["target_modules"], cfg_json["peft_type"]) == (
        LORA_R, LORA_ALPHA, LORA_TARGET_MODULES, "LORA"), cfg_json
    assert str(REPO) not in cfg_text and str(Path.home()) not in cfg_text, cfg_text

    # float32, unmerged, with gradients: the fixture
    with torch.no_grad():                  # PeftModel.forward runs the same injected modules
        x = next(x for x in inputs if x["task"] == "text")["input_ids"]
        assert torch.equal(pm(input_ids=x).logits, base(input_ids=x).logits)
    pm.zero_grad(set_to_none=True)
    line_losses = grads_line_losses(base, inputs, torch.float32)
    loss = line_losses.mean()
    loss.backward()
    no_grad = [n for n in keys if params[n].grad is None]
    assert not no_grad, no_grad
    assert all(p.grad is None for n, p in pm.named_parameters() if n not in keys)
    grads = {k: params[n].grad.detach().clone() for n, k in keys.items()}
    for k, g in grads.items():
        assert g.abs().max() > 0, k
    mean_base = sum(base_losses) / len(base_losses)
    mean_rel_change = abs(loss.item() / mean_base - 1)
    assert mean_rel_change > 1e-3, (loss.item(), mean_base)

    # float64: the same gradients
    pm64 = copy.deepcopy(pm).double()
    pm64.zero_grad(set_to_none=True)
    p64 = dict(pm64.named_parameters())
    with Float64Compute(pm64.get_base_model()):
        loss64 = grads_line_losses(pm64.get_base_model(), inputs, torch.float64).mean()
        loss64.backward()
    g64 = {k: p64[n].grad.detach().clone() for n, k in keys.items()}
    grad_rel = {k: float((grads[k].double() - g64[k]).norm() / g64[k].norm()) for k in grads}
    assert max(grad_rel.values()) <= 1e-4, grad_rel
    del pm64

    # merged into the weights (a deep copy): the same losses up to rounding
    with torch.no_grad():
        merged = copy.deepcopy(pm).merge_and_unload()
        merged_losses = grads_line_losses(merged, inputs, torch.float32).tolist()
    del merged
    merged_rel = [abs(a / b - 1) for a, b in zip(merged_losses, line_losses.tolist(), strict=True)]
    assert max(merged_rel) <= 1e-4, (merged_losses, line_losses.tolist())

    # one AdamW step over exactly the LoRA parameters
    opt = torch.optim.AdamW([params[n] for n in keys], lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"], amsgrad=False, maximize=False, foreach=False)
    opt.step()
    after = {k: params[n].detach().clone() for n, k in keys.items()}
    by_hand = max(float((adamw_step1_f64(start[k], grads[k]) - after[k].double()).abs().max()) for k in keys.values())
    assert by_hand <= 1e-6, by_hand
    vs64 = max(float((adamw_step1_f64(start[k], g64[k]) - after[k].double()).abs().max()) for k in keys.values())
    for k in keys.values():
        assert not torch.equal(after[k], start[k]), k

    # the saved adapter, loaded by PEFT onto a fresh hf-tiny (what check-adapter does)
    fresh, *_ = loss_setup()
    reloaded = lora_load_adapter(fresh, LORA_DIR)
    reload_losses = data_line_losses(reloaded.get_base_model(), processor, ids, vision_size, vq_size, lines)
    reload_rel = [abs(a / b - 1) for a, b in zip(reload_losses, line_losses.tolist(), strict=True)]
    assert max(reload_rel) <= 1e-6, (reload_losses, line_losses.tolist())
    del reloaded, fresh

    tensors = {"loss": loss.detach().reshape(1), "line_losses": line_losses.detach()}
    tensors.update({f"grad.{k}": g for k, g in grads.items()})
    tensors.update({f"after_adamw.{k}": t for k, t in after.items()})
    grad_norms = {k: float(g.double().norm()) for k, g in grads.items()}
    versions = {**env_versions(), "peft": peft.__version__}
    meta = {
        "definitions": LORA_DEFINITIONS,
        "adapter": "lora/adapter_config.json, lora/adapter_model.safetensors (relative to hf-tiny/)",
        "adapter_keys": json.dumps(list(keys.values())),
        "adapter_target_modules": json.dumps(targets),
        "adapter_file_metadata": json.dumps(adapter_file_meta, sort_keys=True),
        "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_scaling": LORA_ALPHA / LORA_R,
        "lora_target_modules": LORA_TARGET_MODULES,
        "lora_init_seed": LORA_INIT_SEED, "lora_b_seed": LORA_B_SEED, "lora_b_std": LORA_B_STD,
        "file_keys": "every <key> in grad.<key> / after_adamw.<key> is the key of the starting value in "
                     "lora/adapter_model.safetensors (same shape; asserted)",
        "data": os.path.relpath(TRAIN_DIR / "data.jsonl", HF_F32 / "expected"),
        "adamw": "torch.optim.AdamW(lora params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, "
                 "amsgrad=False, maximize=False, foreach=False), one group, one step() from fresh state",
        "adamw_lr": ADAMW["lr"], "adamw_beta1": ADAMW["betas"][0], "adamw_beta2": ADAMW["betas"][1],
        "adamw_eps": ADAMW["eps"], "adamw_weight_decay": ADAMW["weight_decay"],
        "loss_float64": repr(loss64.item()),
        "base_line_losses": json.dumps(base_losses),
        "base_mean": repr(mean_base),
        "merged_line_losses": json.dumps(merged_losses),
        "stat_mean_rel_change_vs_base": repr(mean_rel_change),
        "stat_base_line_loss_rel_vs_losses_json": json.dumps(base_rel),
        "stat_merged_max_rel": repr(max(merged_rel)),
        "stat_reload_line_loss_rel": json.dumps(reload_rel),
        "stat_grad_norms": json.dumps(grad_norms),
        "stat_grad_rel_f32_vs_f64": json.dumps(grad_rel),
        "stat_adamw_max_abs_vs_formula": by_hand,
        "stat_adamw_max_abs_vs_f64_grads": vs64,
        **{f"version_{k}": v for k, v in versions.items()},
    }
    out = HF_F32 / "expected" / "lora.safetensors"
    save_expected(out, tensors, meta)
    print(f"lora: loss {loss.item():.6f} (base {mean_base:.6f}, rel change {mean_rel_change:.3g}; float64 "
          f"{loss64.item():.6f}), {len(keys)} tensors, {out.stat().st_size} bytes; max rel |g32 - g64| "
          f"{max(grad_rel.values()):.3g}, merged vs unmerged {max(merged_rel):.3g}, reload {max(reload_rel):.3g}, "
          f"AdamW vs formula {by_hand:.3g}, vs float64 grads {vs64:.3g}")
    print(f"  line losses {line_losses.tolist()}")
    for k in keys.values():
        print(f"  {k:<84} {str(list(grads[k].shape)):<10} |g| {grad_norms[k]:.6g}")


def cmd_check_adapter(args) -> None:
    """Read-only: hf-tiny (float32) + PeftModel.from_pretrained(model, --adapter): one JSON line on stdout with
    the per-line losses of data.jsonl (grads' definitions, unmerged) and their mean; everything else on stderr."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        torch_setup()
        model, processor, ids, vision_size, vq_size = loss_setup()
        pm = lora_load_adapter(model, Path(args.adapter))
        losses = data_line_losses(pm.get_base_model(), processor, ids, vision_size, vq_size)
    print_losses_json(losses)


def safetensors_shapes(folder: Path) -> dict:
    """{key: shape} of every tensor in the folder's *.safetensors files (headers only)."""
    from safetensors import safe_open

    out = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no *.safetensors file")
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert k not in out, (k, f)
                out[k] = list(h.get_slice(k).get_shape())
    return out


def cmd_check_model(args) -> None:
    """Read-only: JanusForConditionalGeneration.from_pretrained(--model) in float32 (a complete transformers-layout
    folder, e.g. a fine-tuned copy of hf-tiny): the same JSON line as check-adapter. Asserts that the folder's
    safetensors hold the same keys and shapes as hf-tiny's."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        torch_setup()
        folder = Path(args.model)
        got, want = safetensors_shapes(folder), safetensors_shapes(HF_F32)
        assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
        bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert not bad, bad
        model, processor, ids, vision_size, vq_size = loss_setup(
            folder, Path(args.processor) if args.processor else None)
        losses = data_line_losses(model, processor, ids, vision_size, vq_size)
    print_losses_json(losses)


# ------------------------------------------------------------------------------------------------
# Multi-turn understanding samples (turns.jsonl): shared definition, transformers layout
# ------------------------------------------------------------------------------------------------
TURN_SENTINEL = "\ue000"          # U+E000 (private use): stands for every earlier assistant answer while rendering
TURN_LINES = [
    {"task": "understand", "turns": [
        {"role": "user", "content": "What is in this picture?", "images": ["cat.png"]},
        {"role": "assistant", "content": "A cat asleep on a sofa."},
        {"role": "user", "content": "What color is it?"},
        {"role": "assistant", "content": "It is grey with white paws."}]},
    {"task": "understand", "turns": [
        {"role": "system", "content": "You are a careful assistant that answers briefly."},
        {"role": "user", "content": "Describe the first picture.", "images": ["dog.png"]},
        {"role": "assistant", "content": "A dog on the grass."},
        {"role": "user", "content": "And this one?", "images": ["bird.png"]},
        {"role": "assistant", "content": "A small bird on a branch."}]},
]
TURNS_SINGLE_CHECK_LINE = 1       # index in data.jsonl of the understand line the K = 1 check rebuilds

TURN_DEFINITIONS = (
    "A multi-turn understanding sample is {'task': 'understand', 'turns': T}: optional leading system turns, then "
    "user / assistant turns alternating, starting with a user turn and ending with an assistant turn; only user "
    "turns carry 'images' (file names relative to turns.jsonl). A_1..A_K are the assistant turns in order. "
    "(1) Render the reference's answering prompt (the one the single-turn understand lines get, ending with the "
    "assistant cue, add_generation_prompt) of T without A_K, every other assistant turn's content replaced by the "
    "sentinel S = U+E000; each user turn's images are placed as the single-turn lines place a question's images. "
    "(2) Split the rendered text at S into p_0..p_{K-1}; for i >= 1 drop a leading EOS text "
    "'<｜end▁of▁sentence｜>' from p_i; right-strip whitespace from every piece that precedes a sentinel "
    "(p_0..p_{K-2}); the last piece p_{K-1} (the final assistant cue) is kept as rendered. "
    "(3) ids = tokenizer(p_0) WITH special tokens (BOS first, as the single-turn prompt is encoded), then for "
    "k = 1..K: answer_k = tokenizer.encode(content of A_k, add_special_tokens=False) + [EOS], and after answer_k "
    "for k < K the ids of tokenizer(p_k) WITHOUT special tokens: p_0, answer_1, p_1, answer_2, ..., p_{K-1}, "
    "answer_K. (4) Every <image_placeholder> id of a prompt piece is expanded to <begin_of_image> + N x "
    "<image_placeholder> + <end_of_image> (N image tokens per image), and the images' features fill those "
    "placeholders in turn order (first image of the first user turn first), as in the single-turn lines. "
    "(5) Targets: every id of every answer_k (its EOS included), each predicted from the logits at the position "
    "just before it; target_positions = the indices of the targets in input_ids (after expansion); loss = ONE "
    "mean cross-entropy (torch.nn.functional.cross_entropy, float32) over all targets of the sample (not a mean "
    "of per-turn means). losses[i] = examples[i].loss for line i of turns.jsonl; mean = their unweighted mean. "
    "pieces = p_0..p_{K-1} as tokenized (after step 2). For K = 1 this is exactly the single-turn understand "
    "definition: the script rebuilds line " + str(TURNS_SINGLE_CHECK_LINE + 1) + " of data.jsonl as turns "
    "[user (question, images), assistant (answer)] and asserts that its input_ids and targets equal that line's "
    "example in the layout's losses.json and its loss equals, bit for bit, the loss the single-turn understand "
    "code gives now (and the stored one within 1e-6 relative: it may come from another CPU) (single_turn_check). "
    "Cross-check (asserted within 1e-5 relative): the causal-LM loss with labels = -100 everywhere but the target "
    "positions. Note: every answer is encoded alone (no leading space), as the single-turn lines encode theirs, so "
    "input_ids are NOT the tokenization of the conversation rendered with its answers in place (there the first "
    "answer token carries the space the template writes after '<|Assistant|>:', e.g. ' A' instead of 'A'). "
)

HF_TURN_DEFINITIONS = TURN_DEFINITIONS + (
    "Layout: transformers; model, processor, tokenizer, images and float32 forward exactly as in "
    "hf-tiny/expected/losses.json (loss_setup: hf-tiny, eager attention, PIL image processor). Rendering: "
    "DEFAULT_SYSTEM_PROMPT (transformers.models.janus.processing_janus: the processor prepends it to the text in "
    "generation_mode 'text' because use_default_system_prompt is true; = the official system prompt + '\\n\\n') + "
    "processor.apply_chat_template(messages, add_generation_prompt=True) with messages = a {'role': 'system', "
    "'content': [{'type': 'text', 'text': t.strip()}]} per system turn (the chat template renders it as "
    "'System: ' + text + '<｜end▁of▁sentence｜>', after the default system prompt, which stays), a {'role': "
    "'user', 'content': [{'type': 'image'}] * n + [{'type': 'text', 'text': content.strip()}]} per user turn and "
    "a {'role': 'assistant', 'content': [{'type': 'text', 'text': S}]} per remaining assistant turn (rendered "
    "'<|Assistant|>: ' + S + '<｜end▁of▁sentence｜>'). p_0 is encoded as processor(text=p_0 without the default "
    "system prompt, images=p_0's images) encodes it (asserted equal). N = processor.num_image_tokens; "
    "pixel_values = the processor's, of all the sample's images in turn order; logits = model(input_ids, "
    "pixel_values).logits."
)


def write_turns_data() -> None:
    """tests/fixtures/train/turns.jsonl (TURN_LINES); its images are the understanding images of data.jsonl."""
    names = {n for n, kind in TRAIN_IMAGES if kind == "vision"}
    for line in TURN_LINES:
        for t in line["turns"]:
            assert set(t.get("images", [])) <= names, t
    lines = [json.dumps(line, ensure_ascii=False) for line in TURN_LINES]
    (TRAIN_DIR / "turns.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def turn_lines() -> list:
    lines = [json.loads(s) for s in (TRAIN_DIR / "turns.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == TURN_LINES, "turns.jsonl differs from TURN_LINES: run `make_fixtures.py loss-turns`"
    return lines


def turns_split(turns: list) -> tuple:
    """(system texts, the rest) of a valid turn list (see TURN_DEFINITIONS); asserts the shape."""
    n_sys = 0
    while n_sys < len(turns) and turns[n_sys]["role"] == "system":
        n_sys += 1
    body = turns[n_sys:]
    assert body and len(body) % 2 == 0, turns
    for j, t in enumerate(body):
        assert t["role"] == ("user" if j % 2 == 0 else "assistant"), turns
        assert t["role"] == "user" or "images" not in t, t
        assert IMAGE not in t["content"] and TURN_SENTINEL not in t["content"], t
    assert all("images" not in t and TURN_SENTINEL not in t["content"] for t in turns[:n_sys]), turns
    return [t["content"] for t in turns[:n_sys]], body


def turns_images(turns: list) -> list:
    """The sample's image names in turn order."""
    return [name for t in turns for name in t.get("images", [])]


def turn_pieces(rendered: str, k: int) -> list:
    """Step (2) of TURN_DEFINITIONS: p_0..p_{K-1}."""
    raw = rendered.split(TURN_SENTINEL)
    assert len(raw) == k, (len(raw), k, rendered)
    pieces = []
    for i, p in enumerate(raw):
        if i >= 1 and p.startswith(EOS):
            p = p[len(EOS):]
        if i < k - 1:
            p = p.rstrip()
        pieces.append(p)
    return pieces


def turn_ids(pieces: list, answers: list, encode_first, encode_rest, encode_answer, ids: dict, n_image: int) -> dict:
    """Steps (3)-(5) of TURN_DEFINITIONS: expanded input_ids, target positions and targets. encode_first /
    encode_rest / encode_answer: text -> ids with BOS / without special tokens / answer without special tokens."""
    assert len(pieces) == len(answers)
    seq = [(t, False) for t in encode_first(pieces[0])]
    assert seq[0][0] == ids[BOS] and [t for t, _ in seq].count(ids[BOS]) == 1, seq
    for k, answer in enumerate(answers):
        a = encode_answer(answer)
        assert a and ids[BOS] not in a and ids[IMAGE] not in a and ids[EOS] not in a, (answer, a)
        seq += [(t, True) for t in a + [ids[EOS]]]
        if k + 1 < len(answers):
            rest = encode_rest(pieces[k + 1])
            assert ids[BOS] not in rest, rest
            seq += [(t, False) for t in rest]
    input_ids, positions = [], []
    for t, is_target in seq:
        if t == ids[IMAGE]:
            assert not is_target
            input_ids += [ids[BOI]] + [ids[IMAGE]] * n_image + [ids[EOI]]
        else:
            if is_target:
                positions.append(len(input_ids))
            input_ids.append(t)
    assert positions and positions[0] >= 1
    return {"input_ids": input_ids, "target_positions": positions,
            "targets": [input_ids[p] for p in positions]}


def turn_loss(logits, input_ids, positions):
    """Step (5): one mean CE over the targets, each from the logits one position before it."""
    import torch
    import torch.nn.functional as F

    pos = torch.tensor(positions, dtype=torch.int64)
    return F.cross_entropy(logits[pos - 1], input_ids[0, pos])


def single_turn_as_turns(line: dict) -> list:
    """A single-turn understand line of data.jsonl as a turn list."""
    assert line["task"] == "understand", line
    return [{"role": "user", "content": line["question"], "images": list(line["images"])},
            {"role": "assistant", "content": line["answer"]}]


def hf_turn_messages(turns: list) -> list:
    """transformers messages of T without A_K, earlier answers replaced by the sentinel (step 1)."""
    systems, body = turns_split(turns)
    messages = [{"role": "system", "content": [{"type": "text", "text": s.strip()}]} for s in systems]
    for t in body[:-1]:
        if t["role"] == "user":
            messages.append({"role": "user", "content": api_parts(t["content"], len(t.get("images", [])))})
        else:
            messages.append({"role": "assistant", "content": api_parts(TURN_SENTINEL, 0)})
    return messages


def hf_turn_example(model, processor, ids, turns: list, vision_size: int):
    """One multi-turn sample through transformers' Janus (see HF_TURN_DEFINITIONS): (example, stats)."""
    import torch
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    assert DEFAULT_SYSTEM_PROMPT == SYSTEM_PROMPT + "\n\n" and processor.use_default_system_prompt
    tok = processor.tokenizer
    systems, body = turns_split(turns)
    answers = [t["content"] for t in body if t["role"] == "assistant"]
    template = processor.apply_chat_template(hf_turn_messages(turns), add_generation_prompt=True)
    rendered = DEFAULT_SYSTEM_PROMPT + template                     # the text the processor tokenizes
    pieces = turn_pieces(rendered, len(answers))
    n = processor.num_image_tokens
    built = turn_ids(pieces, answers,
                     lambda s: tok(s)["input_ids"],
                     lambda s: tok(s, add_special_tokens=False)["input_ids"],
                     lambda s: tok(s, add_special_tokens=False)["input_ids"], ids, n)
    names = turns_images(turns)
    images = [train_image(name, vision_size) for name in names]
    # p_0 through the processor itself (default system prompt, BOS, image expansion), as cmd_loss encodes a prompt
    assert pieces[0].startswith(DEFAULT_SYSTEM_PROMPT)
    n0 = pieces[0].count(IMAGE)
    first = processor(text=pieces[0][len(DEFAULT_SYSTEM_PROMPT):], images=images[:n0] or None,
                      return_tensors="pt")["input_ids"][0].tolist()
    assert built["input_ids"][:len(first)] == first, (first, built["input_ids"][:len(first)])
    # pixel_values: the processor's, for all images in turn order (its own prompt has one placeholder per image)
    inputs = processor(text=template, images=images, return_tensors="pt")
    assert int((inputs["input_ids"] == ids[IMAGE]).sum()) == len(images) * n
    pv = inputs["pixel_values"].float()
    x = torch.tensor([built["input_ids"]], dtype=torch.int64)
    assert int((x == ids[IMAGE]).sum()) == len(images) * n and pv.shape[0] == len(images)
    with torch.no_grad():
        logits = model(input_ids=x, pixel_values=pv).logits[0]
        loss = turn_loss(logits, x, built["target_positions"])
        labels = torch.full_like(x, -100)
        labels[0, built["target_positions"]] = x[0, built["target_positions"]]
        check = model(input_ids=x, pixel_values=pv, labels=labels).loss
    assert abs(check.item() - loss.item()) <= 1e-5 * abs(loss.item()), (check.item(), loss.item())
    example = {"task": "understand", "input_ids": built["input_ids"], "target_positions": built["target_positions"],
               "targets": built["targets"], "loss": float(loss), "pieces": pieces}
    return example, {"cross_check_rel": abs(check.item() / loss.item() - 1), "rendered": rendered}


def turns_single_check(example: dict, fresh: dict, reference: dict, label: str) -> dict:
    """Asserts that the K = 1 rebuild of a data.jsonl understand line gives that line's single-turn example: the
    same input_ids and targets as its losses.json example and bit for bit the loss of the single-turn code run now
    (`fresh`); the loss stored in losses.json may have been computed on another CPU, so it is only asserted within
    1e-6 relative (the difference is recorded)."""
    ref = reference["examples"][TURNS_SINGLE_CHECK_LINE]
    assert ref["task"] == "understand" and fresh["task"] == "understand"
    assert example["input_ids"] == ref["input_ids"] == fresh["input_ids"], f"{label}: K = 1 input_ids differ"
    assert example["targets"] == ref["targets"] == fresh["targets"], f"{label}: K = 1 targets differ"
    L = len(ref["input_ids"]) - len(ref["targets"])
    assert example["target_positions"] == list(range(L, len(ref["input_ids"])))
    assert example["loss"] == fresh["loss"], (label, example["loss"], fresh["loss"])
    rel = abs(example["loss"] / ref["loss"] - 1)
    assert rel <= 1e-6, (label, example["loss"], ref["loss"])
    return {"data_line": TURNS_SINGLE_CHECK_LINE + 1, "loss": example["loss"], "input_ids_equal": True,
            "loss_equal_single_turn_code": True, "loss_rel_diff_losses_json": rel}


def turns_record(examples: list, check: dict, definitions: str, data_rel: str, versions: dict) -> dict:
    losses = [ex["loss"] for ex in examples]
    return {
        "data": data_rel,
        "losses": losses,
        "mean": sum(losses) / len(losses),
        "single_turn_check": check,
        "examples": examples,
        "definitions": definitions,
        "versions": versions,
    }


def print_turn_example(step: str, i: int, ex: dict, st: dict) -> None:
    print(f"{step}: line {i + 1} loss {ex['loss']:.6f}  {len(ex['input_ids'])} ids, {len(ex['targets'])} targets, "
          f"cross_check_rel {st['cross_check_rel']:.3g}", flush=True)
    print(f"{step}:   rendered {st['rendered']!r}", flush=True)


def cmd_loss_turns(args) -> None:
    """tests/fixtures/train/turns.jsonl and hf-tiny/expected/losses_turns.json: the multi-turn answer loss of each
    line through transformers' Janus (see TURN_DEFINITIONS / HF_TURN_DEFINITIONS)."""
    torch_setup()
    model, processor, ids, vision_size, vq_size = loss_setup()
    if not (TRAIN_DIR / "data.jsonl").exists():
        raise SystemExit(f"{TRAIN_DIR / 'data.jsonl'} is missing: run `make_fixtures.py loss` first")
    write_turns_data()
    single = train_lines()[TURNS_SINGLE_CHECK_LINE]
    ex, _ = hf_turn_example(model, processor, ids, single_turn_as_turns(single), vision_size)
    fresh, _ = loss_understand(model, processor, ids, single, vision_size)
    check = turns_single_check(ex, fresh, read_json(HF_F32 / "expected" / "losses.json"), "loss-turns")
    examples = []
    for i, line in enumerate(turn_lines()):
        ex, st = hf_turn_example(model, processor, ids, line["turns"], vision_size)
        examples.append(ex)
        print_turn_example("loss-turns", i, ex, st)
    record = turns_record(examples, check, HF_TURN_DEFINITIONS,
                          os.path.relpath(TRAIN_DIR / "turns.jsonl", HF_F32 / "expected"), env_versions())
    write_compact_json(HF_F32 / "expected" / "losses_turns.json", record, list_key="examples")
    print(f"loss-turns: {len(examples)} lines, mean {record['mean']:.6f}; K = 1 check of data.jsonl line "
          f"{check['data_line']}: ids equal, loss {check['loss']!r} equal to the single-turn code's "
          f"(losses.json: rel diff {check['loss_rel_diff_losses_json']:.3g})")


# ------------------------------------------------------------------------------------------------
# The same training lines through the official DeepSeek code (original layout)
# ------------------------------------------------------------------------------------------------
def train_image_as_stored(name: str):
    """A training image (PNG -> RGB) at the size it was written (square; checked against its source)."""
    from PIL import Image

    with Image.open(TRAIN_DIR / name) as im:
        w, h = im.size
    assert w == h, (name, w, h)
    return train_image(name, w)


def original_vq_input(proc, image, size: int):
    """VQ input of one image as janus-rs makes it (preprocess_for_vq): torchvision Resize(size, BICUBIC,
    antialias) (the short side to `size`, Pillow bicubic on a PIL image) + CenterCrop(size), then
    (u8/255 - 0.5)/0.5, NCHW float32. Returns (x, crop_u8)."""
    import numpy as np
    import torch
    import torchvision.transforms as T
    from PIL import Image

    pil = Image.fromarray(image)
    crop = np.asarray(T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC,
                                                  antialias=True)(pil)))
    h, w = image.shape[:2]
    if h == w:
        # a square image: the same pixels as Pillow's own bicubic resize, and as the official
        # understanding preprocessing (VLMImageProcessor.resize: bicubic to the image size, nothing to pad)
        assert np.array_equal(crop, np.asarray(pil.resize((size, size), Image.BICUBIC)))
        if proc.image_processor.image_size == size:
            assert np.array_equal(crop, proc.image_processor.resize(pil).transpose(1, 2, 0))
    x = (torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    return x, crop


# The official VQ has 16384 codes of width 8 and a 64x64 training image gives 576 positions, so on these
# random weights a few positions have a best-vs-second gap under MIN_CODE_GAP (fox.png 15, min 4.8e-5;
# lake.png 8, min 2.4e-5).
# The generate examples list them (near_tie_positions); the hard floor is this one, 10x the largest change
# of an official encode gap between two CPUs (9.5e-7, vq_preprocess.safetensors regenerated elsewhere).
ORIGINAL_MIN_CODE_GAP = 1e-5


def original_loss_generate(model, proc, ids, line, vq_size):
    """Teacher-forced image-token loss of one `generate` line through the official code
    (see ORIGINAL_LOSS_DEFINITIONS)."""
    import torch
    import torch.nn.functional as F

    tok = proc.tokenizer
    lm = model.language_model
    vq = model.gen_vision_model
    text = original_generation_prompt(proc, line["prompt"])
    # janus-rs's generation prompt (PromptFormat::generation_prompt, no chat template) + <begin_of_image>
    assert text == f"{USER}: {line['prompt'].strip()}\n\n{ASSISTANT}:{BOI}", text
    P = tok.encode(text)
    assert P[0] == ids[BOS] and P[-1] == ids[BOI] and P.count(ids[BOS]) == 1, P
    prompt = torch.tensor([P], dtype=torch.int64)
    x, _ = original_vq_input(proc, train_image_as_stored(line["image"]), vq_size)
    with torch.no_grad():
        quant, _, info = vq.encode(x)
        codes = info[2].reshape(-1).to(torch.int64)                 # [N], row-major over the grid
        n = codes.numel()
        grid = vq_size // 2 ** (len(vq.config.encoder_ch_mult) - 1)
        assert tuple(quant.shape[-2:]) == (grid, grid) and n == grid * grid, (quant.shape, n)
        # the same codes by hand, and every position's gap between the best and the second-best code
        h = vq.quant_conv(vq.encoder(x))
        z = F.normalize(h.permute(0, 2, 3, 1).reshape(n, -1), p=2, dim=-1)
        e = F.normalize(vq.quantize.embedding.weight, p=2, dim=-1)
        d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.T
        assert torch.equal(d.argmin(1), codes)
        d64 = torch.cdist(z.double(), e.double()) ** 2
        assert torch.equal(d64.argmin(1), codes)
        top2 = torch.topk(d64, 2, dim=1, largest=False).values
        gaps = top2[:, 1] - top2[:, 0]

        # loss: one causal pass over [embed_tokens(P); gen_aligner(gen_embed(c[:N-1]))]
        emb = torch.cat([lm.get_input_embeddings()(prompt), model.prepare_gen_img_embeds(codes[None, :-1])], 1)
        hidden = lm.model(inputs_embeds=emb, use_cache=False).last_hidden_state[0]
        L = prompt.shape[1]
        scores = model.gen_head(hidden[L - 1:L - 1 + n])            # [N, image_token_size]
        loss = F.cross_entropy(scores, codes)
        # cross-check: the generation loop's path (generation_inference.py: prefill, then one code at a
        # time through the KV cache), log-softmax + gather by hand
        out = lm.model(inputs_embeds=lm.get_input_embeddings()(prompt), use_cache=True)
        nll = []
        for i in range(n):
            logp = torch.log_softmax(model.gen_head(out.last_hidden_state[0, -1]), -1)
            nll.append(-logp[codes[i]])
            if i + 1 < n:
                step = model.prepare_gen_img_embeds(codes[i:i + 1]).unsqueeze(0)   # [1, 1, D]
                out = lm.model(inputs_embeds=step, use_cache=True, past_key_values=out.past_key_values)
        check = torch.stack(nll).mean()
    assert abs(check.item() - loss.item()) <= 1e-5 * abs(loss.item()), (check.item(), loss.item())
    c = codes.tolist()
    near = torch.nonzero(gaps < MIN_CODE_GAP).reshape(-1).tolist()
    return {"task": "generate", "input_ids": P, "codes": c, "targets": c, "loss": float(loss),
            "codes_l2norm": c, "loss_l2norm": float(loss),
            "min_code_gap": float(gaps.min()), "near_tie_positions": near}, {
        "min_code_gap": float(gaps.min()), "codes_below_1e-3": len(near),
        "distinct_codes": int(codes.unique().numel()), "cross_check_rel": abs(check.item() / loss.item() - 1)}


def original_loss_understand(model, proc, ids, line):
    """Answer + EOS loss of one `understand` line through the official code (see ORIGINAL_LOSS_DEFINITIONS)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    tok = proc.tokenizer
    lm = model.language_model
    images = [train_image_as_stored(name) for name in line["images"]]
    pils = [Image.fromarray(im) for im in images]
    conversation = original_understanding_conversation(line["question"], line["images"])
    prep = proc(conversations=conversation, images=pils, force_batchify=True)
    prompt = prep.input_ids[0].clone()
    assert bool(prep.attention_mask.all()), "one sample: no padding"
    k = proc.num_image_tokens
    # janus-rs's understanding prompt (SFT format, system prompt, one placeholder line per image before
    # the question), tokenised, each placeholder expanded to <begin_of_image> + k x <image_placeholder>
    # + <end_of_image>
    placed = (f"{IMAGE}\n" * len(images) + line["question"].strip()).strip()
    text = f"{SYSTEM_PROMPT}\n\n{USER}: {placed}\n\n{ASSISTANT}:"
    assert prep.sft_format[0] == text, prep.sft_format[0]
    built = []
    for t in tok.encode(text):
        built += [ids[BOI]] + [ids[IMAGE]] * k + [ids[EOI]] if t == ids[IMAGE] else [t]
    assert prompt.tolist() == built
    assert prompt[0].item() == ids[BOS] and int((prompt == ids[IMAGE]).sum()) == len(images) * k
    # pixel_values: the official VLMImageProcessor (bicubic to the image size, padded to a square)
    pv = prep.pixel_values.float()                                 # [1, n, 3, S, S]
    for j, pil in enumerate(pils):
        u8 = torch.from_numpy(np.ascontiguousarray(proc.image_processor.resize(pil))).double()
        assert (pv[0, j].double() - (u8 / 255 - 0.5) / 0.5).abs().max().item() < 1e-6
    answer = tok.encode(line["answer"], add_special_tokens=False)
    assert answer and ids[BOS] not in answer and ids[IMAGE] not in answer, answer
    targets = answer + [tok.eos_token_id]
    full = torch.cat([prompt, torch.tensor(targets, dtype=torch.int64)])[None]
    L = prompt.shape[0]
    with torch.no_grad():
        emb = model.prepare_inputs_embeds(input_ids=prep.input_ids.clone(), pixel_values=pv,
                                          images_seq_mask=prep.images_seq_mask,
                                          images_emb_mask=prep.images_emb_mask)
        emb = torch.cat([emb, lm.get_input_embeddings()(full[:, L:])], dim=1)
        logits = lm(inputs_embeds=emb, use_cache=False).logits[0]  # lm_head over the final hidden states
        loss = F.cross_entropy(logits[L - 1:full.shape[1] - 1], full[0, L:])
        # cross-check: transformers' own causal-LM loss (labels, -100 on the prompt positions)
        labels = full.clone()
        labels[0, :L] = -100
        check = lm(inputs_embeds=emb, labels=labels, use_cache=False).loss
    assert abs(check.item() - loss.item()) <= 1e-5 * abs(loss.item()), (check.item(), loss.item())
    return {"task": "understand", "input_ids": full[0].tolist(), "targets": targets, "loss": float(loss)}, {
        "cross_check_rel": abs(check.item() / loss.item() - 1)}


def original_loss_text(model, proc, ids, line):
    """Next-token loss of one `text` line through the official code's language model."""
    import torch
    import torch.nn.functional as F

    tok = proc.tokenizer
    tok_ids = tok.encode(line["text"])
    assert tok_ids[0] == ids[BOS] and tok_ids.count(ids[BOS]) == 1 and ids[EOS] not in tok_ids, tok_ids
    x = torch.tensor([tok_ids], dtype=torch.int64)
    lm = model.language_model
    with torch.no_grad():
        logits = lm(input_ids=x, use_cache=False).logits[0]
        loss = F.cross_entropy(logits[:-1], x[0, 1:])
        check = lm(input_ids=x, labels=x, use_cache=False).loss      # transformers' causal-LM loss
    assert abs(check.item() - loss.item()) <= 1e-5 * abs(loss.item()), (check.item(), loss.item())
    return {"task": "text", "input_ids": tok_ids, "targets": tok_ids[1:], "loss": float(loss)}, {
        "cross_check_rel": abs(check.item() / loss.item() - 1)}


ORIGINAL_LOSS_DEFINITIONS = (
    "Model: the original-layout checkpoint of gen_original.py ($JANUS_FIXTURE_CACHE/original-tiny/safetensors, "
    "bfloat16 values, config and tokenizer files = tests/fixtures/original-tiny) loaded by the official DeepSeek "
    "code (deepseek-ai/Janus MultiModalityCausalLM.from_pretrained, transformers 4.57.1), upcast to float32, eager "
    "attention, eval, no grad, CPU, 1 thread; processor and tokenizer: the official VLChatProcessor of the same "
    "folder (sft format deepseek, its system prompt). Images: the PNG files named in data.jsonl (64x64), decoded "
    "to RGB. Every cross-entropy is torch.nn.functional.cross_entropy in float32, mean over the listed targets. "
    "generate: P = tokenizer.encode(prompt) of prompt = apply_sft_template_for_multi_turn_prompts([{'role': "
    "'<|User|>', 'content': prompt}, {'role': '<|Assistant|>', 'content': ''}], system_prompt='') + "
    "'<begin_of_image>' (generation_inference.py; = '<|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>', BOS "
    "first) = input_ids. VQ input: the image's short side resized to S = vision image size (384; the VQ-16 grid "
    "is S/16 = 24, the 576 tokens the official generation makes) with Pillow bicubic (torchvision Resize(S, "
    "BICUBIC, antialias) on the PIL image), centre-cropped to S x S (torchvision CenterCrop), x = (u8/255 - "
    "0.5)/0.5, NCHW; the 64x64 images are upscaled 6x (the same pixels as VLMImageProcessor's resize). codes c = "
    "gen_vision_model.encode(x)[2][2] (the official VectorQuantizer, codebook_l2_norm: nearest l2-normalised "
    "codebook row to the l2-normalised latent), row-major over the 24 x 24 grid, N = 576 codes. Input embeddings "
    "= [language_model.get_input_embeddings()(P); prepare_gen_img_embeds(c[0..N-1)) = gen_aligner(gen_embed(.))]; "
    "last_hidden_state of language_model.model over them (after the final norm; causal, no cache, positions "
    "0..); scores = gen_head(hidden) at positions len(P)-1 .. len(P)+N-2, so <begin_of_image> predicts c[0]; "
    "targets = c; loss = mean CE over the N codes. There is one quantizer here, so codes_l2norm = codes, "
    "loss_l2norm = loss, losses_l2norm = losses and mean_l2norm = mean (kept for the schema of "
    "hf-tiny/expected/losses.json). "
    "understand: prompt = VLChatProcessor(conversations=[{'role': '<|User|>', 'content': '<image_placeholder>\\n' "
    "* n + question}, {'role': '<|Assistant|>', 'content': ''}], images=[the line's images]).input_ids (system "
    "prompt + '\\n\\n<|User|>: ' + the placeholders and question + '\\n\\n<|Assistant|>:', BOS first, each "
    "placeholder expanded to <begin_of_image> + 576 x <image_placeholder> + <end_of_image>); pixel_values: "
    "VLMImageProcessor (bicubic to 384 x 384, padded to a square: nothing to pad here; (u8/255 - 0.5)/0.5); "
    "input_ids = prompt + tokenizer.encode(answer, add_special_tokens=False) + [EOS]; input embeddings = "
    "prepare_inputs_embeds(prompt, pixel_values, images_seq_mask, images_emb_mask) (aligner(vision_model(.)) "
    "at the placeholders) followed by the token embeddings of the answer and EOS; logits = "
    "language_model(inputs_embeds).logits (lm_head over the final hidden states); targets = the answer ids and "
    "EOS, each predicted from the position before it; loss = mean CE over them. "
    "text: input_ids = tokenizer.encode(text) (BOS from the tokenizer, add_bos_token true; no EOS); logits = "
    "language_model(input_ids).logits; targets = input_ids[1:], each predicted from the position before it. "
    "losses[i] = examples[i].loss for line i of data.jsonl; mean = their unweighted mean (float64 sum / count). "
    "Cross-checks (asserted within 1e-5 relative): understand and text against language_model(..., "
    "labels=...).loss (transformers 4.57.1 LlamaForCausalLM's ForCausalLMLoss; labels -100 on the prompt "
    "positions); generate against the generation loop's path: a prefill over P, then one code embedding at a "
    "time through past_key_values, log-softmax of gen_head and a gather by hand. The prompts equal janus-rs's "
    "SFT-format strings (asserted). min_code_gap (generate lines): the smallest second-best minus best squared "
    "distance (float64, l2-normalised vectors) over the N positions; near_tie_positions: the positions (row-major "
    f"indices into codes) where that gap is below {MIN_CODE_GAP:g}, where another float32 implementation may pick "
    f"the other code (every gap is asserted to be at least {ORIGINAL_MIN_CODE_GAP:g})."
)


def official_loss_setup(args):
    """The official model and processor on the gen_original.py checkpoint (checked to be current), and the
    special-token ids, checked against the tokenizer fixture and the processor's own settings."""
    torch_setup()
    from janus.models import VLChatProcessor

    cache = fixture_cache(args) / "original-tiny"
    stamp = read_json(cache / "STAMP.json")
    if stamp.get("data_sha256") != read_json(MANIFEST).get("data_sha256"):
        raise SystemExit(f"{cache} is stale or missing: run tests/reference/gen_original.py first")
    folder = cache / "safetensors"
    model = load_official(folder)
    proc = VLChatProcessor.from_pretrained(str(folder))
    tok = proc.tokenizer
    ids = {s: tok.vocab[s] for s in tokenizer_strings()}
    assert ids == read_json(TOKENIZER_DIR / "tokenize.json")["special_token_ids"], ids
    assert read_json(folder / "tokenizer_config.json")["add_bos_token"] is True and tok.add_bos_token
    assert tok.bos_token_id == ids[BOS] and tok.eos_token_id == ids[EOS] and proc.image_id == ids[IMAGE]
    assert proc.image_start_id == ids[BOI] and proc.image_end_id == ids[EOI] and proc.pad_id == ids[PAD]
    assert proc.system_prompt == SYSTEM_PROMPT and proc.sft_format == "deepseek" and not proc.add_special_token
    return model, proc, ids


def cmd_loss_original(args) -> None:
    """original-tiny/expected/losses.json: the losses of tests/fixtures/train/data.jsonl through the official
    DeepSeek code on the gen_original.py checkpoint (same schema as hf-tiny/expected/losses.json)."""
    model, proc, ids = official_loss_setup(args)
    vision_size = model.config.vision_config.params.image_size
    assert proc.image_processor.image_size == vision_size
    assert proc.num_image_tokens == (vision_size // 16) ** 2          # SigLIP-L/16
    vq_size = vision_size                                             # janus-rs: VQ grid = vision size / 16
    if not (TRAIN_DIR / "data.jsonl").exists():
        raise SystemExit(f"{TRAIN_DIR / 'data.jsonl'} is missing: run `make_fixtures.py loss` first")

    examples, stats = [], []
    for line in (json.loads(s) for s in (TRAIN_DIR / "data.jsonl").read_text(encoding="utf-8").splitlines()):
        if line["task"] == "generate":
            ex, st = original_loss_generate(model, proc, ids, line, vq_size)
        elif line["task"] == "understand":
            ex, st = original_loss_understand(model, proc, ids, line)
        else:
            ex, st = original_loss_text(model, proc, ids, line)
        examples.append(ex)
        stats.append(st)
        print(f"loss-original: {line['task']:<10} {ex['loss']:.6f}  {len(ex['input_ids'])} ids, "
              f"{len(ex['targets'])} targets  " + ", ".join(f"{k}={v:.3g}" for k, v in st.items()), flush=True)
        if "min_code_gap" in st and st["min_code_gap"] < ORIGINAL_MIN_CODE_GAP:
            raise SystemExit(f"loss-original: a VQ code of {line['image']} is nearly tied "
                             f"(gap {st['min_code_gap']:.3g} < {ORIGINAL_MIN_CODE_GAP:g})")
    losses = [ex["loss"] for ex in examples]
    record = {
        "data": os.path.relpath(TRAIN_DIR / "data.jsonl", ORIGINAL_DIR / "expected"),
        "losses": losses,
        "mean": sum(losses) / len(losses),
        "losses_l2norm": losses,
        "mean_l2norm": sum(losses) / len(losses),
        "examples": examples,
        "definitions": ORIGINAL_LOSS_DEFINITIONS,
        "versions": {**env_versions(), "official_code_commit": official_commit()},
    }
    write_compact_json(ORIGINAL_DIR / "expected" / "losses.json", record, list_key="examples")
    print(f"loss-original: {len(losses)} lines, mean {record['mean']:.6f}; sizes vision {vision_size}, VQ {vq_size}")


ORIGINAL_TURN_DEFINITIONS = TURN_DEFINITIONS + (
    "Layout: the official DeepSeek code; model, VLChatProcessor, tokenizer, images and float32 forward exactly as "
    "in original-tiny/expected/losses.json. Rendering: VLChatProcessor.apply_sft_template_for_multi_turn_prompts("
    "conversation, sft_format='deepseek', system_prompt=P) (each content stripped, then the whole prompt "
    "stripped), P = the system turns' texts joined by '\\n\\n' when there are any (replacing the default), else "
    "the processor's own system prompt; conversation = {'role': '<|User|>', 'content': '<image_placeholder>\\n' * "
    "n + content} per user turn (one placeholder line per image before the text, as the single-turn lines), "
    "{'role': '<|Assistant|>', 'content': S} per remaining assistant turn (rendered '<|Assistant|>: ' + S + "
    "'<｜end▁of▁sentence｜>') and a final {'role': '<|Assistant|>', 'content': ''} (the cue '<|Assistant|>:'). "
    "Rendering = P + '\\n\\n<|User|>: ...\\n\\n<|Assistant|>: S<｜end▁of▁sentence｜><|User|>: ...\\n\\n"
    "<|Assistant|>:'. Tokenizer: tokenizer.encode (add_bos_token true) for p_0 (asserted equal to "
    "VLChatProcessor(prompt=p_0, images=p_0's images).input_ids), encode(., add_special_tokens=False) otherwise; "
    "N = 576; pixel_values = VLChatProcessor's, of all the sample's images in turn order ([1, n, 3, 384, 384]); "
    "input embeddings = prepare_inputs_embeds(input_ids, pixel_values, images_seq_mask = input_ids == "
    "<image_placeholder>, images_emb_mask all true); logits = language_model(inputs_embeds).logits."
)


def original_turn_conversation(turns: list) -> tuple:
    """(system prompt or None, the official conversation of T without A_K, earlier answers = the sentinel)."""
    systems, body = turns_split(turns)
    conversation = []
    for t in body[:-1]:
        if t["role"] == "user":
            names = list(t.get("images", []))
            conversation.append({"role": USER, "content": f"{IMAGE}\n" * len(names) + t["content"], "images": names})
        else:
            conversation.append({"role": ASSISTANT, "content": TURN_SENTINEL})
    conversation.append({"role": ASSISTANT, "content": ""})
    return ("\n\n".join(systems) if systems else None), conversation


def original_turn_example(model, proc, ids, turns: list):
    """One multi-turn sample through the official code (see ORIGINAL_TURN_DEFINITIONS): (example, stats)."""
    import torch
    from PIL import Image

    tok = proc.tokenizer
    lm = model.language_model
    systems, body = turns_split(turns)
    answers = [t["content"] for t in body if t["role"] == "assistant"]
    system, conversation = original_turn_conversation(turns)
    rendered = proc.apply_sft_template_for_multi_turn_prompts(
        conversations=conversation, sft_format=proc.sft_format,
        system_prompt=proc.system_prompt if system is None else system)
    names = turns_images(turns)
    pils = [Image.fromarray(train_image_as_stored(name)) for name in names]
    if system is None:
        # what VLChatProcessor renders itself (its own system prompt)
        assert proc(conversations=conversation, images=pils, force_batchify=True).sft_format[0] == rendered
    pieces = turn_pieces(rendered, len(answers))
    k = proc.num_image_tokens
    built = turn_ids(pieces, answers,
                     lambda s: tok.encode(s),
                     lambda s: tok.encode(s, add_special_tokens=False),
                     lambda s: tok.encode(s, add_special_tokens=False), ids, k)
    # p_0 through the processor (BOS, expansion) as the single-turn lines encode their prompt
    n0 = pieces[0].count(IMAGE)
    first = proc(prompt=pieces[0], images=pils[:n0], force_batchify=False).input_ids.tolist()
    assert built["input_ids"][:len(first)] == first
    # pixel_values of all images in turn order (the processor's own prompt holds one placeholder per image)
    prep = proc(prompt=rendered, images=pils, force_batchify=True)
    assert int(prep.images_seq_mask.sum()) == len(pils) * k
    pv = prep.pixel_values.float()                                 # [1, n, 3, S, S]
    assert pv.shape[1] == len(pils)
    x = torch.tensor([built["input_ids"]], dtype=torch.int64)
    seq_mask = x == ids[IMAGE]
    emb_mask = torch.ones((1, len(pils), k), dtype=torch.bool)
    assert int(seq_mask.sum()) == int(emb_mask.sum())
    with torch.no_grad():
        emb = model.prepare_inputs_embeds(input_ids=x.clone(), pixel_values=pv, images_seq_mask=seq_mask,
                                          images_emb_mask=emb_mask)
        logits = lm(inputs_embeds=emb, use_cache=False).logits[0]
        loss = turn_loss(logits, x, built["target_positions"])
        labels = torch.full_like(x, -100)
        labels[0, built["target_positions"]] = x[0, built["target_positions"]]
        check = lm(inputs_embeds=emb, labels=labels, use_cache=False).loss
    assert abs(check.item() - loss.item()) <= 1e-5 * abs(loss.item()), (check.item(), loss.item())
    example = {"task": "understand", "input_ids": built["input_ids"], "target_positions": built["target_positions"],
               "targets": built["targets"], "loss": float(loss), "pieces": pieces}
    return example, {"cross_check_rel": abs(check.item() / loss.item() - 1), "rendered": rendered}


def cmd_loss_turns_original(args) -> None:
    """original-tiny/expected/losses_turns.json: the lines of tests/fixtures/train/turns.jsonl through the official
    DeepSeek code on the gen_original.py checkpoint (same schema as hf-tiny/expected/losses_turns.json)."""
    model, proc, ids = official_loss_setup(args)
    assert proc.num_image_tokens == (model.config.vision_config.params.image_size // 16) ** 2
    for f in ("data.jsonl", "turns.jsonl"):
        if not (TRAIN_DIR / f).exists():
            raise SystemExit(f"{TRAIN_DIR / f} is missing: run `make_fixtures.py loss` and `loss-turns` first")
    single = train_lines()[TURNS_SINGLE_CHECK_LINE]
    ex, _ = original_turn_example(model, proc, ids, single_turn_as_turns(single))
    fresh, _ = original_loss_understand(model, proc, ids, single)
    check = turns_single_check(ex, fresh, read_json(ORIGINAL_DIR / "expected" / "losses.json"),
                               "loss-turns-original")
    examples = []
    for i, line in enumerate(turn_lines()):
        ex, st = original_turn_example(model, proc, ids, line["turns"])
        examples.append(ex)
        print_turn_example("loss-turns-original", i, ex, st)
    record = turns_record(examples, check, ORIGINAL_TURN_DEFINITIONS,
                          os.path.relpath(TRAIN_DIR / "turns.jsonl", ORIGINAL_DIR / "expected"),
                          {**env_versions(), "official_code_commit": official_commit()})
    write_compact_json(ORIGINAL_DIR / "expected" / "losses_turns.json", record, list_key="examples")
    print(f"loss-turns-original: {len(examples)} lines, mean {record['mean']:.6f}; K = 1 check of data.jsonl "
          f"line {check['data_line']}: ids equal, loss {check['loss']!r} equal to the single-turn code's "
          f"(losses.json: rel diff {check['loss_rel_diff_losses_json']:.3g})")

# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------
DEFAULT_TF457 = "/opt/tf457"
DEFAULT_JANUS_SRC = "/tmp/janus-official"
DEFAULT_JANUS_GIT = os.environ.get("JANUS_OFFICIAL_GIT", "")


def official_env(args) -> dict:
    """Environment for the steps that run the official code under transformers 4.57.1."""
    tf457 = Path(args.tf457)
    src = Path(args.janus_src)
    if not (tf457 / "transformers").is_dir():
        raise SystemExit(f"transformers 4.57.1 not found under {tf457} (see tests/reference/README.md)")
    commit = "unknown"
    if args.janus_git and Path(args.janus_git).exists():
        commit = subprocess.run(["git", f"--git-dir={args.janus_git}", "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        if not (src / "janus" / "models").is_dir():
            src.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", f"--git-dir={args.janus_git}", "archive", "HEAD"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    if not (src / "janus" / "models").is_dir():
        raise SystemExit(f"official Janus code not found under {src}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tf457), str(src)])
    env["JANUS_OFFICIAL_COMMIT"] = commit
    return env


def cmd_hf_bf16(args) -> None:
    """The prompt rows of `llm.safetensors` through hf-tiny-bf16-sharded loaded in bfloat16: every
    weight and activation in bf16, as PyTorch runs a bf16 model on the CPU. The step ids are the f32
    reference's, so the full pass covers the same sequence; the f32 logits of that pass are in
    `llm.safetensors` beside it."""
    torch = torch_setup()
    from safetensors.torch import load_file
    from transformers import JanusForConditionalGeneration

    folder = HF_BF16_SHARDED
    f32 = load_file(str(folder / "expected" / "llm.safetensors"))
    model = JanusForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.bfloat16, attn_implementation="eager")
    model.eval()
    full_ids = torch.cat([f32["input_ids"], f32["step_ids"]], dim=1)
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=full_ids, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden)
    assert logits.dtype == torch.bfloat16
    logits = logits.float()
    greedy = logits.argmax(-1)
    margins = top2_margins(f32["full_logits"].numpy())
    sure = torch.from_numpy(margins > MIN_MARGIN)
    agree = (greedy == f32["full_logits"].argmax(-1))[sure].float().mean().item()
    meta = {
        "layout": "transformers JanusForConditionalGeneration (model_type janus)",
        "weights": f"{folder.name} (bfloat16)",
        "compute": "bfloat16 (model.to(torch.bfloat16)), CPU, eager attention, 1 thread",
        "lm": "model.model.language_model + model.lm_head over input_ids + step_ids of llm.safetensors",
        "stat_max_abs_vs_f32": (logits - f32["full_logits"]).abs().max().item(),
        "stat_argmax_agreement_vs_f32_where_margin_above_min": agree,
        **{f"version_{k}": v for k, v in env_versions().items()},
    }
    save_expected(folder / "expected" / "llm-bf16.safetensors", {"full_logits": logits}, meta)
    print(f"hf-bf16: max |bf16 - f32| {meta['stat_max_abs_vs_f32']:.4g}, argmax agreement {agree:.3f}")


def run_step(step: str, env=None, extra=()) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), step, *extra]
    print(f"==> {' '.join(cmd)}" + (f"  (PYTHONPATH={env['PYTHONPATH']})" if env else ""), flush=True)
    subprocess.run(cmd, check=True, env=env)


def cmd_all(args) -> None:
    t0 = time.perf_counter()
    run_step("tokenizer")
    run_step("hf")
    run_step("hf-bf16")
    env = official_env(args)
    cache_args = ["--cache", str(fixture_cache(args))]
    run_step("original-manifest", env)
    gen = [sys.executable, str(HERE / "gen_original.py"), *cache_args]
    if not read_json(MANIFEST).get("data_sha256"):
        gen.append("--update-digest")
    print(f"==> {' '.join(gen)}", flush=True)
    subprocess.run(gen, check=True)
    run_step("original-expected", env, cache_args)
    run_step("check-tokenizer", env)
    run_step("chat-hf")
    run_step("hf-v4", dict(os.environ, PYTHONPATH=str(args.tf457)))
    run_step("prompts")
    run_step("loss")
    run_step("grads")
    run_step("lora")
    run_step("loss-turns")
    run_step("loss-original", env, cache_args)
    run_step("loss-turns-original", env, cache_args)
    run_step("chat-original", env, cache_args)
    cmd_preprocess(args)
    print(f"all fixtures written in {time.perf_counter() - t0:.0f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("tokenizer")
    sub.add_parser("hf")
    sub.add_parser("hf-bf16")
    sub.add_parser("original-manifest")
    p = sub.add_parser("original-expected")
    p.add_argument("--cache", default=None, help="gen_original.py cache root (default: $JANUS_FIXTURE_CACHE "
                                                 "or ~/.cache/janus-rs-fixtures)")
    sub.add_parser("check-tokenizer")
    sub.add_parser("chat-hf")
    sub.add_parser("hf-v4")
    sub.add_parser("prompts")
    sub.add_parser("loss")
    sub.add_parser("grads")
    sub.add_parser("lora")
    p = sub.add_parser("check-adapter")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p = sub.add_parser("check-model")
    p.add_argument("--model", required=True, help="complete transformers-layout model folder (e.g. a fine-tuned hf-tiny)")
    p.add_argument("--processor", default=None, help="folder of the processor/tokenizer files (default: --model)")
    sub.add_parser("loss-turns")
    p = sub.add_parser("loss-original")
    p.add_argument("--cache", default=None)
    p = sub.add_parser("loss-turns-original")
    p.add_argument("--cache", default=None)
    p = sub.add_parser("chat-original")
    p.add_argument("--cache", default=None)
    p = sub.add_parser("preprocess-original")
    p.add_argument("--out", required=True, help=".npz the official-processor outputs are written to")
    for name in ("preprocess", "all"):
        p = sub.add_parser(name)
        if name == "all":
            p.add_argument("--cache", default=None)
        p.add_argument("--tf457", default=os.environ.get("JANUS_TF457", DEFAULT_TF457),
                       help="pip --target folder holding transformers 4.57.1 (default %(default)s)")
        p.add_argument("--janus-src", default=os.environ.get("JANUS_OFFICIAL_SRC", DEFAULT_JANUS_SRC),
                       help="folder with the official deepseek-ai/Janus sources (default %(default)s)")
        p.add_argument("--janus-git", default=os.environ.get("JANUS_OFFICIAL_GIT", DEFAULT_JANUS_GIT),
                       help="bare git mirror of deepseek-ai/Janus, extracted into --janus-src if that is empty")
    args = ap.parse_args(argv)
    {
        "tokenizer": cmd_tokenizer,
        "hf": cmd_hf,
        "hf-bf16": cmd_hf_bf16,
        "original-manifest": cmd_original_manifest,
        "original-expected": cmd_original_expected,
        "check-tokenizer": cmd_check_tokenizer,
        "chat-hf": cmd_chat_hf,
        "hf-v4": cmd_hf_v4,
        "prompts": cmd_prompts,
        "loss": cmd_loss,
        "grads": cmd_grads,
        "lora": cmd_lora,
        "check-adapter": cmd_check_adapter,
        "check-model": cmd_check_model,
        "loss-turns": cmd_loss_turns,
        "loss-original": cmd_loss_original,
        "loss-turns-original": cmd_loss_turns_original,
        "chat-original": cmd_chat_original,
        "preprocess-original": cmd_preprocess_original,
        "preprocess": cmd_preprocess,
        "all": cmd_all,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
