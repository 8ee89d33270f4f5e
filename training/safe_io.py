"""Writing files so that a crash, a kill or a full disk never leaves a half-written one."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
NOT_A_FOLDER = {errno.EEXIST, errno.ENOTDIR}
BAD_NAME = {errno.EINVAL, errno.ENAMETOOLONG}  # Windows reports invalid characters as EINVAL
WINDOWS_INVALID = set('<>:"/\\|?*') | {chr(c) for c in range(32)}
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
NAME_HINT = 'letters, digits, spaces, - _ . ( ) but none of < > : " / \\ | ? *'


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed over `path`, else removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _user_error(exc, path) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _user_error(exc, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temps(path: Path) -> None:
    """Temp files of `path` whose writer was killed (its process is gone) are removed before writing it again:
    a killed save of a 2 GB checkpoint must not leave 2 GB behind for good."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.\w+\.tmp")
    for old in path.parent.iterdir():
        found = pattern.fullmatch(old.name)
        if found and int(found[1]) != os.getpid() and not _alive(int(found[1])):
            old.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but not ours to signal
        return True
    return True


def _user_error(exc: OSError, path: Path) -> BaseException:
    """A full disk or a folder we may not write to is the user's to fix; other I/O errors stay as they are."""
    if exc.errno in DISK_FULL:
        return UserError(f"The disk is full while writing {path}; free some space and run again (nothing was overwritten).")
    if exc.errno in NOT_WRITABLE:
        return UserError(f"{path.parent} is not writable ({exc.strerror}); choose a folder you can write to.")
    if exc.errno in NOT_A_FOLDER:
        return UserError(f"{path.parent} is not a folder (a file is in the way); choose another place for {path.name}.")
    if exc.errno in BAD_NAME:
        return UserError(f"{path} is not a valid file name here ({exc.strerror}); choose a short name of {NAME_HINT}.")
    return exc


def file_name_problem(name: str) -> str | None:
    """Why `name` cannot be one file or folder name on every OS (Windows is the strictest), or None."""
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "is not a name"
    bad = sorted({c for c in name if c in WINDOWS_INVALID})
    if bad:
        shown = " ".join(c if c.isprintable() else repr(c)[1:-1] for c in bad)  # as typed; \n escaped: one line
        return f"has characters that Windows does not allow in file names ({shown})"
    if name.split(".")[0].strip().upper() in WINDOWS_RESERVED:
        return f"is a reserved device name on Windows ({name.split('.')[0]})"
    if name[-1] in ". ":
        return "ends in a dot or a space, which Windows drops"
    if len(name.encode("utf-8")) > 255:
        return "is longer than 255 bytes"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` through a temp file and a rename."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        except Exception as exc:  # safetensors reports I/O errors as its own type: "... (os error 28)"
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(tmp)) from None
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file's header (empty when it has none); reads no tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def atomic_save_image(image, path: str | os.PathLike, **kw) -> Path:
    """Save a PIL image atomically; the format comes from `path`'s suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=kw.pop("format", None) or _format_of(path), **kw)
    return path


def _format_of(path: Path) -> str:
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
