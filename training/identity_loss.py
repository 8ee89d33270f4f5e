"""The identity loss (ID-Booth, arXiv 2504.07392): a face-recognition term on the model's own estimate
of the clean image, added to the denoising loss of instance images (never class images):

    W * w(t) * (1 - cos(F(chip(x0_hat)), F(chip(x0)))),   w(t) = (1 - t/T)^2

F is dlib's face descriptor as a torch module (eval/face_descriptor.py), x0_hat is decoded by the frozen
VAE with gradients (through the decoder into the LoRA or UNet), the chip is cut with the warp dlib's
5-point landmarks of the training crop give (found once, when the examples are cached), and F(chip(x0))
is the real crop's descriptor, cached with it. A crop without a face gets no term; timesteps above
MAX_T_FRACTION of the schedule get none either: there x0_hat holds no face yet (at t = 600 of SD1.5's
1000 the latents keep sqrt(alpha_bar) = 0.40 of the image, SNR 0.19, and w(t) is already down to 0.16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import UserError, input_name
from .progress import Progress, ProgressFn
from .train_config import IDENTITY_MAX_T_FRACTION as MAX_T_FRACTION  # the term is computed for t <= 0.6 T

DETECT_SIDE = 256  # smaller crops are upscaled to this for dlib's detector and landmarks (faces ~100 px)


@dataclass
class FaceTargets:
    """Per cached instance example: where its face chip is cut (None: no face) and the real crop's
    descriptor; and the descriptor network that made them."""

    transforms: list  # ChipTransform | None, one per example, in the cache's order
    descriptors: torch.Tensor  # (N, 128), zeros where no face was found
    net: torch.nn.Module  # eval.face_descriptor.FaceDescriptor

    @property
    def found(self) -> int:
        return sum(t is not None for t in self.transforms)


def load_face_models():
    """(dlib's detector and landmarks, the torch face descriptor); one line naming identity_weight when missing."""
    from .eval.scorers import FaceEmbedder, Unavailable

    try:
        embedder = FaceEmbedder(descriptors="port")
    except Unavailable as e:
        reason = str(e).removeprefix("not available: ")
        raise UserError(f"{input_name('identity_weight')} needs dlib's face models, but {reason}; install them "
                        f"or set {input_name('identity_weight')} to 0.") from None
    return embedder, embedder.torch_descriptor


def face_targets(images: Sequence, resolution: int, mirror: bool, progress: ProgressFn) -> FaceTargets:
    """Landmarks and descriptors of each training crop (PIL, resized as the latents were), with its mirror
    copies after the originals when `mirror`, in the order examples.encode caches them."""
    from PIL import Image, ImageOps

    from .eval.face_descriptor import chip_transform
    from .examples import to_tensor

    if mirror:
        images = list(images) + [ImageOps.mirror(im) for im in images]
    embedder, descriptor = load_face_models()
    transforms, descriptors = [], []
    for i, image in enumerate(images):
        pixels = to_image_range(to_tensor(image, resolution))
        shown = Image.fromarray(pixels.round().byte().permute(1, 2, 0).numpy())
        scale = max(1.0, DETECT_SIDE / resolution)
        if scale > 1.0:
            shown = shown.resize((DETECT_SIDE, DETECT_SIDE), Image.Resampling.BICUBIC)
        faces = embedder.landmarks(shown)
        transform = chip_transform([(x / scale, y / scale) for x, y in faces[0]], (resolution, resolution)) \
            if faces else None
        transforms.append(transform)
        with torch.no_grad():  # not inference_mode: the loss saves these for its backward pass
            descriptors.append(descriptor.embed(pixels[None], [transform])[0] if transform else torch.zeros(128))
        progress(Progress("find faces", i + 1, len(images)))
    missing = sum(t is None for t in transforms)
    if missing:
        what = "the identity term is off" if missing == len(transforms) else "they get no identity term"
        progress(Progress("warning", 0, 0, {"note": f"{input_name('identity_weight')}: dlib found no face in "
                                                    f"{missing} of {len(transforms)} training crops; {what}"}))
    return FaceTargets(transforms, torch.stack(descriptors).float(), descriptor)


def to_image_range(x: torch.Tensor) -> torch.Tensor:
    """VAE pixels (-1..1) as the 0..255 RGB the face descriptor reads, clamped."""
    return ((x.float() + 1) * 127.5).clamp(0, 255)


def predicted_x0(schedule, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, prediction_type: str):
    """The clean latents the UNet's prediction implies: from epsilon, or from v (v = a eps - s x0)."""
    alpha_bar = schedule.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (noisy.float() - s * pred.float()) / a
    return a * noisy.float() - s * pred.float()


def time_weight(t: torch.Tensor, total: int) -> torch.Tensor:
    """w(t) = (1 - t/T)^2, and 0 above MAX_T_FRACTION of the schedule (no term is computed there)."""
    w = (1 - t.float() / total) ** 2
    return torch.where(t <= MAX_T_FRACTION * total, w, torch.zeros_like(w))


class IdentityLoss:
    """The term for the instance examples of a batch; `last` keeps the value of the last one computed."""

    def __init__(self, weight: float, every: int, targets: FaceTargets, vae, prediction_type: str):
        self.weight, self.every, self.targets = weight, every, targets
        self.vae, self.prediction_type = vae, prediction_type
        self.last: float | None = None

    def due(self, step: int) -> bool:
        """Whether the optimizer step `step` (0-based) computes the term: every `every`-th one."""
        return step % self.every == 0

    def for_batch(self, index: torch.Tensor):
        """The term as denoising_loss adds it: (noisy, pred, t) of the whole batch, instance examples `index` first."""
        return lambda noisy, pred, t, schedule: self(index, noisy[:len(index)], pred[:len(index)], t[:len(index)],
                                                     schedule)

    def __call__(self, index: torch.Tensor, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor,
                 schedule) -> torch.Tensor:
        """W * mean over the examples of w(t) (1 - cos); an example without a face or above the threshold adds 0."""
        self.last = None
        w = time_weight(t, schedule.config.num_train_timesteps).cpu()
        keep = [i for i, (k, wi) in enumerate(zip(index.tolist(), w.tolist()))
                if wi > 0 and self.targets.transforms[k] is not None]
        if not keep:
            return pred.new_zeros((), dtype=torch.float32)
        rows = torch.tensor(keep, device=noisy.device)
        x0 = predicted_x0(schedule, noisy[rows], pred[rows], t[rows], self.prediction_type)
        decoded = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        chosen = index[keep]
        distance = cosine_distance(self.targets.net, to_image_range(decoded),
                                   [self.targets.transforms[int(k)] for k in chosen], self.targets.descriptors[chosen])
        term = self.weight * (w[keep].to(distance.device) * distance).sum() / len(index)
        self.last = float(term.detach())
        return term


def cosine_distance(descriptor, images: torch.Tensor, transforms: Sequence, reference: torch.Tensor) -> torch.Tensor:
    """1 - cos between the descriptors of the faces in `images` (0..255, cut by `transforms`) and `reference`."""
    with torch.autocast(images.device.type, enabled=False):  # the descriptor in fp32, as dlib computes it
        found = descriptor.embed(images.float(), transforms)
    return 1 - torch.nn.functional.cosine_similarity(found.float(), reference.to(found.device).float(), dim=1)


def identity_summary(weight: float, every: int, losses: Sequence[dict]) -> str | None:
    """The report's line: W, K and the final term (the last computed, and the mean of the last ten); None when off."""
    if not weight:
        return None
    head = f"identity loss: weight {weight:g}, every {every} step{'s' if every > 1 else ''}"
    computed = [r for r in losses if r.get("identity_loss") is not None]
    if not computed:
        return head + "; no step computed it (no face in the crops, or no timestep at or under the threshold)"
    recent = [r["identity_loss"] for r in computed[-10:]]
    return (head + f"; final term {computed[-1]['identity_loss']:.4f} at step {computed[-1]['step']} "
            f"(mean of the last {len(recent)} computed: {sum(recent) / len(recent):.4f})")


def make_identity_loss(cfg, model, faces: FaceTargets | None) -> IdentityLoss | None:
    """The loop's term from the cached crops' faces; None when identity_weight is 0 or no crop has a face."""
    if not cfg.identity_weight or faces is None or not faces.found:
        return None
    faces.net.to(next(model.vae.parameters()).device)
    if cfg.gradient_checkpointing:  # the decoder's activations at 512 px outweigh the UNet's
        model.vae.enable_gradient_checkpointing()
    return IdentityLoss(cfg.identity_weight, cfg.identity_every, faces, model.vae, model.prediction_type)
