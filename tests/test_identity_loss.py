"""The identity loss (training/identity_loss.py): on real face crops the term is smaller for the same person
than for another; on `tiny` it is exactly what W > 0 adds to the loss and it reaches the LoRA's gradient; a
run logs it; without dlib, identity_weight > 0 is one line.

Crops are cut at tiny's 64 px as prepare cuts them: a 64 px face chip is blurry (dlib's chip is 150 px) but
the landmarks, the warp and the descriptor work on it; tiny's decodes are noise, so the same-person check
runs on the real crops through the same functions the loss uses."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fixture_paths import OTHER_PEOPLE, SUBJECT_PHOTOS
from training.errors import UserError, inputs_named_by
from training.train_config import TrainConfig

if not all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models")):
    pytest.skip("identity loss not checked: pip install dlib-bin==20.0.1.post1 face_recognition_models==0.3.0",
                allow_module_level=True)

from training.identity_loss import (IdentityLoss, cosine_distance, face_targets, predicted_x0,  # noqa: E402
                                    time_weight, to_image_range)

RES = 64
SUBJECT = sorted(SUBJECT_PHOTOS.glob("*.jpg"))[:3]
OTHERS = sorted(OTHER_PEOPLE.glob("*.jpg"))[:2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few shared cores: one thread runs these small nets fastest
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def crops():
    """Three photos of the subject and two of other people, face-cropped at 64 px as prepare does."""
    from training.data.crop import crop_photo
    from training.data.photos import open_photo

    return [crop_photo(open_photo(p.read_bytes()), "face", RES).image for p in SUBJECT + OTHERS]


@pytest.fixture(scope="module")
def targets(crops):
    found = face_targets(crops, RES, False, lambda event: None)
    assert found.found == len(crops), "dlib found no face in a 64 px crop"
    return found


def test_the_term_is_smaller_for_the_same_person_than_for_another(crops, targets):
    from training.examples import to_tensor

    pixels = torch.stack([to_image_range(to_tensor(c, RES)) for c in crops])
    n = len(SUBJECT)

    def term(i: int, j: int) -> float:  # image i scored against the cached descriptor of crop j, at t = 0
        distance = cosine_distance(targets.net, pixels[i:i + 1], [targets.transforms[i]], targets.descriptors[j:j + 1])
        return float(time_weight(torch.tensor([0]), 1000) * distance)

    same = [term(i, j) for i in range(n) for j in range(n) if i != j]
    other = [term(i, j) for i in range(n, len(crops)) for j in range(n)]
    assert max(same) < min(other), (same, other)
    assert term(0, 0) == pytest.approx(0.0, abs=1e-6)  # the crop against its own cached descriptor


def test_time_weight_and_threshold():
    w = time_weight(torch.tensor([0, 300, 600, 601, 999]), 1000)
    assert w.tolist() == pytest.approx([1.0, 0.49, 0.16, 0.0, 0.0])


def test_x0_from_epsilon_and_from_v_is_the_clean_latent():
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    noisy = schedule.add_noise(x0, noise, t)
    assert torch.allclose(predicted_x0(schedule, noisy, noise, t, "epsilon"), x0, atol=1e-4)
    v = schedule.get_velocity(x0, noise, t)
    assert torch.allclose(predicted_x0(schedule, noisy, v, t, "v_prediction"), x0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(crops, tmp_path_factory):
    """tiny with a LoRA, the first crop's cached latents and text embedding."""
    from training.examples import encode
    from training.loss import noise_schedule
    from training.models import load_model
    from training.trainable import setup_trainable

    cfg = TrainConfig(instance_dir=str(SUBJECT_PHOTOS), output=str(tmp_path_factory.mktemp("o") / "x.safetensors"),
                      rank=4, seed=1)
    model = load_model("tiny")
    trainable = setup_trainable(cfg, model)
    cached = encode(model, crops[:1], ["a photo of sks man"], RES, cfg, lambda event: None, "cache")
    return cfg, model, list(trainable.parameters()), cached, noise_schedule(model)


