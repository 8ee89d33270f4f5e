"""The trainer on `tiny`: both methods, real learning, exact resume, cancel, NaN stop, DDP."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli_runner
from training.checkpoint import list_checkpoints
from training.data import PrepareConfig, prepare_dataset
from training.errors import UserError
from training.models import build_tiny, load_model
from training.progress import Cancelled
from training.train import train
from training.train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "training" / "sample_data" / "subject"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    prepare_dataset(PHOTOS, out, PrepareConfig(resolution=64))
    return out


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("class_images")


def config(dataset, class_dir, out: Path, **kw) -> TrainConfig:
    base = dict(instance_dir=str(dataset), output=str(out), steps=6, rank=4, prior_preservation=True, num_class_images=2,
                class_dir=str(class_dir), save_every=2, seed=3)
    return TrainConfig(**(base | kw))


def cancel_at_step(n: int):
    """A progress callback that cancels the way the CLI and ComfyUI do: it raises after step n."""
    def progress(event):
        if event.stage == "train" and event.step >= n:
            raise Cancelled()
    return progress


def test_lora_trains_with_prior_preservation_and_loads_everywhere(dataset, class_dir, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from training.lora import read_lora

    out = tmp_path / "subject_lora.safetensors"
    result = train(config(dataset, class_dir, out))
    assert result.output == out and out.exists() and result.steps_done == 6
    assert (result.run_dir / "loss.jsonl").read_text().count("\n") == 6 and result.loss_curve is not None
    lora = read_lora(out)
    assert lora.layers and not lora.unmapped and {layer.rank for layer in lora.layers.values()} == {4}
    assert lora.metadata["dreambooth.token"] == "sks" and lora.metadata["ss_network_dim"] == "4"
    # diffusers consumes every key of our kohya file and the picture changes
    model = build_tiny()
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    kw = dict(prompt="a photo of sks man", num_inference_steps=3, height=64, width=64, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(out), adapter_name="subject")
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    adapted = [n for n, _ in pipe.unet.named_modules() if n.endswith("to_q") and hasattr(pipe.unet.get_submodule(n), "lora_A")]
    assert len(adapted) == sum(1 for n in lora.layers if n.endswith("to_q"))
    assert abs(after - before).max() > 0


def test_dreambooth_writes_a_loadable_single_file(dataset, class_dir, tmp_path):
    out = tmp_path / "subject_db.safetensors"
    result = train(config(dataset, class_dir, out, method="dreambooth", steps=3, lr=1e-4))
    assert result.output == out
    tuned = load_model(out)
    assert tuned.family == "tiny"
    base = build_tiny()
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k].half().float())]
    assert changed, "DreamBooth changed no UNet weight"
    run = cli_runner.run(["info", out], cwd=ROOT)  # `python -m training info`, forked from a preloaded interpreter
    assert run.returncode == 0 and "tiny" in run.stdout


def _instance_loss(model, dataset, generator_seed=0) -> float:
    """Denoising loss on the instance images at fixed timesteps and noise."""
    from training.examples import encode
    from training.loss import noise_schedule

    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted(Path(dataset).glob("*.png")) if "contact" not in p.name]
    cached = encode(model, images, ["a photo of sks man"] * len(images), 64, TrainConfig(), lambda e: None, "x")
    g = torch.Generator().manual_seed(generator_seed)
    latents = cached.latent_mean * model.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([100, 300, 500, 700, 900, 200][: len(images)])
    schedule = noise_schedule(model)
    with torch.no_grad():
        pred = model.unet(schedule.add_noise(latents, noise, t), t, cached.embeddings).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


def test_learning_is_real(dataset, tmp_path):
    model = build_tiny()
    before = _instance_loss(model, dataset)
    cfg = TrainConfig(instance_dir=str(dataset), output=str(tmp_path / "fit.safetensors"), steps=60, rank=8,
                      lr=3e-3, prior_preservation=False, save_every=0, seed=1)
    train(cfg, model=model)
    after = _instance_loss(model, dataset)
    ups = [p for n, p in model.unet.named_parameters() if "lora_B" in n]
    assert ups and all(p.abs().max() > 0 for p in ups), "LoRA up-weights are still zero"
    assert after < 0.8 * before, f"instance loss {before:.4f} -> {after:.4f}"


def test_an_fp16_base_kept_in_fp16_trains_the_same_lora_as_plain_fp32_layers(dataset, class_dir, tmp_path,
                                                                            monkeypatch):
    """The frozen UNet of a LoRA run stays in the precision the file stores it in (half the memory
    for an fp16 file) and runs through frozen layers that keep no input for backward; the LoRA
    must come out bit for bit as with the plain fp32 layers of the same file. Conv targets too."""
    import training.trainable as train_module
    from training.models import save_single_file

    base = save_single_file(build_tiny(), tmp_path / "tiny_fp16.safetensors", dtype=torch.float16)
    kw = dict(base=str(base), targets="attn+ff+conv", steps=4, save_every=0)
    cfg = config(dataset, class_dir, tmp_path / "frozen.safetensors", **kw)
    assert train_module.frozen_storage_dtype(cfg) == torch.float16
    frozen = load_file(str(train(cfg).output))
    monkeypatch.setattr(train_module, "freeze_base_layers", lambda *args: 0)
    monkeypatch.setattr("training.train.frozen_storage_dtype", lambda cfg: torch.float32)
    plain = load_file(str(train(config(dataset, class_dir, tmp_path / "plain.safetensors", **kw)).output))
    assert len(frozen) > 200 and frozen.keys() == plain.keys()
    assert [k for k in frozen if not torch.equal(frozen[k], plain[k])] == []


def test_cancel_leaves_a_checkpoint_and_resume_matches_an_uninterrupted_run(dataset, class_dir, tmp_path):
    reference = train(config(dataset, class_dir, tmp_path / "ref.safetensors", steps=8))
    out = tmp_path / "cancelled.safetensors"
    with pytest.raises(Cancelled):
        train(config(dataset, class_dir, out, steps=8), progress=cancel_at_step(5))
    run_dir = config(dataset, class_dir, out).run_path
    assert not out.exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004.safetensors", "step_0000005.safetensors"]
    resumed = train(config(dataset, class_dir, out, steps=8))
    a, b = load_file(str(reference.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_at_a_random_step_then_resume_is_bitwise_equal(dataset, class_dir, tmp_path):
    args = ["--instance-dir", str(dataset), "--prior-preservation", "--class-dir", str(class_dir), "--steps", "40", "--rank", "4",
            "--num-class-images", "2", "--save-every", "3", "--seed", "5"]
    cli = [sys.executable, "-m", "training", "train", "--base", "tiny"]
    ref = tmp_path / "ref.safetensors"
    done = cli_runner.run(cli[3:] + args + ["--output", str(ref)], cwd=ROOT)  # waited for: forked, as in cli_runner.py
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "killed.safetensors"
    proc = cli_runner.start(cli[3:] + args + ["--output", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # forked too; SIGKILL reaches that process
    checkpoints = tmp_path / "killed.safetensors.run" / "checkpoints"
    deadline = time.time() + 120
    while not list(checkpoints.glob("step_*.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed; raise --steps"
    resumed = cli_runner.run(cli[3:] + args + ["--output", str(out)], cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(str(ref)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_huge_lr_stops_on_nan_and_keeps_the_last_good_checkpoint(dataset, class_dir, tmp_path):
    out = tmp_path / "nan.safetensors"
    cfg = config(dataset, class_dir, out, method="dreambooth", lr=1e12, steps=30, save_every=1)
    with pytest.raises(UserError) as err:
        train(cfg)
    message = str(err.value)
    assert "at step" in message and "learning rate" in message and "\n" not in message
    assert not out.exists()
    kept = list_checkpoints(cfg.run_path)
    assert kept, "no checkpoint survived"
    from training.checkpoint import load_checkpoint

    state = load_checkpoint(kept[-1])
    assert all(torch.isfinite(v).all() for v in state.weights.values())


def test_same_config_again_is_reused_and_another_is_refused(dataset, class_dir, tmp_path):
    out = tmp_path / "reuse.safetensors"
    first = train(config(dataset, class_dir, out, steps=2))
    again = train(config(dataset, class_dir, out, steps=2))
    assert again.reused and again.output == first.output
    with pytest.raises(UserError, match="already exists"):
        train(config(dataset, class_dir, out, steps=3))


def test_a_second_run_in_one_process_may_use_another_precision(dataset, tmp_path):
    """A host process (ComfyUI) trains many times; accelerate's per-process state must not stick."""
    base = dict(instance_dir=str(dataset), steps=1, rank=4, prior_preservation=False, save_every=0)
    train(TrainConfig(output=str(tmp_path / "a.safetensors"), mixed_precision="no", **base))
    second = train(TrainConfig(output=str(tmp_path / "b.safetensors"), mixed_precision="bf16", **base))
    assert second.output.exists()


