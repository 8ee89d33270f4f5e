"""The small glue between ComfyUI and `training/`: folders, progress, errors, images.

ComfyUI's modules (`comfy`, `folder_paths`, `server`) are imported inside functions only:
this file is also imported by pytest in a Python without ComfyUI.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

CATEGORY = "DreamBooth"
PACK_FOLDER = "dreambooth"  # our subfolder of ComfyUI's output/ folder
NONE_CHOICE = "(none)"


# ---------------------------------------------------------------- errors


class NodeError(ValueError):
    """A user mistake, shown by ComfyUI as this one line (its `str`)."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn `training.errors.UserError` into a plain one-line exception for the node's error dialog."""
    from ..training.errors import UserError

    try:
        yield
    except UserError as exc:
        raise NodeError(str(exc)) from None


# ---------------------------------------------------------------- names and labels (pure)


def check_output_name(name: str) -> str:
    """A file stem the user typed, checked: no folders, no `..`, nothing Windows cannot store.
    Returns the stem (a trailing .safetensors is dropped); raises NodeError with the reason."""
    from ..training.safe_io import file_name_problem

    stem = str(name).strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    problem = file_name_problem(stem)
    if problem is None and (stem.startswith(".") or ".." in stem):
        problem = "starts with a dot or holds '..'"
    if problem:
        raise NodeError(f"output_name '{shown(stem[:60])}' {problem}; give a plain file name such as 'subject_lora' "
                        "(letters, digits, - and _; no folders).")
    return stem


def shown(text: str) -> str:
    """Text as the user typed it, for a one-line message: only unprintable characters escaped
    (repr() would also double every backslash of a Windows path)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def slug(text: str, fallback: str = "item", limit: int = 40) -> str:
    """A short folder-safe name: letters, digits, - and _."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_")[:limit] or fallback


def short_hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def split_labels(values: Iterable[Any] | str | None) -> list[str]:
    """Labels from a widget text ("a, b" or one per line) or from a linked list of strings."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    values = [str(v) for v in values]
    if len(values) != 1:
        return [v.strip() for v in values]
    text = values[0].strip()
    if not text:
        return []
    parts = text.splitlines() if "\n" in text else text.split(",")
    return [p.strip() for p in parts if p.strip()]


def folder_signature(folder: Path) -> str:
    """Names, sizes and mtimes of a folder's files: changes when its content changes (for IS_CHANGED)."""
    if not folder.is_dir():
        return f"missing:{folder}"
    rows = sorted(f"{p.name}:{st.st_size}:{st.st_mtime_ns}" for p in folder.iterdir()
                  if p.is_file() and (st := p.stat()))
    return short_hash(str(folder), rows)


_WRITTEN: set[str] = set()  # model files our nodes wrote in this server process


def remember_written(path: Path) -> None:
    _WRITTEN.add(str(Path(path).resolve()))


def deleted_since_written(path: Path) -> bool:
    """A file one of our nodes wrote in this process is gone: the node must run again although
    ComfyUI's cache still holds its result."""
    return str(Path(path).resolve()) in _WRITTEN and not Path(path).is_file()


def file_signature(path: Path | None) -> str:
    """Size and mtime of a file (for IS_CHANGED); 'missing' when there is none."""
    if path is None or not path.is_file():
        return "missing"
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


# ---------------------------------------------------------------- images (pure: torch + PIL)


def tensor_to_pils(images) -> list:
    """A ComfyUI IMAGE batch [B, H, W, C] in 0..1 (or a list of them) -> RGB PIL images."""
    import numpy as np
    from PIL import Image

    batches = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for batch in batches:
        if batch is None:
            continue
        array = batch.detach().cpu().float()
        if array.ndim == 3:
            array = array.unsqueeze(0)
        array = (array.clamp(0, 1) * 255.0).round().byte().numpy()
        for item in array:
            if item.shape[-1] == 1:
                item = np.repeat(item, 3, axis=-1)
            out.append(Image.fromarray(item[..., :3], "RGB"))
    return out


def pils_to_tensor(images: list):
    """RGB PIL images of one size -> a ComfyUI IMAGE batch [B, H, W, 3] float32 in 0..1."""
    import numpy as np
    import torch

    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def fit_same_size(images: list, size: tuple[int, int] | None = None) -> list:
    """Resize every image to `size` (default: the first image's size), so they form one batch."""
    from PIL import Image

    if not images:
        return images
    size = size or images[0].size
    return [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]


def blank_image(width: int = 64, height: int = 64):
    """A grey IMAGE batch of one, for an output that has nothing to show."""
    import torch

    return torch.full((1, height, width, 3), 0.5)