def test_with_w_the_loss_adds_exactly_the_term_and_its_gradient(tiny, targets):
    from training.loss import denoising_loss

    cfg, model, params, cached, schedule = tiny
    identity = IdentityLoss(2.0, 1, targets, model.vae, model.prediction_type)
    index = torch.tensor([0])

    def loss_and_grads(seed: int, with_identity: bool):
        generator = torch.Generator().manual_seed(seed)
        loss = denoising_loss(cfg, model, model.unet, cached.embeddings[:1], cached.latent_mean[:1], schedule,
                              generator, identity=identity.for_batch(index) if with_identity else None)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    seeds = [s for s in range(20) if _timestep(s, cached, schedule) <= 600]
    assert seeds, "no seed gave a timestep under the threshold"
    plain, plain_grads = loss_and_grads(seeds[0], False)
    with_term, grads = loss_and_grads(seeds[0], True)
    assert identity.last is not None and identity.last > 0
    # the MSE part is bit-identical, so the difference is exactly the term
    assert torch.equal(with_term, plain + torch.tensor(identity.last, dtype=torch.float32))
    changed = [(a - b).abs().max() for a, b in zip(grads, plain_grads) if a is not None and b is not None]
    assert changed and max(changed) > 0, "the identity term did not reach the LoRA parameters"

    above = next(s for s in range(40) if _timestep(s, cached, schedule) > 600)  # above the threshold: nothing
    skipped, _ = loss_and_grads(above, True)
    assert identity.last is None and torch.equal(skipped, loss_and_grads(above, False)[0])


def _timestep(seed: int, cached, schedule) -> int:
    """The timestep denoising_loss draws for one example with this seed (noise first, then t)."""
    generator = torch.Generator().manual_seed(seed)
    torch.randn(cached.latent_mean[:1].shape, generator=generator)
    return int(torch.randint(0, schedule.config.num_train_timesteps, (1,), generator=generator))


def test_a_run_logs_the_term_on_the_steps_that_compute_it(tmp_path):
    import shutil

    from training.loss_log import read_loss_log
    from training.train import train

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in SUBJECT[:2]:
        shutil.copy(path, photos / path.name)
    cfg = TrainConfig(instance_dir=str(photos), output=str(tmp_path / "lora.safetensors"), steps=4,
                      rank=4, seed=0, save_every=0, identity_weight=1.0, identity_every=2, resolution=RES)
    result = train(cfg)
    rows = read_loss_log(result.run_dir)
    logged = [r["step"] for r in rows if "identity_loss" in r]
    assert logged and set(logged) <= {1, 3}, rows  # steps 1 and 3 (0-based 0 and 2) compute it
    assert all(r["identity_loss"] >= 0 for r in rows if "identity_loss" in r)
    config = json.loads(_metadata(cfg.output_path)["dreambooth.config"])
    assert config["identity_weight"] == 1.0 and config["identity_every"] == 2


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_identity_weight_without_dlib_is_one_line(monkeypatch, tmp_path):
    from training.cli.train import flag

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dlib" else real(name, *a))
    cfg = TrainConfig(instance_dir=str(SUBJECT_PHOTOS), output=str(tmp_path / "x.safetensors"), identity_weight=1.0)
    with inputs_named_by(flag), pytest.raises(UserError) as e:
        cfg.validate()
    message = str(e.value)
    assert "--identity-weight" in message and "pip install dlib-bin" in message and "\n" not in message
    TrainConfig(instance_dir=str(SUBJECT_PHOTOS), output=str(tmp_path / "x.safetensors")).validate()  # off: fine


def test_the_evaluation_descriptors_from_the_port_equal_dlibs():
    from training.data.crop import crop_photo
    from training.data.photos import open_photo
    from training.eval.scorers import FaceEmbedder

    photo = crop_photo(open_photo(SUBJECT[0].read_bytes()), "face", 384).image
    port, dlib_net = FaceEmbedder("hog", descriptors="port").faces(photo), FaceEmbedder("hog", "dlib").faces(photo)
    assert len(port) == len(dlib_net) == 1 and port[0].box == dlib_net[0].box
    assert abs(port[0].descriptor - dlib_net[0].descriptor).max() < 1e-5
