"""One save / load path for every file steer writes: expert sets, responses, stream states,
checkpoints and the study's embedding cache. No pickle (`torch.save`) anywhere.

File: safetensors whose string metadata holds
  format   "steer.<kind>"   what the file is ("steer.stream", "steer.responses", ...)
  version  "<n>"            the kind's format version; a reader refuses a newer one
  meta     JSON             the kind's metadata (labels, settings, model, shapes ...)
  sha256   hex              of format, version, meta and every tensor's name, dtype, shape
                            and bytes (tensors in name order)
`load` turns every problem into a ValueError naming the file: not a safetensors file, or
truncated (the header's offsets overrun the file); another kind; a newer format ("written by a
newer steer"); a hash mismatch (a flipped byte anywhere, tensors or header); a tensor of
another shape than the caller expects (another model's file). A missing file stays
FileNotFoundError. Same shapes but other weights (a model fingerprint) is for the caller to
warn about: expert sets move between machines and dtypes.

Atomic writes. A file (`atomic_save_file`): written to `.<name>.<pid>.tmp` in the target's
directory, fsynced, `os.replace`d over the target, then the directory is fsynced; a crash or
SIGKILL leaves the previous file or the new one, never a mix. A directory (an expert set:
experts.safetensors + experts.json; `atomic_directory`): TEMPORARY DIRECTORY + RENAME, not a
manifest written last (that rewrites files in place, so a crash between the tensors and the
manifest would leave neither the old set nor the new). The new directory is written in full
(every file fsynced) as the sibling `.<name>.<pid>.new`, then swapped with the old one in one
atomic step (Linux renameat2 RENAME_EXCHANGE) and the old one, now at the temporary name, is
removed. Where the exchange is unavailable, the old directory is renamed aside to
`.<name>.<pid>.old`, the new one renamed in, the old removed: a crash between those two renames
leaves no target but the previous set complete at `.<name>.<pid>.old` (`moved_aside` finds it;
ExpertSet.load names it). A killed save leaves at most a hidden temporary sibling; the next
save of the same target removes those of processes no longer running. `writable_dir` checks an
output folder before any compute (a file in the way, no write permission), creating nothing.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class Artifact(NamedTuple):
    tensors: dict[str, torch.Tensor]
    meta: dict
    version: int
    path: Path


def digest(head: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a file's format, version and meta strings and its tensors (name order)."""
    h = hashlib.sha256(json.dumps([head.get("format"), head.get("version"), head.get("meta")]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save(path, tensors: dict[str, torch.Tensor], meta: dict, *, kind: str, version: int) -> Path:
    """Write `tensors` and `meta` (JSON-able) as a steer.<kind> file of format `version`,
    atomically. Returns the path."""
    path = Path(path)
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    head = {"format": f"steer.{kind}", "version": str(int(version)), "meta": json.dumps(meta)}
    head["sha256"] = digest(head, tensors)
    atomic_save_file(tensors, path, head)
    return path


def header(path) -> dict[str, str]:
    """The safetensors metadata of `path` (without reading the tensors); ValueError when the
    file is not a readable safetensors file (corrupt or truncated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors' header / size errors
        raise ValueError(f"{path} is corrupt or truncated (not a readable safetensors file: "
                         f"{type(e).__name__}: {e})") from e


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU (ValueError when unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from e


def newer(path, what: str, found: int, newest: int) -> ValueError:
    """The refusal of a file written in a newer format than this steer reads."""
    return ValueError(f"{path} was written by a newer steer: {what} format {found}, this steer "
                      f"reads up to format {newest} (upgrade steer to read it)")


def load(path, *, kind: str, version: int, shapes: dict[str, tuple] | None = None,
         device: str | torch.device = "cpu") -> Artifact:
    """Read a file written by `save` with this `kind`, refusing (ValueError naming the file) one
    of another kind, of a format newer than `version`, corrupt, truncated, or whose tensors
    differ from `shapes` ({name: shape}, None for any size on an axis). Tensors go to `device`."""
    path = Path(path)
    head = header(path)
    fmt = head.get("format")
    if fmt != f"steer.{kind}":
        raise ValueError(f"{path} is not a steer.{kind} file (its format is {fmt!r})")
    try:
        found = int(head["version"])
    except (KeyError, ValueError):
        raise ValueError(f"{path} is corrupt: format version {head.get('version')!r}") from None
    if found > version:
        raise newer(path, f"steer.{kind}", found, version)
    tensors = read_tensors(path)
    if digest(head, tensors) != head.get("sha256"):
        raise ValueError(f"{path} is corrupt: its tensors or metadata do not match the sha256 "
                         "stored with them")
    try:
        meta = json.loads(head["meta"])
    except (KeyError, ValueError) as e:  # only a file written without `save` gets here
        raise ValueError(f"{path} is corrupt: unreadable metadata ({e})") from None
    check_shapes(path, tensors, shapes or {})
    if str(device) != "cpu":
        tensors = {k: t.to(device) for k, t in tensors.items()}
    return Artifact(tensors, meta, found, path)


def check_shapes(path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    """ValueError naming `path` when a tensor is missing or its shape is not `shapes[name]`
    (None matches any size on that axis)."""
    for name, want in shapes.items():
        if name not in tensors:
            raise ValueError(f"{path} has no tensor {name!r} (tensors: {sorted(tensors)})")
        got = tuple(tensors[name].shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
            raise ValueError(f"{path} is for another shape: {name} is {got}, expected {shown}")


# --- atomic writes -----------------------------------------------------------------------------

def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some systems
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove_stale(path: Path, suffixes: tuple[str, ...]) -> None:
    """Remove `.<name>.<pid>.<suffix>` siblings of `path` left by saves that were killed (their
    process no longer runs). Leaves everything when the target is missing (a moved-aside
    directory may be the only copy)."""
    if not path.exists():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.({'|'.join(suffixes)})")
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _atomic_replace(path, write) -> Path:
    """`write(tmp)` to a temporary file in `path`'s directory, fsync it, rename it over `path`, fsync
    the directory: a reader or a crash sees the previous file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    _remove_stale(path, ("tmp",))
    return path


def atomic_save_file(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, atomically (`_atomic_replace`)."""
    _atomic_replace(path, lambda tmp: save_file(tensors, str(tmp), metadata))


def atomic_write_text(path, text: str) -> Path:
    """A text file (JSON, CSV, a summary), atomically (`_atomic_replace`)."""
    return _atomic_replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def moved_aside(path) -> list[Path]:
    """Directories `.<name>.<pid>.old` next to a missing `path`: a previous version that a save
    interrupted between its two renames left complete (only without RENAME_EXCHANGE)."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*.old"))


@contextmanager
def atomic_directory(path, owned: tuple[str, ...]) -> Iterator[Path]:
    """Write a directory atomically: the body writes its files into the yielded temporary
    directory; on success it replaces `path` (see the module docstring); on an error `path` is
    left as it was. An existing `path` must hold only files named in `owned` (a directory of
    other files is never replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"refusing to replace {path}: it is not a directory")
        other = sorted(p.name for p in path.iterdir() if p.name not in owned)
        if other:
            raise ValueError(f"refusing to replace {path}: it holds files other than {list(owned)} "
                             f"({other[:5]})")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # the previous version, now at the temporary name
        else:
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale(path, ("new", "old"))


def writable_dir(path: str | Path, what: str = "--out") -> Path:
    """Check, before any compute, that `path` is (or can become) a writable directory; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{what} {path}: {ancestor} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise PermissionError(f"{what} {path} is not writable ({e.strerror or e})") from None
    return path
