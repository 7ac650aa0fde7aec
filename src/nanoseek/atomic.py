"""Atomic writes, the one writer every module uses: a reader, or the next run after a crash, finds the
old file or directory or the new one, never half of one. Torch-free, so light modules can use it.

- A file is written under a temporary name beside it (rename is atomic within one filesystem),
  fsynced (else a power cut can leave the new name over empty data) and renamed with `os.replace`.
- A directory is written whole under a scratch name and swapped in: the old one moved aside, the new
  one renamed into place, the old one removed. Linux cannot rename over a non-empty directory; a
  crash between the two renames leaves the old one aside, and the next write (or resume) puts it back.
- A path that is a symlink is written where it points (`_target`): a checkpoint directory linked to
  another disk stays there, and stays linked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    try:  # Linux states it; elsewhere read it by setting it (process-wide, so only as a fallback)
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What a new file gets under the user's umask. Some writers create theirs owner-only (safetensors'
# save_file: 0600), which would keep a served checkpoint from another user or a container.
FILE_MODE = 0o666 & ~_umask()
# the longest file name (bytes) of Linux's and macOS's file systems
NAME_MAX = 255


def fsync(path: Path) -> None:
    """Put `path`'s data (a directory's: its entries, a rename) on the disk."""
    flags = os.O_RDONLY  # directories too: a rename is durable once its directory is
    if sys.platform == "win32":
        if path.is_dir():
            return  # Windows cannot open a directory (os.open: EACCES); NTFS journals the rename itself
        flags = os.O_RDWR  # its fsync (FlushFileBuffers) refuses a read-only descriptor: EBADF
    fd = os.open(path, flags)
    os.fsync(fd)
    os.close(fd)


def _target(path: str | os.PathLike) -> Path:
    """Where a write to `path` goes: a symlink's target, else `path` itself. Renamed over, the link
    would become a file or directory of its own beside it, on the link's disk rather than the target's."""
    final = Path(path)
    if not final.is_symlink():
        return final
    try:
        return final.resolve()
    except RuntimeError:  # a link loop: Python before 3.13 raises this, naming no errno
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


def cut_name(name: str, room: int) -> str:
    """`name`, or where it passes `room` bytes (a file system allows NAME_MAX in a name), its head and a
    digest of it, `room` bytes at most: names made of longer ones stay legal and apart."""
    if len(os.fsencode(name)) <= room:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    head = os.fsencode(name)[: room - len(digest) - 1].decode(errors="ignore")  # never half a UTF-8 character
    return f"{head}.{digest}"


def _beside(final: Path, suffix: str) -> Path:
    """The hidden scratch name beside `final`: `.NAME{suffix}`, or where that would pass the file
    system's 255-byte limit on a name (a long but legal NAME), NAME cut short and a digest of it."""
    return final.with_name(f".{cut_name(final.name, NAME_MAX - 1 - len(os.fsencode(suffix)))}{suffix}")


