#!/usr/bin/env python3
"""Write the original-layout (DeepSeek `multi_modality`) tiny checkpoint, with numpy only.

The committed manifest (tests/reference/original_manifest.json) lists every tensor of the official
MultiModalityCausalLM built from tests/fixtures/original-tiny/config.json: exact key names, shapes,
state_dict() order, and an init rule (mean, std).  This script draws the values with
numpy.random.Generator(PCG64(seed)), rounds them to bfloat16 and writes three variants of the same
weights, each a complete model folder (the committed json/tokenizer files are copied in):

    $CACHE/original-tiny/bin/pytorch_model.bin                      PyTorch zip checkpoint (torch.save format)
    $CACHE/original-tiny/bin-sharded/pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json
    $CACHE/original-tiny/safetensors/model.safetensors

CACHE = --cache DIR, else $JANUS_FIXTURE_CACHE, else ~/.cache/janus-rs-fixtures.
A run whose manifest, seed and data digest match $CACHE/original-tiny/STAMP.json does nothing
(--force to rewrite).  Needs Python >= 3.8 and numpy; no torch, no transformers.

The .bin files are written by hand: a stored (uncompressed) zip whose records are
<archive>/data.pkl (pickle protocol 2: an OrderedDict of torch._utils._rebuild_tensor_v2 calls with
persistent ids ('storage', torch.BFloat16Storage, key, 'cpu', numel)), <archive>/data/<key> (raw
little-endian bfloat16), <archive>/version, <archive>/byteorder, ... like torch.save, with every
record's data aligned to 64 bytes.  torch.load(..., weights_only=True) reads them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_MANIFEST = HERE / "original_manifest.json"
FOLDER_FILES = HERE.parent / "fixtures" / "original-tiny"
JSON_FILES = ["config.json", "preprocessor_config.json", "processor_config.json",
              "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"]
GENERATOR_VERSION = "1"
N_SHARDS = 2


# ------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------
def bf16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest, ties to even (finite inputs)."""
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    bias = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((u + bias) >> np.uint32(16)).astype(np.uint16)


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def tensor_values(rng: np.random.Generator, entry: dict) -> bytes:
    """Little-endian bfloat16 bytes of one tensor (consumes the generator even for std == 0)."""
    n = numel(entry["shape"])
    z = rng.standard_normal(n, dtype=np.float32)
    v = z * np.float32(entry["std"]) + np.float32(entry["mean"])
    return bf16_bits(v).astype("<u2").tobytes()


# ------------------------------------------------------------------------------------------------
# pickle (protocol 2), written opcode by opcode
# ------------------------------------------------------------------------------------------------
def _p_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2 ** 31) <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw          # LONG1


def _p_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw    # BINUNICODE


def _p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _p_int_tuple(values) -> bytes:
    values = list(values)
    if not values:
        return b")"                                    # EMPTY_TUPLE
    return b"(" + b"".join(_p_int(v) for v in values) + b"t"


def state_dict_pickle(entries) -> bytes:
    """entries: (name, shape, storage_key) in order.  Same object graph as torch.save(OrderedDict)."""
    out = [b"\x80\x02", _p_global("collections", "OrderedDict"), b")R", b"("]
    for name, shape, key in entries:
        shape = [int(s) for s in shape]
        stride = [numel(shape[i + 1:]) for i in range(len(shape))]
        out.append(_p_str(name))
        out.append(_p_global("torch._utils", "_rebuild_tensor_v2"))
        out.append(b"(")                               # args of _rebuild_tensor_v2
        out.append(b"(" + _p_str("storage") + _p_global("torch", "BFloat16Storage") + _p_str(key)
                   + _p_str("cpu") + _p_int(numel(shape)) + b"tQ")   # BINPERSID
        out.append(_p_int(0))                          # storage_offset
        out.append(_p_int_tuple(shape))
        out.append(_p_int_tuple(stride))
        out.append(b"\x89")                            # requires_grad = False
        out.append(_p_global("collections", "OrderedDict") + b")R")   # backward_hooks
        out.append(b"tR")
    out.append(b"u.")                                  # SETITEMS, STOP
    return b"".join(out)


