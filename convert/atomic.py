"""Write a folder or a file completely or not at all, and never delete what this tool did not write.

`atomic_directory(target)` yields a fresh temporary sibling of ``target`` to fill. On success the sibling
takes ``target``'s place by *rename aside, rename in, then delete*: the old folder is first renamed to a
marked ``<name>.old-*`` sibling, the new one renamed to ``target``, and only then is the old one removed.
A process killed at any moment therefore leaves either the old or the new folder complete (the next
run puts a set-aside old folder back if the new one never arrived). On error the temporary folder is
removed; one left behind by a killed process is found by its marker file and removed on the next run.

What may be replaced is checked before anything is written:

* a missing target or an empty folder is always fine;
* a non-empty folder only when it is a checkpoint this package writes (``replaceable``, by default a
  Hugging Face folder whose ``config.json`` has a model type of ours and that holds only checkpoint
  files), or with ``overwrite=True``;
* never a folder that contains (or is) one of the ``protect`` paths, e.g. the source being converted,
  nor the current working directory, the home directory or the file-system root, whatever ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Hidden file that marks a temporary or set-aside folder as this tool's (so only ours are ever removed).
MARKER = ".comet-atomic-write.json"
TMP_INFIX = ".tmp-"
OLD_INFIX = ".old-"

# Files a Hugging Face checkpoint folder written by this package holds.
CHECKPOINT_FILES = {
    "config.json",
    "generation_config.json",
    "README.md",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
    "comet_default.json",
    MARKER,
}
CHECKPOINT_SUFFIXES = (".safetensors", ".py")
OUR_MODEL_TYPES = ("comet", "ram")


def checkpoint_model_type(folder: str | Path) -> str | None:
    """The ``model_type`` in ``folder/config.json``, or None when there is no readable config."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_checkpoint_folder(folder: str | Path, model_types: Iterable[str] = OUR_MODEL_TYPES) -> bool:
    """True for a folder holding only checkpoint files, with a ``config.json`` of one of ``model_types``."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink() or checkpoint_model_type(folder) not in set(model_types):
        return False
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file():
            return False
        if entry.name not in CHECKPOINT_FILES and not entry.name.endswith(CHECKPOINT_SUFFIXES):
            return False
    return True


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_replaceable(
    target: str | Path,
    overwrite: bool = False,
    replaceable: Callable[[Path], bool] = is_checkpoint_folder,
    protect: Iterable[str | Path] = (),
) -> None:
    """Raise `FileExistsError` unless writing ``target`` would only replace what may be replaced (see module doc)."""
    target = Path(target)
    resolved = target.expanduser().resolve()
    vital = {Path(resolved.anchor): "the file-system root", Path.cwd().resolve(): "the current working directory"}
    try:
        vital[Path.home().resolve()] = "the home directory"
    except RuntimeError:  # no home directory known
        pass
    for path, what in vital.items():
        if _contains(resolved, path):
            raise FileExistsError(f"refusing to write {target}: it would replace {what} ({path})")
    for path in protect:
        path = Path(path).expanduser()
        if path.exists() and _contains(resolved, path.resolve()):
            raise FileExistsError(f"refusing to write {target}: it contains the source {path}")
    if not os.path.lexists(target) or overwrite:
        return
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; pass --overwrite to replace it")
    if any(target.iterdir()) and not replaceable(target):
        raise FileExistsError(
            f"{target} is not empty and is not a checkpoint this tool wrote; choose another output folder "
            "or pass --overwrite to replace it"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_marker(folder: Path, target: Path, role: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "target": target.name, "role": role}
    (folder / MARKER).write_text(json.dumps(info))


def _marker(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(info: dict) -> bool:
    """A marked folder whose writer (on this host) is gone."""
    if info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def remove_marked(folder: Path) -> None:
    """Remove a folder this tool marked: everything but the marker first, the marker last, then the folder.

    Removing the marker last means a removal that is itself interrupted is still recognised next time.
    """
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


def recover(target: str | Path) -> list[Path]:
    """Clean up after a writer of ``target`` that was killed; return the sibling folders it removed.

    When ``target`` is missing because the writer was killed between its two renames, the new folder is
    moved into place if it was complete, else the set-aside old folder is put back. Other marked
    ``<name>.tmp-*`` / ``<name>.old-*`` siblings whose process is gone, and empty ones, are removed.
    Unmarked folders are never touched.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    stale, removed = [], []
    prefixes = (target.name + TMP_INFIX, target.name + OLD_INFIX)
    for folder in sorted(p for p in parent.iterdir() if p.name.startswith(prefixes)):
        if folder.is_symlink() or not folder.is_dir():
            continue
        info = _marker(folder)
        if info is None:
            if not any(folder.iterdir()):  # killed between mkdtemp and writing the marker: an empty folder
                folder.rmdir()
                removed.append(folder)
        elif info.get("target") == target.name and _is_stale(info):
            stale.append((folder, info.get("role")))
    if not os.path.lexists(target):
        for role in ("complete", "old"):
            found = [folder for folder, r in stale if r == role]
            if found:
                os.replace(found[0], target)
                (target / MARKER).unlink(missing_ok=True)
                stale = [(f, r) for f, r in stale if f != found[0]]
                break
    for folder, _ in stale:
        remove_marked(folder)
        removed.append(folder)
    info = _marker(target) if target.is_dir() and not target.is_symlink() else None
    if info is not None and _is_stale(info):  # killed just before setting it aside, or just after moving it in
        (target / MARKER).unlink(missing_ok=True)
    return removed


@contextmanager
def atomic_directory(
    target: str | Path,
    overwrite: bool = False,
    replaceable: Callable[[Path], bool] = is_checkpoint_folder,
    protect: Iterable[str | Path] = (),
) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; on success it replaces ``target``, on error it is removed.

    Raises `FileExistsError` before yielding when ``target`` may not be replaced (see `check_replaceable`).
    """
    target = Path(target)
    protect = list(protect)
    recover(target)
    check_replaceable(target, overwrite, replaceable, protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + TMP_INFIX, dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes owner-only folders
        _write_marker(tmp, target, "new")
        yield tmp
        check_replaceable(target, overwrite, replaceable, protect)  # the target may have changed meanwhile
        _write_marker(tmp, target, "complete")
        _replace(tmp, target)
        (target / MARKER).unlink(missing_ok=True)
    except BaseException:
        if tmp.is_dir():
            _write_marker(tmp, target, "new")
            remove_marked(tmp)
        raise


def _replace(new: Path, target: Path) -> None:
    """Rename ``target`` aside (marked), ``new`` into place, then remove the old folder."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    if target.is_dir() and not target.is_symlink():
        _write_marker(target, target, "old")  # the old folder is ours to remove from here on
        aside = Path(tempfile.mkdtemp(prefix=target.name + OLD_INFIX, dir=target.parent))
        aside.rmdir()
        os.replace(target, aside)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(aside, target)
            (target / MARKER).unlink(missing_ok=True)
            raise
        remove_marked(aside)
    else:  # a file or a link, replaced only with overwrite (check_replaceable)
        aside = target.with_name(f"{target.name}{OLD_INFIX}{os.getpid()}")
        os.replace(target, aside)
        os.replace(new, target)
        aside.unlink()


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path of ``target`` to write; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=target.name + TMP_INFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "atomic_directory",
    "atomic_file",
    "check_replaceable",
    "checkpoint_model_type",
    "is_checkpoint_folder",
    "recover",
    "remove_marked",
]
