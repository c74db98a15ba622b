#!/usr/bin/env python3
"""Fine-tuning throughput and memory: janus-rs (`janus train`) against PyTorch (transformers'
JanusForConditionalGeneration + PEFT), side by side, on the same checkpoint and the same four samples.

    /opt/refenv/bin/python bench/bench_train.py [--model DIR] [--configs lora,stage1] [--sides janus,torch]
        [--warmup 1] [--steps 3] [--threads 2] [--janus-bin PATH] [--records FILE] [--attn sdpa|eager]
        [--check] [--data-dir DIR] [--torch-python PY] [--torch-order janus|file] [--poll-ms 20]

Configurations (f32, batch size 1, no accumulation, no condition drop, AdamW lr 1e-4, betas (0.9, 0.95),
eps 1e-8, weight decay 0.1, global grad-norm clipping at 1.0, janus-rs's learning-rate schedule: cosine
from lr to 0 over warmup + steps updates, no warmup):

  lora    LoRA rank 16, alpha 16 on q, k, v, o, gate, up, down of every language-model layer; only the
          adapters train (janus: --lora 16 --lora-alpha 16; PEFT LoraConfig, lora_dropout 0).
  stage1  janus --stage 1: the understanding aligner, the generation embedding and aligner and the
          generation head train; the language model and both image encoders are frozen.

Each (side, configuration) runs in a fresh process: W warm-up updates, then S timed ones, one sample
each. The data (written by this script): 2 generation and 2 understanding samples with synthetic
images of the model's image size, PNG. The loss of each sample is the janus-rs training objective
(tests/reference/make_fixtures.py's definitions: image-token CE over the l2-normalised VQ codes,
answer + EOS CE); every step encodes its image (VQ under no_grad, SigLIP) on both sides. The PyTorch side
takes the samples in janus-rs's order at seed 0 (JANUS_ORDER_SEED0), so both time the same samples.

Records (one per side and configuration) are appended to --records; a Markdown table is printed.
Details: bench/README.md, section "Fine-tuning: bench_train.py".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import machine  # noqa: E402  (the machine record bench/run.py writes)
REPO = HERE.parent
REFERENCE = REPO / "tests" / "reference"
DEFAULT_MODEL = "~/.cache/janus-rs-bench/pro-1b-hf"
DEFAULT_RECORDS = HERE / "results-train.jsonl"
REF_PYTHON = "/opt/refenv/bin/python"
CONFIGS = ("lora", "stage1")
SIDES = ("janus", "torch")

LR = 1e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
CLIP = 1.0
LORA_RANK = 16
LORA_ALPHA = 16
SEED = 0
STAGE1_MODULES = ("aligner", "generation_embeddings", "generation_aligner", "generation_head")  # of model.model
IMAGE_SEED = 900              # make_fixtures.synthetic_image seed of image i: IMAGE_SEED + i

# The four samples (data.jsonl's lines, in this order).
SAMPLES = [
    {"task": "generate", "prompt": "A watercolor painting of a red fox sitting in a snowy forest at sunrise.",
     "image": "img0.png"},
    {"task": "understand", "images": ["img1.png"],
     "question": "What is shown in this image? Describe the colors and the shapes.",
     "answer": "A red disc above a green bar on a soft purple and blue gradient."},
    {"task": "generate", "prompt": "A beautiful landscape with mountains and a lake at sunset.",
     "image": "img2.png"},
    {"task": "understand", "images": ["img3.png"], "question": "Which colors dominate this picture?",
     "answer": "Mostly blue and purple, with a bright red circle and a green stripe."},
]

# The order janus-rs takes these 4 lines in at --seed 0 (its trainer's Order: a ChaCha8 Fisher-Yates
# shuffle, a new permutation each epoch), read off its train_log losses on tests/fixtures/hf-tiny
# (lr 1e-9: each update's loss is the base model's loss of one line). The PyTorch side follows it
# (--torch-order janus, the default), cycling through these 8 after the second epoch; both sides'
# first losses then agree (the orchestrator prints the difference).
JANUS_ORDER_SEED0 = [1, 2, 3, 0, 0, 2, 3, 1]


# ------------------------------------------------------------------------------------------------
# Shared helpers (no torch, no numpy: the orchestrator and the janus worker stay small)
# ------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int) -> float:
    """janus-rs's TrainOptions::lr_at with warmup 0: cosine from LR to 0 over `total` updates."""
    return LR * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def image_size_of(model: Path) -> int:
    """The image side the processor resizes to (processor_config.json, else preprocessor_config.json)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = model / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            ip = cfg.get("image_processor", cfg)
            size = ip.get("size") or {}
            if "height" in size:
                return int(size["height"])
    cfg = json.loads((model / "config.json").read_text())
    return int(cfg["vision_config"]["image_size"])


def cache_root() -> Path:
    env = os.environ.get("JANUS_BENCH_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/janus-rs-bench").expanduser()


def default_janus_bin() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    if target and (Path(target) / "release" / "janus").is_file():
        return Path(target) / "release" / "janus"
    return Path("~/.cache/janus-rs-target/release/janus").expanduser()


def default_torch_python() -> str:
    return REF_PYTHON if Path(REF_PYTHON).is_file() else sys.executable


def proc_status_kb(pid: int | str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm(pid: int | str) -> bool:
    """Resets VmHWM of a process to its current RSS (Linux >= 4.0: "5" into /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------
# Data (worker: needs numpy + Pillow)
# ------------------------------------------------------------------------------------------------
def data_worker(args) -> None:
    """Writes data.jsonl and img0..3.png (synthetic_image of make_fixtures.py, size x size) into --data-dir."""
    sys.path.insert(0, str(REFERENCE))
    import make_fixtures as mf
    from PIL import Image

    out = Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for s in SAMPLES:
        names += [s["image"]] if s["task"] == "generate" else s["images"]
    for name in names:
        i = int(name[3:-4])
        Image.fromarray(mf.synthetic_image(args.size, args.size, IMAGE_SEED + i)).save(out / name, "PNG")
    lines = [json.dumps(s, ensure_ascii=False) for s in SAMPLES]
    (out / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# PyTorch side (worker: one configuration, one fresh process)
# ------------------------------------------------------------------------------------------------
def torch_worker(args) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    sys.path.insert(0, str(REFERENCE))
    import make_fixtures as mf
    from transformers import AutoProcessor, JanusForConditionalGeneration

    model_dir = Path(args.model)
    data = Path(args.data)
    lines = [json.loads(s) for s in data.read_text(encoding="utf-8").splitlines() if s.strip()]

    t = time.perf_counter()
    model = JanusForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32,
                                                          attn_implementation=args.attn)
    model.eval()                      # Janus has no dropout; eval keeps every module deterministic
    load_s = time.perf_counter() - t
    rss_after_load = (proc_status_kb("self", "VmRSS") or 0) / 1024
    # The PIL image processor, as make_fixtures.loss_setup: its rescale + normalise is (u8/255 - 0.5)/0.5.
    processor = AutoProcessor.from_pretrained(str(model_dir), backend="pil")
    tok = processor.tokenizer
    ids = {s: tok.convert_tokens_to_ids(s) for s in mf.tokenizer_strings()}
    cfg = model.config
    vision_size = cfg.vision_config.image_size
    vq_size = mf.vq_input_size(cfg)
    if vq_size != vision_size:
        raise SystemExit(f"the VQ input side {vq_size} differs from the vision side {vision_size}: the "
                         "generate images would need their own size")

    if args.config == "lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                      bias="none", target_modules=mf.LORA_TARGET_MODULES))
        peft_model.eval()
        mf.lora_check_targets(peft_model)
        model = peft_model.get_base_model()          # the adapters sit inside its modules
        for n, p in model.named_parameters():
            assert p.requires_grad == (".lora_A." in n or ".lora_B." in n), n
    elif args.config == "stage1":
        model.requires_grad_(False)
        for name in STAGE1_MODULES:
            getattr(model.model, name).requires_grad_(True)
    else:
        raise SystemExit(f"unknown configuration {args.config}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    def load_rgb(name: str, size: int):
        import numpy as np
        from PIL import Image

        with Image.open(data.parent / name) as im:
            arr = np.asarray(im.convert("RGB"))
        assert arr.shape == (size, size, 3), (name, arr.shape, size)
        return arr

    def vq_codes(x):
        """The official (l2-normalised) quantizer's codes, as janus-rs and make_fixtures.grads_inputs."""
        vq = model.model.vqmodel
        h = vq.quant_conv(vq.encoder(x))
        z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]).double()
        e = vq.quantize.embedding.weight.double()
        return (torch.cdist(F.normalize(z, dim=-1), F.normalize(e, dim=-1)) ** 2).argmin(-1)

    def prepare(line) -> dict:
        """Everything a step does before the differentiable forward: template, tokens, image decode,
        preprocessing, and for a generate sample the VQ encoding (no gradient)."""
        if line["task"] == "generate":
            text = processor.apply_chat_template(mf.api_messages([("user", line["prompt"], 0)]),
                                                 add_generation_prompt=True)
            prompt = processor(text=text, generation_mode="image", return_tensors="pt")["input_ids"]
            image = load_rgb(line["image"], vq_size)
            x = processor.image_processor(images=[image], return_tensors="pt").pixel_values.float()
            with torch.no_grad():
                codes = vq_codes(x)
            return {"task": "generate", "prompt": prompt, "codes": codes}
        if line["task"] == "understand":
            text = processor.apply_chat_template(
                mf.api_messages([("user", line["question"], len(line["images"]))]), add_generation_prompt=True)
            images = [load_rgb(n, vision_size) for n in line["images"]]
            inputs = processor(text=text, images=images, return_tensors="pt")
            prompt = inputs["input_ids"][0]
            targets = tok(line["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            full = torch.cat([prompt, torch.tensor(targets, dtype=torch.int64)])[None]
            return {"task": "understand", "input_ids": full, "prompt_len": prompt.shape[0],
                    "pixel_values": inputs["pixel_values"].float()}
        raise SystemExit(f"unsupported task {line['task']}")

    def loss_of(x):
        if x["task"] == "generate":
            return mf.generate_loss(model, x["prompt"], x["codes"])
        # make_fixtures.understand_loss, with the LM head applied only at the positions that predict a
        # target (the answer and EOS are the last n ids: logits_to_keep = n + 1, the last row dropped),
        # as janus-rs does; --check compares the two.
        full = x["input_ids"]
        n = full.shape[1] - x["prompt_len"]
        logits = model(input_ids=full, pixel_values=x["pixel_values"], logits_to_keep=n + 1).logits[0, :n]
        return F.cross_entropy(logits, full[0, -n:])

    sample_losses = None
    check = None
    if args.check:
        # make_fixtures' own inputs and losses (grads_inputs / grads_line_losses) on these images.
        mf.train_image = lambda name, size: load_rgb(name, size)
        with torch.no_grad():
            ref_in = mf.grads_inputs(model, processor, ids, lines, vision_size, vq_size)
            ref = mf.grads_line_losses(model, ref_in, torch.float32).tolist()
            mine_in = [prepare(line) for line in lines]
            mine = [float(loss_of(x)) for x in mine_in]
        for r, m in zip(ref_in, mine_in):
            if r["task"] == "generate":
                assert torch.equal(r["prompt"], m["prompt"]) and torch.equal(r["codes"], m["codes"])
            else:
                assert torch.equal(r["input_ids"], m["input_ids"]) and r["prompt_len"] == m["prompt_len"]
                assert torch.equal(r["pixel_values"], m["pixel_values"])
        rel = max(abs(a / b - 1) for a, b in zip(mine, ref))
        if rel > 1e-5:
            raise SystemExit(f"losses {mine} differ from make_fixtures' {ref} (rel {rel:.2e})")
        sample_losses, check = mine, {"max_rel_vs_make_fixtures": rel}
        print(f"check: sample losses {[round(v, 5) for v in mine]} agree with make_fixtures "
              f"(max rel {rel:.1e})", file=sys.stderr, flush=True)

    total = args.warmup + args.steps
    step_s, losses, tasks = [], [], []
    first_step_end = None
    order = JANUS_ORDER_SEED0 if args.torch_order == "janus" else list(range(len(lines)))
    assert sorted(set(order)) == list(range(len(lines))), (order, len(lines))
    hwm_reset = False
    for k in range(total):
        line = lines[order[k % len(order)]]
        if k == args.warmup:
            hwm_reset = reset_hwm("self")    # from here VmHWM is the timed window's peak
        t = time.perf_counter()
        x = prepare(line)
        loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        for g in opt.param_groups:
            g["lr"] = lr_at(k, total)
        opt.step()
        value = loss.item()
        step_s.append(time.perf_counter() - t)
        losses.append(value)
        tasks.append(line["task"])
        if first_step_end is None:
            first_step_end = time.time()
        print(f"torch {args.config}: step {k + 1}/{total} {line['task']:<10} loss {value:.4f} "
              f"{step_s[-1]:.3f} s", file=sys.stderr, flush=True)

    import peft
    import transformers

    timed = step_s[args.warmup:]
    hwm = proc_status_kb("self", "VmHWM")
    emit({
        "load_s": load_s,
        "first_step_end_s": first_step_end - args.spawned_at if args.spawned_at else None,
        "step_s": step_s,
        "timed_s": sum(timed),
        "losses": losses,
        "tasks": tasks,
        "order": [order[k % len(order)] for k in range(total)],
        "sample_losses": sample_losses,
        "check": check,
        "trainable_params": trainable_params,
        "attn": args.attn,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_after_load,
        "peak_rss_timed_mb": hwm / 1024 if hwm is not None and hwm_reset else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
    })


# ------------------------------------------------------------------------------------------------
# janus-rs side (worker: one configuration, one fresh process that only runs `janus train`)
# ------------------------------------------------------------------------------------------------
def janus_worker(args) -> None:
    """Runs `janus train`, timestamps the lines of OUT/train_log.jsonl as they arrive (polling), kills
    the process once the last update's line is there (so the model is not saved), and reports the
    peak RSS of that child (getrusage(RUSAGE_CHILDREN) after it is reaped)."""
    total = args.warmup + args.steps
    out = Path(tempfile.mkdtemp(prefix="janus-train-bench-"))
    try:
        cmd = [args.janus_bin, "train", "--model", args.model, "--data", args.data, "--out", str(out / "run"),
               "--steps", str(total), "--lr", repr(LR), "--weight-decay", repr(WEIGHT_DECAY),
               "--clip", repr(CLIP), "--cfg-drop", "0", "--seed", str(SEED), "--batch-size", "1",
               "--grad-accum", "1", "--warmup", "0", "--dtype", "f32"]
        if args.config == "lora":
            cmd += ["--lora", str(LORA_RANK), "--lora-alpha", str(LORA_ALPHA)]
        elif args.config == "stage1":
            cmd += ["--stage", "1"]
        else:
            raise SystemExit(f"unknown configuration {args.config}")
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
        log = out / "run" / "train_log.jsonl"
        err_path = out / "stderr.txt"
        with open(err_path, "wb") as err:
            t0 = time.time()
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            arrivals, entries, buf, pos = [], [], b"", 0
            hwm_kb, hwm_reset = 0, False
            killed = False
            while True:
                now = time.time()
                exited = p.poll() is not None      # before the read: a line written before exit is seen
                if log.exists():
                    with open(log, "rb") as f:
                        f.seek(pos)
                        chunk = f.read()
                    pos += len(chunk)
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            entries.append(json.loads(line))
                            arrivals.append(now)
                if not hwm_reset and len(entries) >= args.warmup and not exited:
                    # the timed window starts: from here VmHWM is its peak (read before the kill below)
                    hwm_reset = reset_hwm(p.pid)
                    hwm_kb = 0
                if hwm_reset:
                    hwm_kb = max(hwm_kb, proc_status_kb(p.pid, "VmHWM") or 0)
                if len(entries) >= total:
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)   # skip saving: only training is measured
                        killed = True
                    break
                if exited:
                    break
                time.sleep(args.poll_ms / 1000)
            p.wait()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        stderr_tail = err_path.read_text(errors="replace")[-3000:]
        if len(entries) < total:
            raise SystemExit(f"janus train ended (status {p.returncode}) after {len(entries)} of {total} "
                             f"updates:\n{' '.join(cmd)}\n{stderr_tail}")
        # Step k (1-based) ends when line k arrives; step 1 also holds process start and model load.
        step_s = [arrivals[0] - t0] + [b - a for a, b in zip(arrivals, arrivals[1:])]
        timed = arrivals[total - 1] - arrivals[args.warmup - 1]
        per_step = timed / args.steps
        emit({
            "load_s": None,
            "load_s_est": arrivals[0] - t0 - per_step,
            "first_step_end_s": arrivals[0] - t0,
            "step_s": step_s,
            "timed_s": timed,
            "losses": [e["loss"] for e in entries],
            "lrs": [e["lr"] for e in entries],
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_rss_timed_mb": hwm_kb / 1024 if hwm_reset and hwm_kb else None,
            "killed_after_last_step": killed,
            "command": [Path(cmd[0]).name] + cmd[1:],
            "janus_bin": args.janus_bin,
            "janus_bin_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(args.janus_bin))),
            "poll_ms": args.poll_ms,
        })
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------------
def run_worker(cmd: list[str], env: dict | None = None) -> dict:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fmt(v) -> str:
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def table(records: list[dict]) -> str:
    by = {(r["side"], r["config"]): r for r in records}
    rows = ["| configuration | janus-rs s/step | samples/s | peak RSS GiB | PyTorch s/step | samples/s "
            "| peak RSS GiB | ratio |", "|---|---|---|---|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in records):
        cells = [config]
        sps = {}
        for side in ("janus-rs", "torch"):
            r = by.get((side, config))
            if r is None:
                cells += ["–", "–", "–"]
                continue
            sps[side] = r["s_per_step"]
            cells += [fmt(r["s_per_step"]), fmt(r["samples_per_s"]), f"{r['peak_rss_mb'] / 1024:.2f}"]
        ratio = sps["torch"] / sps["janus-rs"] if len(sps) == 2 else None
        cells.append(f"{ratio:.2f}" if ratio is not None else "–")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="transformers-layout folder (default %(default)s)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of lora,stage1")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated, of janus,torch")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates first (at least 1; default 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed updates (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads / RAYON_NUM_THREADS (default 2)")
    ap.add_argument("--janus-bin", default=None,
                    help="janus executable (default $CARGO_TARGET_DIR/release/janus if it exists, else "
                         "~/.cache/janus-rs-target/release/janus)")
    ap.add_argument("--records", default=str(DEFAULT_RECORDS), help="JSON lines appended to (default %(default)s)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="PyTorch attention implementation (default %(default)s, transformers' default)")
    ap.add_argument("--check", action="store_true",
                    help="PyTorch side: before the warm-up, compare each sample's loss and inputs with "
                         "make_fixtures.grads_inputs / grads_line_losses (untimed; adds to peak RSS)")
    ap.add_argument("--data-dir", default=None,
                    help="where data.jsonl and the images go (default $JANUS_BENCH_CACHE or "
                         "~/.cache/janus-rs-bench, /train-data-<image size>)")
    ap.add_argument("--torch-python", default=default_torch_python(),
                    help="Python with torch 2.x, transformers 5.24, peft 0.21 (default %(default)s)")
    ap.add_argument("--torch-order", default="janus", choices=["janus", "file"],
                    help="PyTorch side's sample order: janus-rs's at seed 0 (default) or data.jsonl's")
    ap.add_argument("--poll-ms", type=float, default=20, help="janus log polling period (default %(default)s)")
    # workers (internal)
    ap.add_argument("--worker", choices=["torch", "janus", "data"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "janus":
        return janus_worker(args)
    if args.worker == "data":
        return data_worker(args)

    model = Path(args.model).expanduser().resolve()
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model}: no config.json (write it with bench/make_checkpoints.py --only hf)")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c} (of {', '.join(CONFIGS)})")
    for s in sides:
        if s not in SIDES:
            raise SystemExit(f"unknown side {s} (of {', '.join(SIDES)})")
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the janus-rs window starts at the end of "
                         "the last warm-up update)")
    janus_bin = Path(args.janus_bin).expanduser() if args.janus_bin else default_janus_bin()
    if "janus" in sides and not os.access(janus_bin, os.X_OK):
        raise SystemExit(f"{janus_bin}: no janus executable (cargo build --release -p janus-cli, or --janus-bin)")

    size = image_size_of(model)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else cache_root() / f"train-data-{size}"
    subprocess.run([args.torch_python, str(Path(__file__).resolve()), "--worker", "data", "--data-dir",
                    str(data_dir), "--size", str(size)], check=True)
    data = data_dir / "data.jsonl"
    print(f"data: {data} (4 samples, {size}x{size} images); model {model}; {args.threads} threads; "
          f"{args.warmup} warm-up + {args.steps} timed updates", flush=True)

    common = {"bench": "train", "model": str(model), "image_size": size, "dtype": "f32", "threads": args.threads,
              "batch_size": 1, "grad_accum": 1, "cfg_drop": 0.0, "warmup": args.warmup, "steps": args.steps,
              "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY, "clip": CLIP,
              "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads))
    me = str(Path(__file__).resolve())
    records = []
    for config in configs:
        for side in sides:
            worker = ["--worker", side, "--config", config, "--model", str(model), "--data", str(data),
                      "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
            if side == "torch":
                cmd = [args.torch_python, me, *worker, "--attn", args.attn, "--torch-order", args.torch_order,
                       "--spawned-at", repr(time.time())]
                if args.check:
                    cmd.append("--check")
            else:
                # a small Python (no torch) that only starts janus: RUSAGE_CHILDREN is then janus's peak
                cmd = [sys.executable, me, *worker, "--janus-bin", str(janus_bin), "--poll-ms", str(args.poll_ms)]
            print(f"{side} {config}: running", flush=True)
            r = run_worker(cmd, env)
            rec = {**common, "side": "janus-rs" if side == "janus" else "torch", "config": config, **r}
            rec["s_per_step"] = rec["timed_s"] / args.steps
            rec["samples_per_s"] = args.steps / rec["timed_s"]
            rec["first_loss"] = rec["losses"][0]
            if rec["side"] == "janus-rs":
                rec["lora"] = {"rank": LORA_RANK, "alpha": LORA_ALPHA} if config == "lora" else None
            other = [o for o in records if o["config"] == config and o["side"] != rec["side"]]
            if other:
                pair = {rec["side"]: rec["first_loss"], other[0]["side"]: other[0]["first_loss"]}
                a, b = pair["janus-rs"], pair["torch"]
                rec["first_loss_rel_diff"] = abs(a / b - 1)
                same = rec["first_loss_rel_diff"] < 1e-3
                print(f"{config}: first-step losses janus-rs / PyTorch {a:.6f} / {b:.6f} (rel diff "
                      f"{rec['first_loss_rel_diff']:.1e}){'' if same else ': NOT the same sample or objective'}",
                      flush=True)
            records.append(rec)
            with open(args.records, "a") as f:
                f.write(json.dumps(rec) + "\n")
            load = rec["load_s"] if rec.get("load_s") is not None else rec.get("load_s_est")
            print(f"{rec['side']} {config}: {rec['s_per_step']:.3f} s/step, {rec['samples_per_s']:.3f} samples/s, "
                  f"peak RSS {rec['peak_rss_mb'] / 1024:.2f} GiB (timed window "
                  f"{fmt((rec.get('peak_rss_timed_mb') or 0) / 1024) if rec.get('peak_rss_timed_mb') else '–'} GiB), load {load:.2f} s"
                  f"{'' if rec.get('load_s') is not None else ' (estimate)'}, first loss {rec['first_loss']:.4f}, "
                  f"losses {[round(v, 4) for v in rec['losses']]}", flush=True)
    print()
    print(table(records))
    print("\nratio = PyTorch s/step / janus-rs s/step (above 1: janus-rs is faster). "
          f"Records appended to {args.records}.")


if __name__ == "__main__":
    main()