def image_hash(images) -> str:
    """A content hash of an IMAGE batch (or list of batches)."""
    digest = hashlib.sha256()
    for pil in tensor_to_pils(images):
        digest.update(f"{pil.size}".encode())
        digest.update(pil.tobytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------- ComfyUI folders


def output_folder(*parts: str) -> Path:
    """`<ComfyUI output>/dreambooth/<parts...>`."""
    import folder_paths

    return Path(folder_paths.get_output_directory(), PACK_FOLDER, *parts)


ALLOW_ANY_PATH_ENV = "DREAMBOOTH_ALLOW_ANY_PATH"  # =1: typed folders may lie anywhere, whatever the listen address
DINO_FOLDER = "dino"  # models/dino, registered with ComfyUI's folder paths by register_model_folders()


def register_model_folders() -> None:
    """Our model kinds ComfyUI does not know: models/dino (extra_model_paths.yaml may add more roots)."""
    try:
        import folder_paths
    except ImportError:  # the pack imported without ComfyUI (tests/test_nodes_offline.py)
        return

    folder_paths.add_model_folder_path(DINO_FOLDER, str(Path(folder_paths.models_dir, DINO_FOLDER)))


def listen_addresses() -> list[str]:
    """The addresses the server listens on (--listen, a comma-separated list)."""
    from comfy.cli_args import args

    return [part.strip() for part in str(args.listen or "").split(",") if part.strip()]


def is_loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address.lower() == "localhost"


def any_path_allowed() -> bool:
    """Folders outside ComfyUI's own may be read when only this machine can reach the server, or when the
    user opted in: on a server others can reach, they would read any image folder on the machine."""
    if os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    addresses = listen_addresses()
    return bool(addresses) and all(is_loopback(a) for a in addresses)


def typed_folder(input_name: str, text: str, roots: list[Path], where: str) -> Path:
    """A folder the user typed: a name under one of `roots` (the first where it exists; `..` may not leave
    them), or any path where any_path_allowed(); otherwise NodeError saying how to allow it. Only names
    are compared here: nothing is read before the check."""
    def normal(path) -> Path:
        return Path(os.path.normpath(os.path.abspath(path)))

    def within(path: Path, root: Path) -> bool:
        return path == root or root in path.parents

    roots = [normal(root) for root in roots]
    typed = Path(str(text).strip()).expanduser()
    if typed.is_absolute():
        found = [normal(typed)] if any(within(normal(typed), root) for root in roots) else []
    else:
        found = [normal(root / typed) for root in roots if within(normal(root / typed), root)]
    if found:
        return next((path for path in found if path.exists()), found[0])
    if any_path_allowed():
        return normal(typed if typed.is_absolute() else roots[0] / typed)
    listen = ",".join(listen_addresses())
    raise NodeError(f"{input_name} '{shown(text)}' is outside {where}, and this server listens on {listen} (reachable "
                    f"from other machines), so only folders there are read; give a folder name inside {where}, or "
                    f"start ComfyUI with {ALLOW_ANY_PATH_ENV}=1 to allow any folder.")


def input_folder(text: str, input_name: str = "folder") -> Path:
    """A photo folder the user typed: a name relative to ComfyUI's input/ folder, or (see typed_folder)
    an absolute path."""
    import folder_paths

    return typed_folder(input_name, text, [Path(folder_paths.get_input_directory())], "ComfyUI's input folder")


def model_folder(kind: str, text: str, input_name: str) -> Path:
    """A model folder the user typed: a name under models/<kind> (any of its registered roots), or (see
    typed_folder) an absolute path."""
    import folder_paths

    return typed_folder(input_name, text, [Path(p) for p in folder_paths.get_folder_paths(kind)], f"models/{kind}")


def model_file(kind: str, name: str) -> Path:
    """The full path of a model file by the name ComfyUI lists (e.g. in `checkpoints`, `loras`)."""
    import folder_paths

    if not name or name == NONE_CHOICE:
        raise NodeError(f"No file from models/{kind} was chosen; pick one in the list or connect a file name.")
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        raise NodeError(f"There is no file '{name}' in ComfyUI's models/{kind} folders; "
                        "check the name (or refresh the page after adding the file).")
    return Path(path)


def model_choices(kind: str, none: bool = False) -> list[str]:
    import folder_paths

    return ([NONE_CHOICE] if none else []) + folder_paths.get_filename_list(kind)


def first_model_folder(kind: str) -> Path:
    """Where new files of a model kind go: the first (default) search folder, e.g. models/loras."""
    import folder_paths

    return Path(folder_paths.get_folder_paths(kind)[0])


def name_in_model_folder(kind: str, path: Path) -> str:
    """The name ComfyUI's loaders know `path` by: relative to the model folder that holds it."""
    import folder_paths

    for root in folder_paths.get_folder_paths(kind):
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return Path(path).name


def view_ref(path: Path) -> dict | None:
    """{"filename", "subfolder", "type"} for a file under ComfyUI's output/ or temp/ (what /view serves)."""
    import folder_paths

    path = Path(path).resolve()
    for kind, root in (("output", folder_paths.get_output_directory()), ("temp", folder_paths.get_temp_directory())):
        try:
            relative = path.relative_to(Path(root).resolve())
        except ValueError:
            continue
        subfolder = relative.parent.as_posix()
        return {"filename": relative.name, "subfolder": "" if subfolder == "." else subfolder, "type": kind}
    return None


def save_temp_image(image, prefix: str) -> dict:
    """Save a PIL image into ComfyUI's temp/ folder (as PreviewImage does); returns its view ref."""
    import folder_paths

    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{PACK_FOLDER}_{prefix}", folder_paths.get_temp_directory(), image.width, image.height)
    name = f"{filename}_{counter:05}_.png"
    image.save(Path(folder) / name, compress_level=1)
    return {"filename": name, "subfolder": subfolder, "type": "temp"}


# ---------------------------------------------------------------- host state


def free_host_models() -> None:
    """Unload ComfyUI's loaded models and empty its cache before we load our own copy."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def empty_cache() -> None:
    """Give the memory of a model we dropped back to the device (ComfyUI's own call)."""
    import comfy.model_management as mm

    mm.soft_empty_cache()


def compute_device():
    import comfy.model_management as mm

    return mm.get_torch_device()


class HostProgress:
    """A `training` progress callback for one node: ComfyUI's progress bar for every stage
    (each stage refills it), which is also where the user's Cancel arrives (as an exception)."""

    def __init__(self, node_id: str | None):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)

    def __call__(self, event) -> None:
        self.bar.update_absolute(max(0, min(event.step, event.total)), max(1, event.total))


def send_event(event: str, data: dict) -> None:
    """A websocket message to the client that queued the prompt (for the web extension)."""
    from server import PromptServer

    server = PromptServer.instance
    server.send_sync(event, data, server.client_id)
