"""dlib's ResNet face descriptor (`dlib_face_recognition_resnet_model_v1.dat`) as a torch module.

The weights are read from dlib's own serialization at run time (no conversion step, nothing committed);
face chips are cut as dlib's `extract_image_chips` cuts them (5-point landmarks, 150x150, padding 0.25,
its image pyramid and bilinear sampling), so descriptors equal dlib's, and the chip is differentiable
with respect to the image. Sources read: dlib/serialize.h, float_details.h, cuda/tensor.h, dnn/core.h,
dnn/layers.h, dnn/input.h, dnn/loss.h, image_transforms/interpolation.h, image_pyramid.h,
examples/dnn_face_recognition_ex.cpp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

CHIP_SIZE = 150
CHIP_PADDING = 0.25  # dlib's face_recognition_model_v1.compute_face_descriptor default

# --------------------------------------------------------------------------- dlib's serialization


class _Reader:
    """dlib's stream format: packed integers, '0'/'1' bools, length-prefixed strings, float_details."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("unexpected end of file")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        # ser_helper::pack_int: a control byte (size in the low nibble, 0x80 = negative), then
        # `size` little-endian bytes of the magnitude.
        control = self._take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8:
            raise ValueError(f"bad integer control byte {control:#x} at {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def bool(self) -> bool:
        ch = self._take(1)
        if ch not in (b"0", b"1"):
            raise ValueError(f"bad bool at {self.pos - 1}")
        return ch == b"1"

    def string(self) -> str:
        return self._take(self.int()).decode("latin-1")

    def float(self) -> float:
        # float_details: int64 mantissa, int16 exponent; value = ldexp((float)mantissa, exponent).
        if self.data[self.pos:self.pos + 1] and self.data[self.pos] & 0x70:
            raise ValueError("old ASCII float format is not supported")
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # is_inf, is_ninf, is_nan
            return (math.inf, -math.inf, math.nan)[exponent - 32000]
        return float(np.ldexp(np.float32(mantissa), exponent))

    def tensor(self) -> np.ndarray:
        # resizable_tensor: version 2, num_samples, k, nr, nc, then little-endian float32s.
        self.expect(self.int(), (2,), "tensor")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self._take(4 * count), dtype="<f4").reshape(shape).astype(np.float32)

    def alias_tensor(self) -> tuple[int, ...]:
        self.expect(self.int(), (1,), "alias_tensor")
        return tuple(self.int() for _ in range(4))

    def expect(self, value, allowed: tuple, what: str):
        if value not in allowed:
            raise ValueError(f"{what}: found {value!r}, expected one of {allowed}")
        return value


def _read_con(r: _Reader) -> dict:
    version = r.expect(r.string(), ("con_4", "con_5", "con_6"), "con_")
    params = r.tensor().reshape(-1)
    r.int(), r.int(), r.int()  # num_filters, nr, nc: the filters' shape says them again
    layer = dict(kind="con", stride=(r.int(), r.int()), padding=(r.int(), r.int()))
    filters, _biases = r.alias_tensor(), r.alias_tensor()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.float()
    use_bias = r.bool() if version in ("con_5", "con_6") else True
    if version == "con_6" and r.bool():
        raise ValueError("con_ with a fused relu is not part of this network")
    n_weights = int(np.prod(filters))
    layer["weight"] = params[:n_weights].reshape(filters)
    layer["bias"] = params[n_weights:n_weights + filters[0]] if use_bias else None
    return layer


def _read_affine(r: _Reader) -> dict:
    version = r.expect(r.string(), ("affine_", "affine_2"), "affine_")
    params = r.tensor().reshape(-1)
    gamma, _beta = r.alias_tensor(), r.alias_tensor()
    n = int(np.prod(gamma))
    r.expect(r.int(), (0,), "affine_ mode (CONV_MODE)")
    if version == "affine_2":
        r.expect(r.bool(), (False,), "affine_ disabled")
    return dict(kind="affine", gamma=params[:n], beta=params[n:2 * n])


