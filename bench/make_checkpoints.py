#!/usr/bin/env python3
"""Create full-size random-weight Janus-Pro checkpoints for the benchmarks.

Random weights cost exactly what trained ones cost: same tensors, same shapes, same bytes, same FLOPs.
The folders are written outside the repository, under

    CACHE = --cache DIR, else $JANUS_BENCH_CACHE, else ~/.cache/janus-rs-bench

    $CACHE/pro-1b-hf/        transformers layout (JanusForConditionalGeneration, model_type "janus"),
                             Janus-Pro-1B dimensions, bf16 safetensors (save_pretrained sharding),
                             processor / tokenizer / chat template / generation config, BENCH.json
    $CACHE/pro-1b-original/  original DeepSeek layout (MultiModalityCausalLM, model_type "multi_modality"),
                             Janus-Pro-1B dimensions, one bf16 model.safetensors, VLChatProcessor json
                             files, BENCH.json
    $CACHE/pro-7b-original/  (only with --pro-7b) original DeepSeek layout at Janus-Pro-7B dimensions, bf16,
                             sharded pickled .bin as deepseek-ai/Janus-Pro-7B ships it
                             (pytorch_model-0000K-of-0000N.bin written by torch.save, at most 10 GB a
                             shard, + pytorch_model.bin.index.json), VLChatProcessor json files, BENCH.json

Each folder carries a STAMP.json; a folder whose stamp matches what this script would write is left
alone (--force rewrites it).

The tokenizer is the tiny one of tests/fixtures/tokenizer/ (about 500 tokens): every id it produces is
a valid row of the 102400-row embedding, so the compute is that of the real model.

Sub-commands:

    make_checkpoints.py [build] [--only hf|original] [--pro-7b] [--cache DIR] [--force]
        torch + transformers 5.24 for the transformers layout; numpy only for the Pro-1B original
        layout (reads bench/pro_1b_original_manifest.json); numpy + torch for the Pro-7B one (reads
        bench/pro_7b_original_manifest.json, holds one shard at a time: about 10 GB of RAM).
    make_checkpoints.py manifest [--model pro-1b|pro-7b]
        rewrites bench/pro_{1b,7b}_original_manifest.json from the official DeepSeek code; needs
        PYTHONPATH=/opt/tf457:/tmp/janus-official (transformers 4.57.1 + deepseek-ai/Janus), see
        tests/reference/README.md.

Weights: the transformers layout draws every parameter from torch.Generator().manual_seed(0) in
named_parameters() order with tests/reference/make_fixtures.py::hf_init_rule (normal; matrices
std 1/sqrt(fan_in), norm weights 1 + 0.1 N, biases 0.02 N, embeddings N(0, 1), lm_head and generation
head std 0.5), directly in the storage dtype on a model built on the meta device (no transformers
init).  The original layout follows the manifest (rules of make_fixtures.py::original_init_rule) with
numpy PCG64, like tests/reference/gen_original.py, drawn in chunks of CHUNK elements.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REFERENCE = REPO / "tests" / "reference"
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "tokenizer"
MANIFESTS = {"pro-1b": HERE / "pro_1b_original_manifest.json", "pro-7b": HERE / "pro_7b_original_manifest.json"}
sys.path.insert(0, str(REFERENCE))

import make_fixtures as mf  # noqa: E402  (stdlib-only at import time)

SCRIPT_VERSION = "1"
HF_SEED = 0
ORIGINAL_SEED = 0
CHUNK = 1 << 24           # numpy draws per tensor in chunks of this many elements
MAX_SHARD_BYTES = 10 ** 10  # "10GB", the shard limit save_pretrained used for deepseek-ai/Janus-Pro-7B

# ------------------------------------------------------------------------------------------------
# Model dimensions
# ------------------------------------------------------------------------------------------------
# Janus-Pro-1B (deepseek-community/Janus-Pro-1B, deepseek-ai/Janus-Pro-1B).  Transformers 5.24's
# JanusVisionConfig / JanusVQVAEConfig defaults are already the Janus-Pro-1B values (SigLIP-L/16 at
# 384: hidden 1024, 24 layers, 16 heads, mlp_ratio 4, projection_dim 2048, aligner depth 2,
# num_image_tokens 576; VQ-16: embed_dim 8, 16384 codes, base_channels 128, channel_multiplier
# [1, 1, 2, 2, 4], latent_channels 256, num_res_blocks 2, projection_dim 2048,
# image_token_embed_dim 2048, aligner depth 2).  What this script sets explicitly:
#   text_config   : every LlamaConfig field below (LlamaConfig's defaults are LLaMA-7B's)
#   vision_config : nothing but what TEXT["hidden_size"] implies (projection_dim)
#   vq_config     : projection_dim, image_token_embed_dim (= hidden_size); num_patches is derived by
#                   JanusConfig (image_size // patch_size = 24)
#   JanusConfig   : image_token_id (the tiny tokenizer's <image_placeholder>), tie_word_embeddings=False
PRO_1B = {
    "name": "pro-1b",
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": 102400, "max_position_embeddings": 16384,
}
# Janus-Pro-7B: LLaMA dims of deepseek-ai/Janus-Pro-7B; vision / VQ unchanged except the projections.
PRO_7B = {
    "name": "pro-7b",
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 102400, "max_position_embeddings": 16384,
}
MODELS = {"pro-1b": PRO_1B, "pro-7b": PRO_7B}
RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0
IMAGE_SIZE = 384
NUM_IMAGE_TOKENS = 576


def default_cache() -> Path:
    env = os.environ.get("JANUS_BENCH_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/janus-rs-bench").expanduser()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB: VmHWM (Linux; counts from this process's exec), else
    ru_maxrss (which Linux carries over from the parent across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stamp_matches(folder: Path, stamp: dict) -> bool:
    path = folder / "STAMP.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()) == stamp
    except ValueError:
        return False


def replace_folder(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def tokenizer_digest() -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        h.update((TOKENIZER_DIR / name).read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Transformers layout
# ------------------------------------------------------------------------------------------------
def hf_config(dims: dict, ids: dict):
    from transformers import GenerationConfig, JanusConfig, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    d = dims["hidden_size"]
    text_config = LlamaConfig(
        vocab_size=dims["vocab_size"], hidden_size=d, intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_hidden_layers"], num_attention_heads=dims["num_attention_heads"],
        num_key_value_heads=dims["num_key_value_heads"], max_position_embeddings=dims["max_position_embeddings"],
        rms_norm_eps=RMS_NORM_EPS, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=ids[mf.BOS], eos_token_id=ids[mf.EOS], pad_token_id=ids[mf.PAD],
    )
    vision_config = JanusVisionConfig(projection_dim=d)
    vq_config = JanusVQVAEConfig(projection_dim=d, image_token_embed_dim=d)
    config = JanusConfig(text_config=text_config, vision_config=vision_config, vq_config=vq_config,
                         image_token_id=ids[mf.IMAGE], tie_word_embeddings=False)
    assert config.vision_config.image_size == IMAGE_SIZE
    assert config.vision_config.num_image_tokens == NUM_IMAGE_TOKENS
    assert config.vq_config.num_patches ** 2 == NUM_IMAGE_TOKENS, config.vq_config.num_patches
    gen = GenerationConfig(
        bos_token_id=ids[mf.BOS], eos_token_id=ids[mf.EOS], pad_token_id=ids[mf.PAD],
        generation_kwargs={"boi_token_id": ids[mf.BOI]}, guidance_scale=5.0, temperature=1.0, do_sample=True,
    )
    return config, gen


def hf_processor():
    from transformers import JanusImageProcessor, JanusProcessor

    tokenizer = mf.hf_tokenizer(TOKENIZER_DIR)
    image_processor = JanusImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], min_size=14,
        do_normalize=True, rescale_factor=1 / 255,
    )
    processor = JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=mf.HF_CHAT_TEMPLATE,
        use_default_system_prompt=False, num_image_tokens=NUM_IMAGE_TOKENS,
    )
    return processor


def component_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]


def build_hf(out: Path, dims: dict, dtype_name: str, force: bool) -> None:
    import torch
    import transformers
    from transformers import JanusForConditionalGeneration

    stamp = {"script_version": SCRIPT_VERSION, "layout": "hf", "dims": dims, "dtype": dtype_name,
             "seed": HF_SEED, "tokenizer_sha256": tokenizer_digest(), "transformers": transformers.__version__}
    if not force and stamp_matches(out, stamp):
        print(f"{out}: up to date ({folder_bytes(out) / 1e9:.2f} GB)")
        return
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    t0 = time.perf_counter()
    ids = mf.special_ids_from_tokenizer_json(TOKENIZER_DIR / "tokenizer.json")
    config, gen = hf_config(dims, ids)
    processor = hf_processor()
    assert len(processor.tokenizer) <= dims["vocab_size"]

    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    model = model.to(dtype=dtype).to_empty(device="cpu")
    model.generation_config = gen
    t_build = time.perf_counter()

    g = torch.Generator().manual_seed(HF_SEED)
    counts: dict[str, int] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = mf.hf_init_rule(name, tuple(p.shape))
            p.normal_(mean, std, generator=g)
            counts[component_of(name)] = counts.get(component_of(name), 0) + p.numel()
    t_fill = time.perf_counter()

    tmp = fresh_tmp(out)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    t_save = time.perf_counter()

    n_params = sum(counts.values())
    weight_files = sorted(p.name for p in tmp.glob("*.safetensors"))
    info = {
        "layout": "transformers JanusForConditionalGeneration (model_type janus)",
        "dims": dims, "storage_dtype": dtype_name, "seed": HF_SEED,
        "parameters": n_params, "parameters_by_component": counts,
        "bytes_f32": 4 * n_params, "bytes_bf16": 2 * n_params,
        "weight_files": weight_files,
        "weight_file_bytes": sum((tmp / f).stat().st_size for f in weight_files),
        "image_size": IMAGE_SIZE, "num_image_tokens": NUM_IMAGE_TOKENS,
        "vq_grid": config.vq_config.num_patches,
        "tokenizer": "tests/fixtures/tokenizer (tiny BPE, %d tokens)" % len(processor.tokenizer),
        "transformers": transformers.__version__, "torch": torch.__version__,
    }
    (tmp / "BENCH.json").write_text(json.dumps(info, indent=2) + "\n")
    (tmp / "STAMP.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    del model
    replace_folder(tmp, out)
    print(f"{out}: {n_params / 1e9:.3f} B parameters, {folder_bytes(out) / 1e9:.2f} GB on disk "
          f"({len(weight_files)} safetensors file(s)); build {t_build - t0:.1f} s, fill {t_fill - t_build:.1f} s, "
          f"save {t_save - t_fill:.1f} s, total {time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB")


# ------------------------------------------------------------------------------------------------
# Original layout
# ------------------------------------------------------------------------------------------------
def original_config(dims: dict) -> dict:
    """config.json of deepseek-ai/Janus-Pro-1B or -7B (the tiny tokenizer's vocabulary fits in vocab_size)."""
    d = dims["hidden_size"]
    cfg = mf.original_config(dims["vocab_size"])
    cfg["aligner_config"]["params"]["n_embed"] = d
    cfg["gen_aligner_config"]["params"]["n_embed"] = d
    cfg["gen_head_config"]["params"].update({"image_token_embed": d, "n_embed": d})
    cfg["language_config"] = {
        "hidden_size": d,
        "intermediate_size": dims["intermediate_size"],
        "max_position_embeddings": dims["max_position_embeddings"],
        "model_type": "llama",
        "num_attention_heads": dims["num_attention_heads"],
        "num_hidden_layers": dims["num_hidden_layers"],
        "num_key_value_heads": dims["num_key_value_heads"],
        "torch_dtype": "bfloat16",
        "vocab_size": dims["vocab_size"],
    }
    return cfg


def cmd_manifest(args) -> None:
    """List the official MultiModalityCausalLM's state_dict at Pro-1B/7B dims (needs the official code)."""
    import torch

    dims, manifest_path = MODELS[args.model], MANIFESTS[args.model]

    MultiModalityCausalLM, MultiModalityConfig = mf.official_model_class()
    import janus.models.modeling_vlm as vlm

    real_llama = vlm.LlamaForCausalLM

    def llama_on_meta(config):  # the LLM (1.6 or 6.9 B parameters): shapes only
        with torch.device("meta"):
            return real_llama(config)

    vlm.LlamaForCausalLM = llama_on_meta
    try:
        # the vision and VQ towers are built on the CPU (timm's drop-path schedule calls .item())
        model = MultiModalityCausalLM(MultiModalityConfig(**original_config(dims)))
    finally:
        vlm.LlamaForCausalLM = real_llama
    tensors, total = [], 0
    for name, t in model.state_dict().items():
        shape = [int(s) for s in t.shape]
        n = 1
        for s in shape:
            n *= s
        total += n
        tensors.append({"name": name, "shape": shape, **mf.original_init_rule(name, tuple(shape))})
    manifest = {
        "format": "janus-rs original-layout weight manifest v1",
        "seed": ORIGINAL_SEED,
        "storage_dtype": "bfloat16",
        "generator": ("numpy.random.Generator(numpy.random.PCG64(seed)); for each tensor in this order, in "
                      f"chunks of {CHUNK} elements: z = standard_normal(chunk, dtype=float32); "
                      "v = z * float32(std) + float32(mean) (float32); stored value = round-to-nearest-even "
                      "of v to bfloat16"),
        "source": ("MultiModalityCausalLM(config).state_dict() of deepseek-ai/Janus (official code) with "
                   f"the Janus-Pro-{args.model[4:].upper()} config.json of "
                   "bench/make_checkpoints.py::original_config, transformers 4.57.1"),
        "config": original_config(dims),
        "num_tensors": len(tensors),
        "total_numel": total,
    }
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if old.get("data_sha256") and old.get("tensors") == tensors and old.get("seed") == ORIGINAL_SEED:
        manifest["data_sha256"] = old["data_sha256"]
    manifest["tensors"] = tensors
    mf.write_compact_json(manifest_path, manifest, list_key="tensors")
    print(f"{manifest_path}: {len(tensors)} tensors, {total} elements ({2 * total / 1e9:.2f} GB in bf16)")


def bf16_chunks(rng, entry: dict):
    """Little-endian bf16 bytes of one tensor, chunk by chunk (consumes the generator even for std 0)."""
    import numpy as np

    from gen_original import bf16_bits, numel

    n = numel(entry["shape"])
    std, mean = np.float32(entry["std"]), np.float32(entry["mean"])
    done = 0
    while done < n:
        k = min(CHUNK, n - done)
        z = rng.standard_normal(k, dtype=np.float32)
        z *= std
        z += mean
        yield bf16_bits(z).astype("<u2").tobytes()
        done += k


ORIGINAL_PREPROCESSOR = dict(mf.ORIG_PREPROCESSOR, image_size=IMAGE_SIZE)
ORIGINAL_PROCESSOR = dict(mf.ORIG_PROCESSOR, num_image_tokens=NUM_IMAGE_TOKENS)


def shard_plan(entries, max_bytes: int) -> list[int]:
    """Shard index of each tensor, in order: a tensor that would take the shard past max_bytes opens the
    next one (the rule of transformers' shard_checkpoint, which wrote the hub's pytorch_model-*.bin)."""
    plan, k, size = [], 0, 0
    for _name, shape in entries:
        n = 2 * math.prod(shape)
        if size + n > max_bytes and size > 0:
            k, size = k + 1, 0
        plan.append(k)
        size += n
    return plan


class ShardedBinWriter:
    """pytorch_model-0000K-of-0000N.bin by torch.save, one shard held in memory at a time."""

    def __init__(self, folder: Path, entries, max_bytes: int):
        self.folder = folder
        self.plan = shard_plan(entries, max_bytes)
        count = self.plan[-1] + 1
        self.names = [f"pytorch_model-{k + 1:05d}-of-{count:05d}.bin" for k in range(count)]
        self.shard_of = {name: k for (name, _), k in zip(entries, self.plan)}
        self.shapes = dict(entries)
        self.total = sum(2 * math.prod(shape) for _, shape in entries)
        self.current, self.pending, self.parts = 0, {}, []

    def add_tensor(self, name: str, data: bytes) -> None:
        self.parts.append(data)
        if sum(len(b) for b in self.parts) < 2 * math.prod(self.shapes[name]):
            return
        import numpy as np
        import torch

        k = self.shard_of[name]
        if k != self.current:
            self._flush()
            self.current = k
        bits = np.frombuffer(b"".join(self.parts), dtype="<i2").copy()
        self.parts = []
        self.pending[name] = torch.from_numpy(bits).view(torch.bfloat16).reshape(self.shapes[name])

    def _flush(self) -> None:
        import torch

        torch.save(self.pending, self.folder / self.names[self.current])
        self.pending = {}

    def close(self) -> list[str]:
        self._flush()
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {name: self.names[k] for name, k in sorted(self.shard_of.items())}}
        (self.folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.names


def build_original(out: Path, model: str, force: bool, update_digest: bool, accept_other_draws: bool = False) -> None:
    """Pro-1B: one model.safetensors; Pro-7B: sharded pickled .bin, as the hub has each."""
    import numpy as np

    from gen_original import SafetensorsWriter

    manifest_path = MANIFESTS[model]
    manifest_bytes = manifest_path.read_bytes()
    manifest = json.loads(manifest_bytes)
    config = manifest["config"]
    stamp = {"script_version": SCRIPT_VERSION, "layout": "original",
             "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
             "tokenizer_sha256": tokenizer_digest(), "data_sha256": manifest.get("data_sha256")}
    if not force and not update_digest and stamp["data_sha256"] and stamp_matches(out, stamp):
        print(f"{out}: up to date ({folder_bytes(out) / 1e9:.2f} GB)")
        return
    t0 = time.perf_counter()
    tmp = fresh_tmp(out)
    mf.write_json(tmp / "config.json", config)
    mf.write_json(tmp / "preprocessor_config.json", ORIGINAL_PREPROCESSOR)
    mf.write_json(tmp / "processor_config.json", ORIGINAL_PROCESSOR)
    for name in ("special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"):
        shutil.copyfile(TOKENIZER_DIR / name, tmp / name)

    entries = [(t["name"], t["shape"]) for t in manifest["tensors"]]
    if model == "pro-1b":
        writer = SafetensorsWriter(tmp / "model.safetensors", entries)
    else:
        writer = ShardedBinWriter(tmp, entries, MAX_SHARD_BYTES)
    rng = np.random.Generator(np.random.PCG64(int(manifest["seed"])))
    digest = hashlib.sha256()
    counts: dict[str, int] = {}
    for t in manifest["tensors"]:
        for data in bf16_chunks(rng, t):
            digest.update(data)
            writer.add_tensor(t["name"], data)
        top = t["name"].split(".")[0]
        counts[top] = counts.get(top, 0) + int(np.prod(t["shape"], dtype=np.int64))
    if model == "pro-1b":
        writer.close()
        weight_files = ["model.safetensors"]
    else:
        weight_files = writer.close()
    digest = digest.hexdigest()

    expected = manifest.get("data_sha256")
    if update_digest:
        text = manifest_bytes.decode("utf-8")
        if expected:
            text = text.replace(f'"data_sha256": "{expected}"', f'"data_sha256": "{digest}"')
        else:
            text = text.replace('\n  "tensors": [', f'\n  "data_sha256": "{digest}",\n  "tensors": [', 1)
        manifest_path.write_text(text, encoding="utf-8")
        stamp["manifest_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        print(f"recorded data_sha256 {digest} in {manifest_path}")
    elif expected and digest != expected and not accept_other_draws:
        shutil.rmtree(tmp)
        raise SystemExit(f"error: generated weights have sha256 {digest}, the manifest expects {expected} "
                         f"(numpy {np.__version__} draws other numbers, or the manifest was edited)")
    stamp["data_sha256"] = digest
    n_params = sum(counts.values())
    info = {
        "layout": "original DeepSeek MultiModalityCausalLM (model_type multi_modality)",
        "dims": MODELS[model], "storage_dtype": "bf16", "seed": manifest["seed"],
        "parameters": n_params, "parameters_by_component": counts,
        "bytes_f32": 4 * n_params, "bytes_bf16": 2 * n_params,
        "weight_files": weight_files,
        "weight_file_bytes": sum((tmp / f).stat().st_size for f in weight_files),
        "image_size": IMAGE_SIZE, "num_image_tokens": NUM_IMAGE_TOKENS,
        "tokenizer": "tests/fixtures/tokenizer (tiny BPE)", "numpy": np.__version__,
        "data_sha256": digest,
    }
    (tmp / "BENCH.json").write_text(json.dumps(info, indent=2) + "\n")
    (tmp / "STAMP.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    replace_folder(tmp, out)
    print(f"{out}: {n_params / 1e9:.3f} B parameters, {folder_bytes(out) / 1e9:.2f} GB on disk "
          f"({len(weight_files)} weight file(s)), {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {peak_rss_mb():.0f} MB, data sha256 {digest}")


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="build", choices=["build", "manifest"])
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache root (default: $JANUS_BENCH_CACHE or ~/.cache/janus-rs-bench)")
    ap.add_argument("--only", choices=["hf", "original"], default=None, help="build one layout only")
    ap.add_argument("--pro-7b", action="store_true",
                    help="also write pro-7b-original/ (Janus-Pro-7B dims, sharded bf16 .bin, ~14.8 GB on "
                         "disk; needs ~11 GB RAM)")
    ap.add_argument("--model", choices=sorted(MODELS), default="pro-1b",
                    help="manifest: which model's state_dict to list")
    ap.add_argument("--force", action="store_true", help="rewrite even when STAMP.json matches")
    ap.add_argument("--accept-other-draws", action="store_true",
                    help="original layout: keep weights whose digest differs from the manifest's (another numpy "
                         "draws other numbers; the benchmark on another machine only needs the sizes)")
    ap.add_argument("--update-digest", action="store_true",
                    help="record the original-layout data digest in the manifest (after `manifest`)")
    args = ap.parse_args(argv)

    if args.command == "manifest":
        cmd_manifest(args)
        return 0
    cache = (args.cache.expanduser() if args.cache else default_cache()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.only in (None, "hf"):
        build_hf(cache / "pro-1b-hf", PRO_1B, "bf16", args.force)
    if args.only in (None, "original"):
        # numpy only: run in a fresh interpreter so the torch build above does not inflate its RSS
        if args.only is None and "torch" in sys.modules:
            cmd = [sys.executable, __file__, "--only", "original", "--cache", str(cache)]
            cmd += ["--force"] if args.force else []
            cmd += ["--update-digest"] if args.update_digest else []
            subprocess.run(cmd, check=True)
        else:
            build_original(cache / "pro-1b-original", "pro-1b", args.force, args.update_digest,
                           args.accept_other_draws)
    if args.pro_7b:
        build_original(cache / "pro-7b-original", "pro-7b", args.force, args.update_digest,
                       args.accept_other_draws)
    print(f"done in {time.perf_counter() - t0:.1f} s; cache {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