def test_overwrite_replaces_another_configs_run_and_checkpoints_go_once_done(dataset, class_dir, tmp_path):
    out = tmp_path / "over.safetensors"
    first = train(config(dataset, class_dir, out, steps=4, save_every=2))
    assert list_checkpoints(first.run_dir) == []  # the output supersedes them
    with pytest.raises(Cancelled):
        train(config(dataset, class_dir, tmp_path / "c.safetensors", steps=4, save_every=1),
              progress=cancel_at_step(1))
    assert list_checkpoints(tmp_path / "c.safetensors.run")
    replaced = train(config(dataset, class_dir, tmp_path / "c.safetensors", steps=5, lr=5e-4, overwrite=True))
    assert replaced.output.exists() and replaced.steps_done == 5


BAD_FIELDS = {
    "method": dict(method="textual_inversion"),
    "steps": dict(steps=0),
    "lr": dict(lr=-1.0),
    "rank": dict(rank=0),
    "resolution": dict(resolution=100),
    "batch_size": dict(batch_size=0),
    "lr_scheduler": dict(lr_scheduler="exponential"),
    "optimizer": dict(optimizer="sgd"),
    "mixed_precision": dict(mixed_precision="fp8"),
    "output": dict(output="model.ckpt"),
    "token": dict(token="two words"),
    "pivotal_tokens": dict(pivotal_tokens=-1),
    "pivotal_frac": dict(pivotal_tokens=2, pivotal_frac=0.0),
}


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_each_bad_field_has_its_line(field, dataset, tmp_path):
    cfg = TrainConfig(instance_dir=str(dataset), output=str(tmp_path / "x.safetensors"))
    for k, v in BAD_FIELDS[field].items():
        setattr(cfg, k, v)
    problems = cfg.problems()
    assert len(problems) == 1 and problems[0].startswith(f"{field}:"), problems
    with pytest.raises(UserError):
        cfg.validate()


