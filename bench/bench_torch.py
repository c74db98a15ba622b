#!/usr/bin/env python3
"""PyTorch side of the janus-rs benchmarks: one task per process, one JSON object on stdout.

    bench_torch.py --model DIR --task {load,understand,generate,vq_decode,siglip}
                   [--impl hf|official] [--dtype f32|bf16] [--threads T] [--image PNG]
                   [--question TEXT] [--prompt TEXT] [--parallel N] [--steps S] [--repeat R]
                   [--seed K] [--attn sdpa|eager] [--warmup W]

--impl hf (default): transformers' JanusForConditionalGeneration on a transformers-layout folder
(model_type "janus"), the pip-installable reference.  --impl official: DeepSeek's
MultiModalityCausalLM on an original-layout folder (model_type "multi_modality"); needs
PYTHONPATH=/opt/tf457:/tmp/janus-official (transformers 4.57.1 + deepseek-ai/Janus).

Eager PyTorch on the CPU (or on CUDA with --device cuda), torch.inference_mode(), torch.set_num_threads(T).  Every size (image side,
image tokens, VQ grid, codebook size) is read from the checkpoint's config.  What each task times is
specified in bench/README.md; the Rust bench does the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

DEFAULT_QUESTION = "What is shown in this image? Describe the colors, the shapes and the objects in detail."
DEFAULT_PROMPT = "A watercolor painting of a red fox sitting in a snowy forest at sunrise."
CFG_WEIGHT = 5.0
UNDERSTAND_TOKENS = 32


# Where the model runs (--device): the CPU, or "cuda" (every timestamp waits for the GPU's queue).
DEVICE = "cpu"


def now() -> float:
    if DEVICE != "cpu":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def summary(values_s: list[float]) -> dict:
    """median / min / max in milliseconds."""
    return {"ms": ms(statistics.median(values_s)), "min_ms": ms(min(values_s)), "max_ms": ms(max(values_s))}


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


def synthetic_image(size: int):
    """Fallback input when --image is not given: R = x ramp, G = y ramp, B = 128 (u8, size x size)."""
    import numpy as np
    from PIL import Image

    ramp = (np.arange(size, dtype=np.float64) * 255 / max(size - 1, 1)).round().astype(np.uint8)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    img[..., 2] = 128
    return Image.fromarray(img)


def load_image(args, size: int):
    from PIL import Image

    if args.image:
        return Image.open(args.image).convert("RGB")
    return synthetic_image(size)


# ------------------------------------------------------------------------------------------------
# transformers (model_type janus)
# ------------------------------------------------------------------------------------------------
class HfJanus:
    """Thin adapter: every method is the work one task times."""

    def __init__(self, folder: str, dtype, attn: str):
        import torch
        from transformers import JanusForConditionalGeneration

        self.torch = torch
        t0 = now()
        self.model = JanusForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
        self.model.to(DEVICE).eval()
        self.load_s = now() - t0
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        self.tokenizer = self.processor.tokenizer
        cfg = self.model.config
        gen = self.model.generation_config
        self.dtype = dtype
        self.image_size = cfg.vision_config.image_size
        self.num_image_tokens = cfg.vision_config.num_image_tokens
        self.vq_grid = cfg.vq_config.num_patches
        self.codebook_size = cfg.vq_config.num_embeddings
        self.bos_id = gen.bos_token_id
        self.pad_id = gen.pad_token_id
        self.boi_id = gen.generation_kwargs["boi_token_id"]
        self.image_token_id = cfg.image_token_id

    # -- inputs (not timed) -------------------------------------------------------------------
    def understand_inputs(self, image, question: str):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=prompt, images=[image], return_tensors="pt")
        return prompt, inputs["input_ids"].to(DEVICE), inputs["pixel_values"].to(DEVICE, self.dtype)

    def generate_input_ids(self, text: str):
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.processor(text=prompt, generation_mode="image", return_tensors="pt")["input_ids"]
        return prompt + self.processor.image_start_token, ids.to(DEVICE)

    def pixel_values(self, image):
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].to(DEVICE, self.dtype)

    # -- timed pieces ---------------------------------------------------------------------------
    def image_embeds(self, pixel_values):
        """SigLIP tower + aligner: [n_images, num_image_tokens, hidden]."""
        return self.model.model.get_image_features(pixel_values).pooler_output

    def prefill_with_image(self, input_ids, image_embeds):
        """Scatter the image embeddings, one LLM forward over the prompt, lm_head at the last position."""
        torch = self.torch
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        out = self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        return torch.argmax(out.logits[:, -1, :], dim=-1), out.cache

    def text_step(self, token, cache):
        out = self.model(input_ids=token[:, None], cache=cache, use_cache=True, logits_to_keep=1)
        return self.torch.argmax(out.logits[:, -1, :], dim=-1), out.cache

    def cfg_rows(self, input_ids, parallel: int):
        """[2N, L]: N conditional rows, then N unconditional rows (pad except BOS / BOI), as
        JanusForConditionalGeneration.generate builds them."""
        cond = input_ids.repeat(parallel, 1)
        uncond = cond.clone()
        keep = (uncond == self.bos_id) | (uncond == self.boi_id)
        uncond.masked_fill_(~keep, self.pad_id)
        return self.torch.cat([cond, uncond], dim=0)

    def gen_prefill_embeds(self, rows):
        return self.model.get_input_embeddings()(rows)

    def gen_lm(self, embeds, cache):
        out = self.model.model.language_model(inputs_embeds=embeds, cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1, :], out.cache

    def gen_split(self, logits, parallel: int):
        return logits[:parallel], logits[parallel:]

    def gen_head(self, hidden):
        return self.model.model.generation_head(hidden)

    def gen_next_embeds(self, tokens):
        both = self.torch.cat([tokens, tokens]).unsqueeze(-1)      # [2N, 1]
        return self.model.prepare_embeddings_for_image_generation(both)

    def vq_decode(self, ids):
        return self.model.model.vqmodel.decode(ids)


# ------------------------------------------------------------------------------------------------
# official DeepSeek code (model_type multi_modality)
# ------------------------------------------------------------------------------------------------
class OfficialJanus(HfJanus):
    def __init__(self, folder: str, dtype, attn: str):
        import torch

        try:
            from janus.models import MultiModalityCausalLM, VLChatProcessor
            from janus.models.modeling_vlm import MultiModalityConfig
        except Exception as e:  # pragma: no cover
            raise SystemExit("--impl official needs the DeepSeek Janus code and transformers 4.57 on PYTHONPATH "
                             f"(e.g. PYTHONPATH=/opt/tf457:/tmp/janus-official): {e!r}")
        self.torch = torch
        t0 = now()
        config = MultiModalityConfig.from_pretrained(folder)
        config.language_config._attn_implementation = attn
        self.model = MultiModalityCausalLM.from_pretrained(folder, config=config, dtype=dtype)
        self.model = self.model.to(dtype).eval()
        self.load_s = now() - t0
        self.processor = VLChatProcessor.from_pretrained(folder)
        self.processor.system_prompt = ""          # the same prompt as the transformers chat template
        self.tokenizer = self.processor.tokenizer
        self.dtype = dtype
        self.image_size = int(config.vision_config.params["image_size"])
        self.num_image_tokens = int(self.processor.num_image_tokens)
        self.vq_grid = self.image_size // 16                    # VQ-16: one code per 16x16 pixels
        self.codebook_size = int(config.gen_vision_config.params["image_token_size"])
        self.codebook_dim = int(config.gen_vision_config.params["n_embed"])
        self.pad_id = self.processor.pad_id
        self.image_token_id = self.processor.image_id

    def understand_inputs(self, image, question: str):
        p = self.processor
        conversation = [{"role": "<|User|>", "content": f"{p.image_tag}\n{question}",
                         "images": ["input"]}, {"role": "<|Assistant|>", "content": ""}]
        prep = p(conversations=conversation, images=[image], force_batchify=True)
        return prep.sft_format[0], prep.input_ids, prep.pixel_values[:, 0].to(self.dtype)

    def generate_input_ids(self, text: str):
        p = self.processor
        conversation = [{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}]
        sft = p.apply_sft_template_for_multi_turn_prompts(conversations=conversation, sft_format=p.sft_format,
                                                          system_prompt="")
        prompt = sft + p.image_start_tag
        return prompt, self.torch.tensor([p.tokenizer.encode(prompt)], dtype=self.torch.long)

    def pixel_values(self, image):
        return self.processor.image_processor([image], return_tensors="pt").pixel_values.to(self.dtype)

    def image_embeds(self, pixel_values):
        return self.model.aligner(self.model.vision_model(pixel_values))

    def prefill_with_image(self, input_ids, image_embeds):
        lm = self.model.language_model
        embeds = lm.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
        out = lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        return self.torch.argmax(out.logits[:, -1, :], dim=-1), out.past_key_values

    def text_step(self, token, cache):
        out = self.model.language_model(input_ids=token[:, None], past_key_values=cache, use_cache=True,
                                        logits_to_keep=1)
        return self.torch.argmax(out.logits[:, -1, :], dim=-1), out.past_key_values

    def cfg_rows(self, input_ids, parallel: int):
        """[2N, L] interleaved (cond, uncond) pairs as generation_inference.py builds them: the
        unconditional row keeps only the first and the last token (BOS, <begin_of_image>)."""
        ids = input_ids[0]
        rows = ids.repeat(2 * parallel, 1)
        rows[1::2, 1:-1] = self.pad_id
        return rows

    def gen_prefill_embeds(self, rows):
        return self.model.language_model.get_input_embeddings()(rows)

    def gen_lm(self, embeds, cache):
        out = self.model.language_model.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1, :], out.past_key_values

    def gen_split(self, logits, parallel: int):
        return logits[0::2], logits[1::2]

    def gen_head(self, hidden):
        return self.model.gen_head(hidden)

    def gen_next_embeds(self, tokens):
        both = self.torch.stack([tokens, tokens], dim=1).reshape(-1)  # interleaved [2N]
        return self.model.prepare_gen_img_embeds(both).unsqueeze(1)

    def vq_decode(self, ids):
        g = self.vq_grid
        return self.model.gen_vision_model.decode_code(ids.to(self.torch.int),
                                                       shape=[ids.shape[0], self.codebook_dim, g, g])


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------
def task_load(m, args) -> dict:
    return {}


def task_understand(m, args) -> dict:
    image = load_image(args, m.image_size)
    prompt, input_ids, pixel_values = m.understand_inputs(image, args.question)
    question_tokens = len(m.tokenizer(args.question, add_special_tokens=False)["input_ids"])

    def once():
        t0 = now()
        embeds = m.image_embeds(pixel_values)
        t1 = now()
        token, cache = m.prefill_with_image(input_ids, embeds)
        t2 = now()
        tokens = [int(token[0])]
        step_s = []
        for _ in range(UNDERSTAND_TOKENS - 1):
            s0 = now()
            token, cache = m.text_step(token, cache)
            tokens.append(int(token[0]))          # .item(): the step ends with the id on the host
            step_s.append(now() - s0)
        return t1 - t0, t2 - t0, step_s, tokens

    for _ in range(args.warmup):
        once()
    vision_s, prefill_s, step_s, tokens = once()
    decode_s = sum(step_s)
    return {
        "prompt": prompt, "question_tokens": question_tokens, "prompt_tokens": int(input_ids.shape[1]),
        "image_tokens": int((input_ids == m.image_token_id).sum()),
        "vision_ms": ms(vision_s), "prefill_ms": ms(prefill_s),
        "new_tokens": len(tokens), "decode_ms_total": ms(decode_s),
        "decode_tokens_per_s": round((UNDERSTAND_TOKENS - 1) / decode_s, 3),
        "decode_step_ms_median": ms(statistics.median(step_s)),
        "token_ids": tokens,
    }


def task_generate(m, args) -> dict:
    torch = m.torch
    n = args.parallel
    prompt, input_ids = m.generate_input_ids(args.prompt)
    rows = m.cfg_rows(input_ids, n)

    def once():
        torch.manual_seed(args.seed)
        tokens = []
        step_s = []
        t0 = now()
        embeds = m.gen_prefill_embeds(rows)
        cache = None
        for i in range(args.steps):
            s0 = now()
            if i > 0:
                embeds = m.gen_next_embeds(tokens[-1])
            hidden, cache = m.gen_lm(embeds, cache)
            logits = m.gen_head(hidden).float()
            cond, uncond = m.gen_split(logits, n)
            guided = uncond + CFG_WEIGHT * (cond - uncond)
            probs = torch.softmax(guided, dim=-1)              # temperature 1
            token = torch.multinomial(probs, num_samples=1).squeeze(-1)   # [N]
            tokens.append(token)
            if i == 0:
                prefill_end = now()
            else:
                step_s.append(now() - s0)
        total = now() - t0
        return prefill_end - t0, step_s, total, torch.stack(tokens, dim=1)

    for _ in range(args.warmup):
        once()
    prefill_s, step_s, total_s, grid = once()
    out = {
        "prompt": prompt, "prompt_tokens": int(input_ids.shape[1]), "parallel": n, "batch_rows": int(rows.shape[0]),
        "steps": args.steps, "prefill_ms": ms(prefill_s), "total_ms": ms(total_s),
        "tokens_head": grid[0, :8].tolist(),
    }
    if step_s:
        out.update({"ms_per_step": ms(statistics.median(step_s)), "step_min_ms": ms(min(step_s)),
                    "step_max_ms": ms(max(step_s))})
    if args.steps == m.num_image_tokens:
        t0 = now()
        pixels = m.vq_decode(grid)
        out["vq_decode_ms"] = ms(now() - t0)
        out["image_shape"] = list(pixels.shape)
        if args.save_image:
            save_images(pixels, args.save_image)
    return out


def save_images(pixels, path: str) -> None:
    """[N, 3, H, W] in [-1, 1] -> PNG(s) (path, or path with _k before the suffix when N > 1)."""
    import numpy as np
    from PIL import Image

    arr = ((pixels.float().clamp(-1, 1) + 1) / 2 * 255).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
    p = Path(path)
    for k, img in enumerate(arr):
        target = p if len(arr) == 1 else p.with_name(f"{p.stem}_{k}{p.suffix}")
        Image.fromarray(img).save(target)


def repeated(fn, args) -> dict:
    fn()                                               # warm-up
    times = []
    for _ in range(args.repeat):
        t0 = now()
        fn()
        times.append(now() - t0)
    return {**summary(times), "repeat": args.repeat}


def task_vq_decode(m, args) -> dict:
    torch = m.torch
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, m.codebook_size, (1, m.vq_grid * m.vq_grid), generator=g, dtype=torch.long).to(DEVICE)
    holder = {}

    def fn():
        holder["pixels"] = m.vq_decode(ids)

    out = repeated(fn, args)
    return {**out, "grid": [m.vq_grid, m.vq_grid], "image_shape": list(holder["pixels"].shape)}


def task_siglip(m, args) -> dict:
    image = load_image(args, m.image_size)
    pixel_values = m.pixel_values(image)
    holder = {}

    def fn():
        holder["embeds"] = m.image_embeds(pixel_values)

    out = repeated(fn, args)
    return {**out, "pixel_values_shape": list(pixel_values.shape), "embeds_shape": list(holder["embeds"].shape)}


TASKS = {"load": task_load, "understand": task_understand, "generate": task_generate,
         "vq_decode": task_vq_decode, "siglip": task_siglip}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--impl", choices=["hf", "official"], default="hf")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32", help="compute dtype (default f32)")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda (transformers layout only); timestamps synchronize the GPU")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                    help="attention implementation of the LLM (default sdpa, transformers' default)")
    ap.add_argument("--image", default=None, help="input image for understand / siglip (default: a synthetic ramp)")
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="text of the generate task")
    ap.add_argument("--parallel", type=int, default=1, help="images per generate run (CFG batch = 2N rows)")
    ap.add_argument("--steps", type=int, default=32, help="image tokens per generate run")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions of vq_decode / siglip")
    ap.add_argument("--warmup", type=int, default=0, help="untimed full runs before understand / generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-image", default=None, help="generate with --steps = image tokens: write the PNG(s)")
    args = ap.parse_args(argv)
    if args.parallel < 1 or args.steps < 1 or args.repeat < 1 or args.threads < 1:
        ap.error("--parallel, --steps, --repeat and --threads must be >= 1")
    if args.device != "cpu" and args.impl != "hf":
        ap.error("--device cuda runs the transformers layout (--impl hf)")
    global DEVICE
    DEVICE = args.device

    with contextlib.redirect_stdout(sys.stderr):        # stdout carries the JSON only
        import torch

        torch.set_num_threads(args.threads)
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
        cls = OfficialJanus if args.impl == "official" else HfJanus
        with torch.inference_mode():
            m = cls(args.model, dtype, args.attn)
            result = TASKS[args.task](m, args)
        import transformers

        record = {
            "impl": args.impl, "task": args.task, "model": str(Path(args.model).resolve()),
            "dtype": args.dtype, "threads": torch.get_num_threads(), "attn": args.attn,
            "load_s": round(m.load_s, 3), **result,
            "peak_rss_mb": round(peak_rss_mb(), 1), "device": args.device,
            **({"peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if args.device != "cpu" else {}),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
        }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
