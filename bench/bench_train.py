"""Our LoRA training loop against a reference loop, measured in the same run.

The reference does what diffusers' `train_dreambooth_lora.py` does every step: load and
transform the batch's images, tokenize its prompts, encode them with the VAE and the text
encoder, then one UNet step with gradient clipping.
Ours caches latents and text embeddings once. Both train the same peft LoRA (rank 4, attention
q/k/v/out) with prior preservation on the same model, photos, class images and steps.

    python bench/bench_train.py            # tiny: steps/s and whole-run wall time
    python bench/bench_train.py --memory   # + peak RSS on the full-size SD1.5 layout at 256 px

Each measurement runs in a fresh process so peak RSS belongs to that loop alone. The whole-run
time is that process's wall time, from interpreter start to exit: imports, model loading, data,
the loop and writing the LoRA count for both, as they do for a user.
Goals (issue 4): >= 1.5x the steps/s and <= 0.66x the wall time on tiny; <= 0.6x the peak
memory on the full-size layout.
"""
from __future__ import annotations

import argparse
import json
import os

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
# Both loops get the same thread count; one thread keeps the ratio stable when other work shares
# the cores (two OpenMP threads on two busy cores can run 10x slower).
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def reference_loop(base: str, dataset: Path, class_dir: Path, resolution: int, steps: int, seed: int = 0, *,
                   method: str = "lora", rank: int = 4, batch: int = 1, device: str = "cpu",
                   mixed_precision: str = "no", gradient_checkpointing: bool = False,
                   on_step: Callable[[int], None] | None = None) -> dict:
    """Each step as diffusers' train_dreambooth_lora.py (method "lora") or train_dreambooth.py
    ("dreambooth") does it: open and transform `batch` instance and `batch` class images and
    tokenize their prompts (its DreamBoothDataset.__getitem__, no worker processes), encode the
    images with the VAE and the prompts with the text encoder, one UNet step under autocast, clip
    the gradient norm to 1.0, step the optimizer and the (constant) LR schedule, read the loss.
    With --mixed_precision the frozen weights are cast to that precision and the trained ones stay
    fp32 (the LoRA script upcasts its adapters only for fp16; fp32 here, as ours trains them). It
    skips accelerate, which would only add to its time. `on_step(step)` is called after each step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image, ImageOps
    from safetensors.torch import save_file

    from training.data import load_dataset
    from training.examples import to_tensor
    from training.models import load_model

    started = time.perf_counter()
    device = torch.device(device)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    model = load_model(base)
    data = load_dataset(dataset)
    instance_paths = [i.image for i in data.items]
    class_paths = sorted(class_dir.rglob("class_*.png"))
    prompts = [data.instance_prompt, "a photo of a man"]
    for m in model.components().values():
        m.requires_grad_(False)
    for m in (model.vae, model.text_encoder):
        torch.nn.Module.to(m, device=device, dtype=weight_dtype)
    torch.manual_seed(seed)
    if method == "lora":
        torch.nn.Module.to(model.unet, device=device, dtype=weight_dtype)
        model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
    else:
        torch.nn.Module.to(model.unet, device=device, dtype=torch.float32)
        model.unet.requires_grad_(True)
        params = list(model.unet.parameters())
    if gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4 if method == "lora" else 2e-6, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant", optimizer)
    schedule = DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if k != "_class_name"})
    g = torch.Generator().manual_seed(seed)  # which images (the data loader's shuffle)
    noise_g = torch.Generator(device).manual_seed(seed)

    def example(paths: list[Path], prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(paths[int(torch.randint(len(paths), (1,), generator=g))]) as image:
            pixels = to_tensor(ImageOps.exif_transpose(image).convert("RGB"), resolution)
        ids = model.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
        return pixels, ids[0]

    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=mixed_precision != "no")
    model.unet.train()
    loop_start = time.perf_counter()
    for step in range(steps):
        examples = [example(instance_paths, prompts[0]) for _ in range(batch)] + \
                   [example(class_paths, prompts[1]) for _ in range(batch)]
        pixels = torch.stack([p for p, _ in examples]).to(device, weight_dtype)
        ids = torch.stack([i for _, i in examples]).to(device)
        with torch.no_grad():
            latents = model.vae.encode(pixels).latent_dist.sample(noise_g) * model.vae.config.scaling_factor
            context = model.text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=noise_g, device=device, dtype=latents.dtype)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=noise_g, device=device)
        with autocast:
            pred = model.unet(schedule.add_noise(latents, noise, t), t, context).sample
        instance, prior = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)).chunk(2)
        loss = instance.mean() + prior.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the scripts log the loss every step
        if on_step:
            on_step(step + 1)
    loop_s = time.perf_counter() - loop_start
    if method == "lora":
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model.unet).items()},
                  str(dataset.parent / "reference_lora.safetensors"))
    return {"loop_s": loop_s, "total_s": time.perf_counter() - started}


def our_loop(base: str, dataset: Path, class_dir: Path, resolution: int, steps: int, out: Path) -> dict:
    from training.train import train
    from training.train_config import TrainConfig

    started = time.perf_counter()
    loop = {}

    def progress(event) -> None:
        if event.stage == "train" and event.step == 1:
            loop["first_step_at"] = time.perf_counter()

    cfg = TrainConfig(base=base, instance_dir=str(dataset), output=str(out), steps=steps + 1, rank=4,
                      resolution=resolution, num_class_images=len(list(class_dir.rglob("class_*.png"))),
                      prior_preservation=True, class_dir=str(class_dir), save_every=0, overwrite=True, resume=False)
    train(cfg, progress=progress)
    end = time.perf_counter()
    # steps after the first one, to leave out the first step's one-off costs as the reference does
    return {"loop_s": end - loop["first_step_at"], "total_s": end - started}


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM). Not ru_maxrss: Linux carries
    that over from the parent through vfork + exec, so a child would report the parent's peak."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def random_sd15_file(path: Path) -> Path:
    """The full-size SD1.5 layout with random weights (seed 0) saved at `path` as an fp16 single file, as
    SD1.5 checkpoints usually come (no download); an existing file there is reused."""
    if not path.is_file():
        import torch

        from training.models import build_random, save_single_file

        save_single_file(build_random("sd15", seed=0), path, dtype=torch.float16)
    return path


def run_in_child(module: str, call: str, setup: str = "") -> dict:
    """`bench.<module>.<call>` in a fresh process (its own allocator, caches and peak memory) on THREADS
    threads; returns the dict it returns, with the child's peak RSS and the process's wall time."""
    code = (f"import json, sys, torch; torch.set_num_threads({THREADS}); sys.path.insert(0, {str(ROOT)!r});"
            f"from pathlib import Path; {setup}"
            f"import bench.{module} as b; import bench.bench_train as t;"
            f"r = b.{call}; r['peak_rss_mb'] = t.peak_rss_mb(); print(json.dumps(r))")
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    process_s = time.perf_counter() - started
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1]) | {"process_s": process_s}


def measure(kind: str, base: str, dataset: Path, class_dir: Path, resolution: int, steps: int) -> dict:
    """Run one loop in a fresh process; return its times, the process's wall time and peak RSS."""
    out = f", Path({str(dataset.parent / 'ours.safetensors')!r})" if kind == "our_loop" else ""
    return run_in_child("bench_train", f"{kind}({base!r}, Path({str(dataset)!r}), Path({str(class_dir)!r}), "
                                       f"{resolution}, {steps}{out})")


