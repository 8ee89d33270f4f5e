"""background_weight: the instance loss weighted to the subject region (examples.py, loss.py, the loop)."""
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data_helpers import PHOTOS
from training.data import PrepareConfig, load_dataset, prepare_dataset
from training.examples import prepare_examples, sample_batch
from training.loss import denoising_loss, noise_schedule
from training.progress import no_progress
from training.train import train
from training.train_config import TrainConfig


@pytest.fixture(scope="module")
def masked_dataset(tmp_path_factory):
    """Two photos at tiny's 64 px, each with a mask: the left 24 px of 64 are the subject (3 of 8 latent
    columns; the resized mask's edge blurs the third)."""
    root = tmp_path_factory.mktemp("masked")
    src = root / "photos"
    src.mkdir()
    for i in range(2):
        shutil.copy(PHOTOS[i], src / f"p{i}.jpg")
        size = Image.open(PHOTOS[i]).size
        mask = Image.new("L", size, 0)
        mask.paste(255, (0, 0, round(size[0] * 24 / 64), size[1]))
        mask.save(src / f"p{i}_mask.png")
    prepare_dataset(src, root / "dataset", PrepareConfig(resolution=64, crop="center"))
    return root / "dataset"


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class")
    for i in range(2):
        Image.open(PHOTOS[2 + i]).convert("RGB").resize((64, 64)).save(folder / f"class_{i}.png")
    return folder


def _config(dataset, tmp_path, **kw) -> TrainConfig:
    base = dict(instance_dir=str(dataset), output=str(tmp_path / "out.safetensors"), steps=1, rank=4, batch_size=2,
                seed=3, save_every=0)
    return TrainConfig(**(base | kw)).validate()


class PredictionProbe(torch.nn.Module):
    """The real UNet, its prediction made a leaf so the test can read d loss / d prediction."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.predictions = []

    def forward(self, *args, **kw):
        out = self.unet(*args, **kw)
        out.sample = out.sample.detach().requires_grad_(True)
        self.predictions.append(out.sample)
        return out


def _loss(cfg, tiny, instance, class_examples, probe=None):
    batch = sample_batch(cfg, instance, class_examples, torch.Generator().manual_seed(7))
    context = batch["embeddings"]
    return denoising_loss(cfg, tiny, probe or tiny.unet, context, batch["latents"], noise_schedule(tiny),
                          torch.Generator().manual_seed(8), weights=batch["weights"]), batch


def test_weight_zero_gives_exactly_zero_gradient_outside_the_region(masked_dataset, class_dir, tiny, tmp_path):
    cfg = _config(masked_dataset, tmp_path, background_weight=0.0, prior_preservation=True, class_dir=str(class_dir),
                  num_class_images=2, flip=True)
    instance, class_examples = prepare_examples(cfg, tiny, 64, None, no_progress)
    # the weight map: 1 on the subject's latent columns, 0 outside, between on the mask's edge; the mirrored
    # copies (flip at training time) mirrored; class examples carry none
    assert instance.weights.shape == (4, 1, 8, 8) and class_examples.weights is None
    assert instance.weights[:2, :, :, :2].min() == 1.0 and instance.weights[:2, :, :, 4:].max() == 0.0
    assert 0.9 < instance.weights[:2, :, :, 2].min()
    assert torch.equal(instance.weights[2:], instance.weights[:2].flip(-1))

    probe = PredictionProbe(tiny.unet)
    loss, batch = _loss(cfg, tiny, instance, class_examples, probe)
    loss.backward()
    grad = probe.predictions[0].grad
    outside = batch["weights"].expand(-1, 4, -1, -1) == 0.0
    instance_grad = grad[:2]
    assert outside.sum() >= instance_grad.numel() / 2
    assert torch.count_nonzero(instance_grad[outside]) == 0  # exactly zero, not small
    assert torch.count_nonzero(instance_grad[~outside]) == (~outside).sum()
    assert torch.count_nonzero(grad[2:]) == grad[2:].numel()  # class images are never weighted


def test_weight_one_is_bit_identical_to_a_config_without_it(masked_dataset, class_dir, tiny, tmp_path):
    kw = dict(prior_preservation=True, class_dir=str(class_dir), num_class_images=2)
    plain = TrainConfig(instance_dir=str(masked_dataset), output=str(tmp_path / "out.safetensors"), steps=1, rank=4,
                        batch_size=2, seed=3, save_every=0, **kw)
    weighted_one = _config(masked_dataset, tmp_path, background_weight=1.0, **kw)
    losses = []
    for cfg in (plain, weighted_one):
        instance, class_examples = prepare_examples(cfg, tiny, 64, None, no_progress)
        assert instance.weights is None  # 1.0: the multiply is skipped, not done with ones
        losses.append(_loss(cfg, tiny, instance, class_examples)[0])
    assert torch.equal(losses[0], losses[1])
    assert plain.result_hash() == weighted_one.result_hash()  # finished outputs and checkpoints still match
    assert _config(masked_dataset, tmp_path, background_weight=0.5, **kw).result_hash() != plain.result_hash()


def test_a_region_less_photo_is_weighted_one_everywhere(tmp_path, tiny):
    out = tmp_path / "dataset"
    prepare_dataset(PHOTOS[0].parent, out, PrepareConfig(resolution=64, crop="center"))  # no face looked for, no mask
    assert all(load_dataset(out).subject_map(item, 8) is None for item in load_dataset(out).items)
    instance, _ = prepare_examples(_config(out, tmp_path, background_weight=0.0), tiny, 64, None, no_progress)
    assert instance.weights.min() == 1.0


def test_the_training_loop_uses_the_weights(masked_dataset, tmp_path):
    outputs = {}
    for w in (1.0, 0.0):
        cfg = _config(masked_dataset, tmp_path / str(w), background_weight=w, steps=2)
        outputs[w] = load_file(train(cfg).output)
    assert outputs[1.0].keys() == outputs[0.0].keys()
    assert any(not torch.equal(outputs[1.0][k], outputs[0.0][k]) for k in outputs[1.0] if "lora_up" in k)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_a_bad_background_weight_names_the_field(masked_dataset, tmp_path, value):
    from training.errors import UserError

    with pytest.raises(UserError, match="background_weight"):
        _config(masked_dataset, tmp_path, background_weight=value)