def _read_pool(r: _Reader) -> dict:
    version = r.expect(r.string(), ("max_pool_2", "avg_pool_2"), "pool")
    size, stride, padding = (r.int(), r.int()), (r.int(), r.int()), (r.int(), r.int())
    return dict(kind=version[:-2], size=size, stride=stride, padding=padding)


def _read_relu(r: _Reader) -> dict:
    version = r.expect(r.string(), ("relu_", "relu_2"), "relu_")
    if version == "relu_2":
        r.expect(r.bool(), (False,), "relu_ disabled")
    return dict(kind="relu")


def _read_add_prev(r: _Reader) -> dict:
    r.expect(r.string(), ("add_prev_",), "add_prev_")
    return dict(kind="add_prev")


def _read_fc(r: _Reader) -> dict:
    version = r.expect(r.string(), ("fc_2", "fc_3"), "fc_")
    num_outputs, num_inputs = r.int(), r.int()
    params = r.tensor().reshape(-1)
    r.alias_tensor(), r.alias_tensor()  # weights (num_inputs, num_outputs), biases
    r.expect(r.int(), (1,), "fc_ bias mode (FC_NO_BIAS)")
    for _ in range(4):
        r.float()
    if version == "fc_3":
        r.bool()
    return dict(kind="fc", weight=params[:num_inputs * num_outputs].reshape(num_inputs, num_outputs))


_DETAILS = {"con": _read_con, "affine": _read_affine, "relu": _read_relu, "max_pool": _read_pool,
            "avg_pool": _read_pool, "add_prev": _read_add_prev, "fc": _read_fc}

# The network of dlib/examples/dnn_face_recognition_ex.cpp, innermost first: (channels, downsample)
# per residual block; alevel4 is three 32-channel blocks, then levels of 64, 128, 256 and 256 that
# each start with a strided block.
_BLOCKS = ((32, False),) * 3 + ((64, True),) + ((64, False),) * 3 + ((128, True),) + ((128, False),) * 2 \
    + ((256, True),) + ((256, False),) * 2 + ((256, True),)


def _layout() -> list[str]:
    """The wrappers from the outermost (fc) to the innermost (the first con), as dlib nests them."""
    outer = ["fc", "avg_pool"]  # fc_no_bias<128, avg_pool_everything<...>>
    for _, down in reversed(_BLOCKS):
        # relu<add_prev1<block<tag1<>>>>, or relu<add_prev2<avg_pool<skip1<tag2<block<tag1<>>>>>>>
        outer += ["relu", "add_prev"] + (["avg_pool", "skip", "tag"] if down else [])
        outer += ["affine", "con", "relu", "affine", "con", "tag"]
    return outer + ["max_pool", "relu", "affine", "con"]


def parse_dlib_face_model(data: bytes) -> tuple[tuple[float, float, float], list[dict]]:
    """(input mean RGB, layers innermost first) from the bytes of dlib's face recognition model."""
    r = _Reader(data)
    r.expect(r.int(), (1,), "add_loss_layer version")
    if r.expect(r.string(), ("loss_metric_", "loss_metric_2"), "loss layer") == "loss_metric_2":
        r.float(), r.float()  # margin, distance threshold: training only
    wrappers = _layout()
    versions = [r.int() for _ in wrappers]  # add_layer / add_tag_layer / add_skip_layer headers
    for kind, version in zip(wrappers[:-1], versions):
        r.expect(version, (1,) if kind in ("tag", "skip") else (1, 2), f"{kind} layer version")
    r.expect(versions[-1], (2, 3), "input layer version")
    r.expect(r.string(), ("input_rgb_image_sized",), "input layer")
    mean = (r.float(), r.float(), r.float())
    r.expect((r.int(), r.int()), ((CHIP_SIZE, CHIP_SIZE),), "input size")
    layers = []
    for index in reversed(range(len(wrappers))):
        kind = wrappers[index]
        if kind in ("tag", "skip"):
            continue
        layer = _DETAILS[kind](r)
        r.expect(layer["kind"], (kind,), "layer type")
        layers.append(layer)
        r.bool(), r.bool(), r.bool()  # setup called, gradient stale, output disabled
        r.tensor(), r.tensor()  # x_grad, cached_output
        if index == len(wrappers) - 1:
            r.tensor()  # grad_final
            if versions[index] == 3:
                r.int()  # sample expansion factor
        elif versions[index] == 2:
            r.tensor()  # params_grad
    if r.pos != len(data):
        raise ValueError(f"{len(data) - r.pos} bytes left after the network")
    return mean, layers


