"""File helpers every reader and writer of the project shares: bounded reads of regular files, one
JSON reader, one atomic write, one probe for a writable folder, and OS errors in words.

Each failure is a `FileProblem` whose message names the file and says what is wrong; the callers
(checkpoint.py, prompt.py, media.py, the evaluation harness, the programs) turn it into their own
error type. Standard library only.
"""

import errno
import json
import os
import stat
import tempfile
import time
from pathlib import Path


class FileProblem(ValueError):
    """A file that cannot be read or written as asked; the message names it. `missing` is True when
    the file does not exist, which some callers allow (optional files)."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def os_error_text(e: OSError) -> str:
    """What an OSError on a path means, in words (the errno names say little to most people)."""
    return {
        errno.ENAMETOOLONG: "a name in the path is longer than the file system allows (255 bytes)",
        errno.ELOOP: "the path is a loop of symbolic links",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is not a directory",
        errno.ENOENT: "no such file or directory",
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "the file system is read-only",
    }.get(e.errno, e.strerror or str(e))


def read_file(path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Anything else is a ValueError saying
    what it is, before a byte is read: a FIFO would hang, /dev/zero would fill the memory. OSError
    (missing, permissions) is the caller's to word."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_size > limit:
        raise ValueError(f"{path} is larger than {limit >> 20} MiB")
    with open(path, "rb") as f:
        return f.read(limit + 1)


def read_text(path, limit: int) -> str:
    """A UTF-8 text file of at most `limit` bytes (a byte-order mark is dropped), or a FileProblem."""
    try:
        return read_file(path, limit).decode("utf-8").removeprefix("\ufeff")
    except FileNotFoundError as e:
        raise FileProblem(f"cannot read {path}: {os_error_text(e)}", missing=True) from None
    except UnicodeDecodeError as e:
        raise FileProblem(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # not a regular file, too large
        raise FileProblem(str(e)) from None
    except OSError as e:
        raise FileProblem(f"cannot read {path}: {os_error_text(e)}") from None


def read_pipe(path: str, limit: int, wait_s: float) -> bytes:
    """All bytes of a FIFO or pipe (`<(cat x.png)`, `/dev/stdin` fed by a pipe), without ever
    blocking on a FIFO that nobody writes to.

    Opened non-blocking, an empty FIFO reads as end-of-file while no writer has it open, and as
    "try again" while a writer does (POSIX read()). So a writer that is there is waited for as
    long as it takes; one that never comes is a FileProblem after wait_s seconds, and so is more than `limit` bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise FileProblem(f"cannot open {path}: {os_error_text(e)}") from None
    chunks, size = [], 0
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:  # a writer is there, nothing written yet: wait for it
                os.set_blocking(fd, True)
                continue
            if chunk:
                os.set_blocking(fd, True)  # from now on end-of-file means the writer is done
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise FileProblem(f"{path} streams more than {limit >> 20} MiB")
            elif chunks or os.get_blocking(fd):
                return b"".join(chunks)
            elif time.monotonic() > deadline:
                raise FileProblem(f"nothing is writing to {path} (a FIFO with no writer for {wait_s:.0f} s)")
            else:
                time.sleep(0.05)
    finally:
        os.close(fd)


def parse_json(text: str, where: str):
    """json.loads with every way it can fail (bad syntax, deep nesting, huge numbers) as a
    FileProblem naming `where` (a file, or file:line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileProblem(f"{where}: not valid JSON ({e.msg})") from None
    except (RecursionError, ValueError) as e:
        raise FileProblem(
            f"cannot read {where}: JSON this reader refuses ({type(e).__name__}: {str(e)[:80]})"
        ) from None


def read_json(path, limit: int):
    """The JSON value in a UTF-8 file of at most `limit` bytes, or a FileProblem naming the file."""
    return parse_json(read_text(path, limit), str(path))


def write_atomic(path, data: str | bytes) -> None:
    """Write a whole file or none (also on Ctrl-C, a kill or a full disk): a temporary file beside
    it, renamed over it. The file gets the usual mode of a new file (0666 less the umask), not the
    0600 of a temporary file. OSError is the caller's to report."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, value) -> None:
    """`value` as indented JSON (UTF-8, not escaped), written atomically."""
    write_atomic(path, json.dumps(value, indent=1, ensure_ascii=False))


def check_can_write(path) -> None:
    """A FileProblem ("cannot write PATH: ...") unless a file at `path` can be made or replaced now,
    before minutes of model loading. The only sure test is to create a file beside it (/proc and
    /sys refuse whatever os.access says), which is removed at once."""
    p = Path(path)

    def problem(reason: str) -> FileProblem:
        return FileProblem(f"cannot write {path}: {reason}")

    try:
        parent = os.stat(p.parent)
    except FileNotFoundError:
        raise problem(f"the directory {p.parent} does not exist") from None
    except OSError as e:
        raise problem(os_error_text(e)) from None
    try:
        target = os.stat(p)
    except FileNotFoundError:
        target = None
    except OSError as e:  # a name too long, a loop of links
        raise problem(os_error_text(e)) from None
    if not stat.S_ISDIR(parent.st_mode):
        raise problem(f"{p.parent} is not a directory")
    if target and stat.S_ISDIR(target.st_mode):
        raise problem("it is a directory")
    if target and not os.access(p, os.W_OK):
        raise problem("permission denied")
    try:
        fd, probe = tempfile.mkstemp(dir=p.parent, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise problem(f"cannot create a file in {p.parent} ({os_error_text(e)})") from None