# ------------------------------------------------------------------------------------------------
# zip (stored, 64-byte aligned data, fixed timestamps) - the layout torch.save produces
# ------------------------------------------------------------------------------------------------
class AlignedZipWriter:
    ALIGN = 64

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.central = []
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        raw_name = name.encode("utf-8")
        crc = zlib.crc32(data) & 0xFFFFFFFF
        pad = (-(self.offset + 30 + len(raw_name) + 4)) % self.ALIGN
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        if self.offset + 30 + len(raw_name) + len(extra) + len(data) >= 0xFFFFFFFF:
            raise SystemExit("zip would need zip64; not implemented (the fixture is < 4 GiB)")
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(data), len(data),
                             len(raw_name), len(extra))
        self.f.write(header + raw_name + extra)
        self.f.write(data)
        self.central.append((raw_name, crc, len(data), self.offset))
        self.offset += len(header) + len(raw_name) + len(extra) + len(data)

    def close(self) -> None:
        cd_start = self.offset
        for raw_name, crc, size, off in self.central:
            rec = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, size, size,
                              len(raw_name), 0, 0, 0, 0, 0, off)
            self.f.write(rec + raw_name)
            self.offset += len(rec) + len(raw_name)
        n = len(self.central)
        self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, self.offset - cd_start, cd_start, 0))
        self.f.close()


class TorchZipCheckpoint:
    """A torch.save-compatible checkpoint written record by record."""

    def __init__(self, path: Path, entries):
        self.archive = path.stem                        # torch uses the file name without extension
        self.zip = AlignedZipWriter(path)
        self.keys = {name: str(i) for i, (name, _shape) in enumerate(entries)}
        pkl = state_dict_pickle([(name, shape, self.keys[name]) for name, shape in entries])
        self.digest = hashlib.sha256(pkl)
        self.zip.add(f"{self.archive}/data.pkl", pkl)
        self.zip.add(f"{self.archive}/.format_version", b"1")
        self.zip.add(f"{self.archive}/.storage_alignment", b"64")
        self.zip.add(f"{self.archive}/byteorder", b"little")

    def add_tensor(self, name: str, data: bytes) -> None:
        self.digest.update(data)
        self.zip.add(f"{self.archive}/data/{self.keys[name]}", data)

    def close(self) -> None:
        self.zip.add(f"{self.archive}/version", b"3\n")
        serial = str(int(self.digest.hexdigest()[:32], 16)).zfill(40)[:40]
        self.zip.add(f"{self.archive}/.data/serialization_id", serial.encode())
        self.zip.close()


# ------------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------------
class SafetensorsWriter:
    def __init__(self, path: Path, entries):
        header = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in entries:
            size = 2 * numel(shape)
            header[name] = {"dtype": "BF16", "shape": [int(s) for s in shape], "data_offsets": [off, off + size]}
            off += size
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(head)) + head)

    def add_tensor(self, name: str, data: bytes) -> None:
        self.f.write(data)

    def close(self) -> None:
        self.f.close()


# ------------------------------------------------------------------------------------------------
def default_cache() -> Path:
    env = os.environ.get("JANUS_FIXTURE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/janus-rs-fixtures").expanduser()


def shard_plan(entries, n_shards: int):
    """Split the tensors (in order) into n_shards contiguous groups of about equal byte size."""
    sizes = [2 * numel(shape) for _, shape in entries]
    total = sum(sizes)
    plan, acc, k = [], 0, 0
    for size in sizes:
        if acc >= total * (k + 1) / n_shards and k < n_shards - 1:
            k += 1
        plan.append(k)
        acc += size
    return plan, total