# --------------------------------------------------------------------------- the network


def _conv(con: dict, affine: dict) -> nn.Conv2d:
    """A con_ and the affine_ after it (a per-channel scale and shift: batch norm frozen at the end of
    training) as one convolution."""
    gamma, beta = torch.from_numpy(affine["gamma"].copy()), torch.from_numpy(affine["beta"].copy())
    weight = torch.from_numpy(con["weight"].copy())
    bias = torch.from_numpy(con["bias"].copy()) if con["bias"] is not None else torch.zeros(weight.shape[0])
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride=con["stride"],
                     padding=con["padding"])
    conv.weight = nn.Parameter(weight * gamma.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias * gamma + beta, requires_grad=False)
    return conv


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev_: tensors of different channels or sizes add as if zero-padded at the end."""
    shape = [max(x, y) for x, y in zip(a.shape, b.shape)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1]))
    return pad(a) + pad(b)


class _Residual(nn.Module):
    """relu(block(x) + x), or with `down` a strided block plus the 2x2-average-pooled input."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, down: bool):
        super().__init__()
        self.conv1, self.conv2, self.down = conv1, conv2, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(_add_padded(y, F.avg_pool2d(x, 2, 2) if self.down else x))


class FaceDescriptor(nn.Module):
    """dlib's face recognition ResNet: 150x150 RGB face chips (0..255) -> 128-d descriptors."""

    def __init__(self, mean_rgb: Sequence[float], layers: list[dict]):
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        it = iter(layers)

        def take(kind: str) -> dict:
            layer = next(it)
            if layer["kind"] != kind:
                raise ValueError(f"expected a {kind} layer, found {layer['kind']}")
            return layer

        self.stem = _conv(take("con"), take("affine"))
        take("relu")
        pool = take("max_pool")
        self.stem_pool = nn.MaxPool2d(pool["size"], pool["stride"], pool["padding"])
        blocks = []
        for channels, down in _BLOCKS:
            conv1 = _conv(take("con"), take("affine"))
            if conv1.out_channels != channels or conv1.stride != ((2, 2) if down else (1, 1)):
                raise ValueError(f"a block has {conv1.out_channels} filters of stride {conv1.stride}, "
                                 f"dlib's network {channels} of stride {2 if down else 1}")
            take("relu")
            conv2 = _conv(take("con"), take("affine"))
            if down:
                _check_pool(take("avg_pool"), (2, 2), (2, 2))
            take("add_prev"), take("relu")
            blocks.append(_Residual(conv1, conv2, down))
        self.blocks = nn.Sequential(*blocks)
        _check_pool(take("avg_pool"), (0, 0), (1, 1))  # avg_pool_everything
        self.fc = nn.Parameter(torch.from_numpy(take("fc")["weight"].copy()), requires_grad=False)
        if next(it, None) is not None:
            raise ValueError("more layers than dlib's face recognition network has")

    @classmethod
    def from_dlib_file(cls, path: str | Path) -> "FaceDescriptor":
        """Parse `dlib_face_recognition_resnet_model_v1.dat` (from face_recognition_models) into the module."""
        path = Path(path)
        try:
            mean, layers = parse_dlib_face_model(path.read_bytes())
            return cls(mean, layers).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"The face model {path} could not be read as dlib's face recognition network ({e}); "
                            "reinstall face_recognition_models.") from e

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """(N, 3, 150, 150) RGB chips in 0..255 -> (N, 128) descriptors, as dlib's net(chips)."""
        x = (chips - self.mean_rgb) / 256.0  # input_rgb_image_sized::to_tensor
        x = self.stem_pool(F.relu(self.stem(x)))
        x = self.blocks(x).mean(dim=(2, 3))  # avg_pool_everything
        return x @ self.fc

    def embed(self, images: torch.Tensor, transforms: Sequence["ChipTransform"]) -> torch.Tensor:
        """(N, 3, H, W) RGB images in 0..255 and one ChipTransform each -> (N, 128) descriptors."""
        return self(extract_chips(images, transforms))