def _remove(path: Path) -> None:
    """Remove a directory, or a symlink (an older nanoseek moved a linked checkpoint's link aside)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


# how Rust writers (safetensors' save_file, tokenizers' save) end the bare `Exception` they raise for a
# failed write: "I/O error: No space left on device (os error 28)"
_RUST_IO = re.compile(r"\(os error (\d+)\)$")


def _write_error(message: str, path: str | os.PathLike, directory: Path) -> OSError:
    """The OSError, with its errno and the user's `path`, of a write a writer reported otherwise: a Rust
    one's `Exception` (the CLI's one-line error is for OSErrors), or an OSError without errno (numpy's
    tofile under the GGUF writer: "65536 requested and 61152 written", a short write)."""
    if m := _RUST_IO.search(message):
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    try:  # a short write to a regular file: the file system is full, or it failed otherwise
        full = os.statvfs(directory).f_bavail == 0
    except (OSError, AttributeError):  # (Windows has no statvfs)
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, message, str(path))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block finishes without error it replaces `path`.
    An error writing the temporary file names `path`, the one the user knows."""
    final = _target(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(final, ".tmp")
    try:
        yield tmp
        if tmp.stat().st_mode & 0o777 != FILE_MODE:
            os.chmod(tmp, FILE_MODE)
        fsync(tmp)
        os.replace(tmp, final)
        fsync(final.parent)
    except OSError as e:
        if e.errno is None:
            raise _write_error(str(e), path, final.parent) from e
        if e.filename is None or str(e.filename) == str(tmp):
            e.filename, e.filename2 = str(path), None
        raise
    except Exception as e:
        if not _RUST_IO.search(str(e)):
            raise
        raise _write_error(str(e), path, final.parent) from e
    finally:
        # a read-only mount refuses even this (EROFS, where there is nothing to remove): that error
        # would replace the one above, naming the temporary file
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, refusal: str) -> Iterator[None]:
    """Hold the lock file `lock` while the block runs: another process asking for it meanwhile gets
    ValueError(`refusal`, its `{holder}` the process that holds it). The lock goes with the process, so
    a killed run leaves none held (only the file), and one that wrote nothing beside it (refused before
    it began) no directory made for the lock alone. A no-op where there is no fcntl (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = Path(lock).absolute()
    made = [d for d in (lock.parent, *lock.parent.parents) if not d.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held
            f.seek(0)
            raise ValueError(refusal.format(holder=f.read().strip() or "another process")) from None
        except OSError:
            # a file system without locks (ENOLCK, EOPNOTSUPP: some NFS and FUSE mounts): unlocked, as
            # without fcntl; read as held, every run there was refused with none running
            pass
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield  # the lock goes with the file's closing, or with the process
        finally:
            if made and os.listdir(lock.parent) == [lock.name]:
                with contextlib.suppress(OSError):
                    lock.unlink()
                    for d in made:  # (innermost first) those that hold nothing else
                        d.rmdir()


def check_writable(directory: str | os.PathLike) -> None:
    """Raise the OSError that writing into `directory` (or creating it, where it is missing) would meet:
    a read-only or full disk, no permission, a file where a directory is wanted. For a long job (sampling a
    model) that writes only at its end, so that a refusal costs nothing; it leaves nothing behind."""
    d = Path(directory).absolute()
    while not d.exists() and d != d.parent:
        d = d.parent  # the directory the first mkdir would write into
    if not d.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(d))
    try:
        with tempfile.TemporaryFile(dir=d) as f:  # an unnamed file (O_TMPFILE), gone when closed
            # a byte: a full disk makes an empty file, and refuses its first block (a run on it trained
            # its tokenizer and read its data first, then ended with "No space left on device" alone)
            os.write(f.fileno(), b"\0")
    except OSError as e:  # (or a random name, where O_TMPFILE is not had: none of the user's)
        raise OSError(e.errno, e.strerror, str(d)) from None


def check_out(directory: str | os.PathLike, resume: bool = False) -> None:
    """`check_writable` for a training stage's --out, as the ValueError (the CLI's one line) that names
    it: said before the stage reads its data and model (or trains a tokenizer), not at its first write
    after them. `resume`: the run resumes from what it holds, which another --out does not (it would
    start afresh there), so the way on is a copy."""
    try:
        check_writable(directory)
    except OSError as e:
        way = (
            f"--resume writes there too: copy {directory} to a disk that takes writes and resume the copy"
            if resume
            else "choose another --out"
        )
        raise ValueError(f"cannot write --out {directory} ({e.filename}: {e.strerror}); {way}") from None


def scratch_dir(path: str | os.PathLike) -> Path:
    """Where `atomic_directory(path)` writes before the swap (ranks of one save all write there)."""
    final = _target(path)
    return _beside(final, ".tmp-new")


def directory_to_read(path: str | os.PathLike) -> Path:
    """`path`, or the copy of it a save cut short between its two renames left aside. A reader reads that
    copy where it is: moving it back is the writer's job (`restore_directory`), since one may be between
    those renames right now."""
    final = _target(path)
    if final.exists():  # (before naming the copy: `.` and `/` have no name to put it beside)
        return Path(path)
    aside = _beside(final, ".tmp-old")
    return aside if aside.is_dir() else Path(path)


def restore_directory(path: str | os.PathLike) -> None:
    """Put back a directory that a crash mid-swap left aside (a no-op when there is none)."""
    final = _target(path)
    aside = _beside(final, ".tmp-old")
    if aside.exists():
        if final.exists():
            _remove(aside)  # the swap had finished; only the clean-up was cut short
        else:
            os.replace(aside, final)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty scratch directory that replaces `path` only once the block finishes without
    error; until then (and after a failure) an existing `path` is left as it was."""
    final = _target(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_directory(final)
    tmp = scratch_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed write's leftovers
    try:
        tmp.mkdir()  # (inside: a read-only disk's refusal names `path`, not this hidden name)
        yield tmp
        for f in tmp.rglob("*"):
            fsync(f)
        fsync(tmp)
        aside = _beside(final, ".tmp-old")
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # a file of the scratch directory, gone now, is named as the one the user knows (as `atomic_file`)
        if isinstance(e, OSError) and isinstance(e.filename, str) and Path(e.filename).is_relative_to(tmp):
            e.filename = str(Path(path) / Path(e.filename).relative_to(tmp))
        raise