def generate(manifest: dict, out: Path) -> str:
    entries = [(t["name"], t["shape"]) for t in manifest["tensors"]]
    plan, total = shard_plan(entries, N_SHARDS)
    folders = {v: out / v for v in ("bin", "bin-sharded", "safetensors")}
    for folder in folders.values():
        folder.mkdir(parents=True)
        for name in JSON_FILES:
            shutil.copyfile(FOLDER_FILES / name, folder / name)

    shard_names = [f"pytorch_model-{k + 1:05d}-of-{N_SHARDS:05d}.bin" for k in range(N_SHARDS)]
    single = TorchZipCheckpoint(folders["bin"] / "pytorch_model.bin", entries)
    shards = [TorchZipCheckpoint(folders["bin-sharded"] / shard_names[k],
                                 [e for e, p in zip(entries, plan) if p == k]) for k in range(N_SHARDS)]
    st = SafetensorsWriter(folders["safetensors"] / "model.safetensors", entries)

    rng = np.random.Generator(np.random.PCG64(int(manifest["seed"])))
    digest = hashlib.sha256()
    for t, k in zip(manifest["tensors"], plan):
        data = tensor_values(rng, t)
        digest.update(data)
        single.add_tensor(t["name"], data)
        shards[k].add_tensor(t["name"], data)
        st.add_tensor(t["name"], data)
    single.close()
    for s in shards:
        s.close()
    st.close()
    index = {"metadata": {"total_size": total},
             "weight_map": {name: shard_names[k] for (name, _), k in sorted(zip(entries, plan))}}
    (folders["bin-sharded"] / "pytorch_model.bin.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return digest.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache root (default: $JANUS_FIXTURE_CACHE or ~/.cache/janus-rs-fixtures)")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    ap.add_argument("--force", action="store_true", help="rewrite even if STAMP.json says up to date")
    ap.add_argument("--update-digest", action="store_true",
                    help="record the data digest in the manifest (maintainers, after changing the manifest)")
    args = ap.parse_args(argv)

    cache = (args.cache.expanduser() if args.cache else default_cache()).resolve()
    out = cache / "original-tiny"
    manifest_bytes = args.manifest.read_bytes()
    manifest = json.loads(manifest_bytes)
    json_digest = hashlib.sha256(b"".join((FOLDER_FILES / n).read_bytes() for n in JSON_FILES)).hexdigest()
    stamp = {"generator_version": GENERATOR_VERSION, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
             "json_files_sha256": json_digest, "data_sha256": manifest.get("data_sha256")}
    stamp_path = out / "STAMP.json"
    if not args.force and not args.update_digest and stamp["data_sha256"] and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                print(f"{out}: up to date")
                return 0
        except ValueError:
            pass

    t0 = time.perf_counter()
    tmp = cache / "original-tiny.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    digest = generate(manifest, tmp)
    expected = manifest.get("data_sha256")
    if args.update_digest:
        text = manifest_bytes.decode("utf-8")
        if expected:
            text = text.replace(f'"data_sha256": "{expected}"', f'"data_sha256": "{digest}"')
        else:
            text = text.replace('\n  "tensors": [', f'\n  "data_sha256": "{digest}",\n  "tensors": [', 1)
        args.manifest.write_text(text, encoding="utf-8")
        stamp["manifest_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
        print(f"recorded data_sha256 {digest} in {args.manifest}")
    elif expected and digest != expected:
        shutil.rmtree(tmp)
        print(f"error: generated weights have sha256 {digest}, the manifest expects {expected}. "
              f"numpy {np.__version__} draws different numbers than the version that recorded the "
              f"digest (or the manifest was edited).", file=sys.stderr)
        return 1
    stamp["data_sha256"] = digest
    (tmp / "STAMP.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {manifest['num_tensors']} tensors x 3 variants, {size / 1e6:.0f} MB, "
          f"{time.perf_counter() - t0:.1f} s (numpy {np.__version__}), data sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