def setup(work: Path, base: str, resolution: int, num_class: int) -> tuple[Path, Path]:
    """Prepare the bundled photos and the class images once, outside any measurement."""
    from training.data import ClassImageConfig, ensure_class_images
    from training.data import PrepareConfig, prepare_dataset
    from training.models import load_model
    from training.sampling import make_generator

    dataset = work / "dataset"
    prepare_dataset(ROOT / "training" / "sample_data" / "subject", dataset, PrepareConfig(resolution=resolution))
    model = load_model(base)
    report = ensure_class_images(make_generator(model), model.sha256, work / "class_images",
                                 ClassImageConfig(num=num_class, resolution=resolution, steps=2, seed=0,
                                                  prompt="a photo of a {class}"))
    return dataset, report.folder


def compare(title: str, base: str, resolution: int, steps: int, work: Path, repeats: int = 1, note: str = "") -> None:
    """Alternate the two loops `repeats` times and report each one's median: on a shared machine
    one run of either can be 10% off."""
    import statistics

    dataset, class_dir = setup(work, base, resolution, num_class=4)
    runs: dict[str, list[dict]] = {"reference_loop": [], "our_loop": []}
    for _ in range(repeats):
        for kind, found in runs.items():
            found.append(measure(kind, base, dataset, class_dir, resolution, steps))
    ref, ours = ({key: statistics.median(r[key] for r in found) for key in found[0]} for found in runs.values())
    print(f"\n{title}: {steps} LoRA steps, prior preservation, {resolution} px, {THREADS} thread(s)"
          + (f", median of {repeats} runs each" if repeats > 1 else ""))
    print(f"{'':18}{'reference':>12}{'ours':>12}{'ratio':>10}")
    ref_rate, our_rate = steps / ref["loop_s"], steps / ours["loop_s"]
    print(f"{'steps/s':18}{ref_rate:12.2f}{our_rate:12.2f}{our_rate / ref_rate:9.2f}x")
    print(f"{'whole run (s)':18}{ref['process_s']:12.2f}{ours['process_s']:12.2f}"
          f"{ours['process_s'] / ref['process_s']:9.2f}x")
    print(f"{'peak RSS (MB)':18}{ref['peak_rss_mb']:12.0f}{ours['peak_rss_mb']:12.0f}"
          f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:9.2f}x")
    if note:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="LoRA steps (800: the trainer's default)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop on tiny (the median is shown)")
    parser.add_argument("--memory", action="store_true", help="also compare peak RSS on the full-size SD1.5 layout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        compare("tiny", "tiny", 64, args.steps, Path(tmp) / "tiny", args.repeats)
        if args.memory:
            # the reference loads the fp16 file in fp32, as train_dreambooth_lora.py does without mixed precision
            sd15 = random_sd15_file(Path(tmp) / "sd15.safetensors")
            compare("full-size SD1.5 layout (random weights, fp16 file)", str(sd15), 256, 3, Path(tmp) / "sd15",
                    note="(3 steps, for the memory: caching 10 latents costs more time than encoding 6)")


if __name__ == "__main__":
    main()