def test_batch_larger_than_dataset_is_refused(dataset, class_dir, tmp_path):
    with pytest.raises(UserError, match="batch_size 50 is larger than the 6 images"):
        train(config(dataset, class_dir, tmp_path / "b.safetensors", batch_size=50))


WORKER = """
import sys, torch
from safetensors.torch import save_file
from training.models import build_tiny
from training.train import train
from training.train_config import TrainConfig
model = build_tiny()
cfg = TrainConfig(instance_dir=sys.argv[1], output=sys.argv[2], prior_preservation=True, class_dir=sys.argv[3],
                  steps=4, rank=4,
                  num_class_images=2, save_every=0, seed=2)
train(cfg, model=model)
from accelerate import PartialState
state = PartialState()
weights = {n: p.detach().contiguous() for n, p in model.unet.named_parameters() if "lora_" in n}
save_file(weights, sys.argv[2] + f".rank{state.process_index}.of{state.num_processes}")
"""


def test_two_process_accelerate_launch_keeps_ranks_in_step(dataset, class_dir, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "ddp.safetensors"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(worker), str(dataset), str(out), str(class_dir)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = load_file(f"{out}.rank0.of2"), load_file(f"{out}.rank1.of2")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(v.abs().max() > 0 for k, v in rank0.items() if "lora_B" in k)
    assert out.exists()


def test_defaults_are_decided_once_in_the_config_and_the_hash_is_that_of_the_effective_config():
    from training.train_config import METHOD_DEFAULTS

    lora, db = TrainConfig(), TrainConfig(method="dreambooth")
    assert (lora.steps, lora.lr, lora.alpha, lora.text_encoder_lr) == (800, 1e-4, 16.0, 1e-4)
    assert (db.steps, db.lr) == (METHOD_DEFAULTS["dreambooth"]["steps"], METHOD_DEFAULTS["dreambooth"]["lr"])
    assert TrainConfig(steps=None).result_hash() == TrainConfig(steps=800).result_hash() == lora.result_hash()
    assert TrainConfig(steps=0, lr=0, alpha=0).result_hash() == lora.result_hash()  # the node's 0 = "the default"
    assert TrainConfig(alpha=16).result_hash() == lora.result_hash() != TrainConfig(alpha=8).result_hash()
    # the hashes that outputs written before defaults moved into the config carry (reused, not refused)
    assert (lora.result_hash(), db.result_hash()) == ("d055802e5aa64bf1", "fc608b49f2aaba0d")
    assert not lora.prior_preservation and lora.mixed_precision == "auto"