def _check_pool(layer: dict, size: tuple[int, int], stride: tuple[int, int]) -> None:
    found = (layer["size"], layer["stride"], layer["padding"])
    if found != (size, stride, (0, 0)):
        raise ValueError(f"unexpected avg_pool (size, stride, padding) {found}")


# --------------------------------------------------------------------------- the face chip

# dlib's get_face_chip_details: where the 5 landmarks (eye corners, nose) sit in a chip, before padding.
_CHIP_LANDMARKS = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                            [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                            [0.4901123135679, 0.6277975316475]])


@dataclass(frozen=True)
class ChipTransform:
    """Where dlib cuts one face chip from an image: `box` (left, top, right, bottom, inclusive) is the
    region its pyramid is built on, `levels` the pyramid_down<2> steps, `matrix` the 2x3 map from chip
    pixel (x, y, 1) to a position in that pyramid level. Computed once per photo from its landmarks."""

    box: tuple[int, int, int, int]
    levels: int
    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]


def _lround(v: float) -> int:
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """find_similarity_transform (Umeyama): (2x2 scaled rotation, translation) taking src to dst."""
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    sigma_src = ((src - mean_src) ** 2).sum(1).mean()
    cov = (dst - mean_dst).T @ (src - mean_src) / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    if np.linalg.det(cov) < 0 or (np.linalg.det(cov) == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        s[(1, 1) if d[1] < d[0] else (0, 0)] = -1
    r = u @ s @ vt
    c = np.trace(np.diag(d) @ s) / sigma_src if sigma_src != 0 else 1.0
    return c * r, mean_dst - c * r @ mean_src


def _rect_down(rect: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    # pyramid_down<2>::rect_down: point_down(p) = p/2 - (1.25, 0.75) on both corners.
    left, top, right, bottom = rect
    return left / 2 - 1.25, top / 2 - 0.75, right / 2 - 1.25, bottom / 2 - 0.75


def _area(rect: tuple[float, float, float, float]) -> float:
    left, top, right, bottom = rect
    return 0.0 if top > bottom or left > right else (right - left + 1) * (bottom - top + 1)


def _rotate(center: np.ndarray, points: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    p = points - center
    return np.stack([cos * p[:, 0] - sin * p[:, 1], sin * p[:, 0] + cos * p[:, 1]], 1) + center


def _corners(rect: tuple[float, float, float, float]) -> np.ndarray:
    left, top, right, bottom = rect
    return np.array([[left, top], [right, top], [left, bottom], [right, bottom]], dtype=np.float64)


def chip_transform(landmarks: Sequence[Sequence[float]], image_size: tuple[int, int],
                   size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> ChipTransform:
    """The chip dlib's compute_face_descriptor cuts, from dlib's 5 face landmarks [(x, y), ...] in an
    image of `image_size` (width, height): get_face_chip_details + extract_image_chips' geometry."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected dlib's 5 face landmarks, got an array of shape {points.shape}")
    m, t = _similarity((padding + _CHIP_LANDMARKS) / (2 * padding + 1) * size, points)
    scale, angle = math.hypot(m[0, 0], m[1, 0]), math.atan2(m[1, 0], m[0, 0])
    cx, cy = m @ np.array([size / 2, size / 2]) + t
    half = (size * scale - 1) / 2  # centered_drect(center, size*scale, size*scale)
    rect = (cx - half, cy - half, cx + half, cy + half)

    # extract_image_chips: a pyramid level per halving while the chip is over twice as small as its
    # source, built on the chip's rotated bounding box grown by a border, clipped to the image.
    depth, grow, down = 0, 2.0, _rect_down(rect)
    while _area(down) > size * size:
        down, depth, grow = _rect_down(down), depth + 1, grow * 2 + 2
    rotated = _rotate(np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2]), _corners(rect), angle)
    width, height = image_size
    box = (_lround(max(rotated[:, 0].min() - grow, 0)), _lround(max(rotated[:, 1].min() - grow, 0)),
           _lround(min(rotated[:, 0].max() + grow, width - 1)),
           _lround(min(rotated[:, 1].max() + grow, height - 1)))

    local = (rect[0] - box[0], rect[1] - box[1], rect[2] - box[0], rect[3] - box[1])
    for _ in range(depth):
        local = _rect_down(local)
    corners = _rotate(np.array([(local[0] + local[2]) / 2, (local[1] + local[3]) / 2]), _corners(local), angle)
    chip = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1]], dtype=np.float64).T
    matrix = corners[:3].T @ np.linalg.pinv(chip)  # find_affine_transform(chip corners -> tl, tr, bl)
    return ChipTransform(box=box, levels=depth, matrix=tuple(tuple(float(v) for v in row) for row in matrix))


def _floor(x: torch.Tensor) -> torch.Tensor:
    """dlib's integer pixels (truncation); the gradient passes through as if there were none."""
    return x + (torch.floor(x) - x).detach()


def _pyramid_down(x: torch.Tensor) -> torch.Tensor:
    """pyramid_down<2> on RGB: a [1 4 6 4 1] filter each way on every other pixel, integer division
    by 256. Shifted adds rather than a convolution, so it stays exact with TF32 on a GPU."""
    def filt(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = (t.shape[dim] - 3) // 2
        taps = [t.narrow(dim, j, 2 * n - 1)[(slice(None),) * dim + (slice(None, None, 2),)] for j in range(5)]
        return taps[0] + 4 * taps[1] + 6 * taps[2] + 4 * taps[3] + taps[4]
    return _floor(filt(filt(x, x.dim() - 1), x.dim() - 2) / 256)


def _sample(image: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    """interpolate_bilinear at matrix @ (x, y, 1) for each chip pixel: zero where any of the four
    neighbours is outside the image, truncated to integers as dlib's rgb_pixel chip is."""
    channels, height, width = image.shape
    coords = torch.arange(size, dtype=matrix.dtype, device=matrix.device)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    px = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    py = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    left, top = torch.floor(px), torch.floor(py)
    inside = (left >= 0) & (top >= 0) & (left + 1 < width) & (top + 1 < height)
    lr, tb = (px - left).flatten(), (py - top).flatten()
    left, top = left.long().clamp(0, width - 2).flatten(), top.long().clamp(0, height - 2).flatten()
    flat = image.reshape(channels, -1).to(matrix.dtype)

    def at(dy: int, dx: int) -> torch.Tensor:
        return flat[:, (top + dy) * width + left + dx]
    value = (1 - tb) * ((1 - lr) * at(0, 0) + lr * at(0, 1)) + tb * ((1 - lr) * at(1, 0) + lr * at(1, 1))
    value = _floor(value) * inside.flatten()
    return value.reshape(channels, size, size).to(image.dtype)


def extract_chips(images: torch.Tensor, transforms: Sequence[ChipTransform], size: int = CHIP_SIZE) -> torch.Tensor:
    """(N, 3, H, W) RGB in 0..255 -> (N, 3, size, size) face chips as dlib cuts them; differentiable."""
    if len(transforms) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(transforms)} chip transforms")
    # float64 as dlib's interpolation computes (MPS has none: float32 there).
    dtype = torch.float32 if images.device.type == "mps" else torch.float64
    chips = []
    for image, tf in zip(images, transforms):
        left, top, right, bottom = tf.box
        region = image[:, top:bottom + 1, left:right + 1]
        for _ in range(tf.levels):
            region = _pyramid_down(region)
        chips.append(_sample(region, torch.tensor(tf.matrix, dtype=dtype, device=image.device), size))
    return torch.stack(chips)
