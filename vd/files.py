"""Writing outputs so that nothing is ever half-written, shared by the applications (`vd`, `vd batch`, the
converter): a temporary file in the target's folder, fsync, rename. Failures become `OutputError`, one line
naming the path."""

import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

PARTIAL = ".partial-"  # temporary names: .NAME.partial-HOST-PID (NAME shortened to fit the file-name limit)
TEMP_NAME = re.compile(r"\..+\.partial-(?:(?P<host>[^-]+)-)?(?P<pid>\d+)")  # older runs wrote .NAME.partial-PID
STALE_SECONDS = 600  # a temporary lives for one write; one of another host older than this is a leftover


class OutputError(OSError):
    """An output that cannot be written (folder missing or read-only, disk full, name too long, ...)."""


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def owner_tag() -> str:
    """HOST-PID of this process, as written into temporary names (so a cleanup can tell whose they are)."""
    return f"{_host()}-{os.getpid()}"


def stale_temp(path: Path) -> bool:
    """Whether `path` is a temporary file or folder that a killed run left behind: of this host, its process is
    gone (or has our pid: pids repeat in fresh containers); of another host, it is older than STALE_SECONDS.
    Those of live runs, here or on other nodes, are not, so runs can share a folder."""
    m = TEMP_NAME.fullmatch(path.name)
    if m is None:
        return False
    pid = int(m.group("pid"))
    if m.group("host") in (None, _host()):
        return pid == os.getpid() or not process_alive(pid)
    try:
        return time.time() - path.stat().st_mtime > STALE_SECONDS
    except FileNotFoundError:
        return False


def temp_path(path: Path) -> Path:
    """Where `path` is assembled before the rename: a hidden name in the same folder, within the name limit."""
    suffix = f"{PARTIAL}{owner_tag()}"
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    room = max(1, limit - len(suffix) - 1)
    name = path.name.encode()[:room].decode(errors="ignore")
    return path.with_name(f".{name}{suffix}")


def describe(e: OSError) -> str:
    """The reason of an OSError, without the path (messages name it themselves)."""
    text = str(e).strip()
    return e.strerror or (text.splitlines()[0] if text else type(e).__name__)


def save(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary file, which is fsynced and renamed to `path`; on any failure (or Ctrl-C) the
    temporary file is removed and `path` is left as it was. OSError -> OutputError naming `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if path.is_dir():
            raise OutputError(f"{path}: is a folder, not a file")
        os.replace(tmp, path)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({describe(e)})") from None
    finally:
        _remove(tmp)


def write_bytes(path: Path, data: bytes) -> None:
    """`save` for bytes."""
    save(path, lambda tmp: tmp.write_bytes(data))


def check_writable(path: Path) -> None:
    """Fail now, before any model runs, if `path` could not be written: its folder is missing, is not a folder
    or is read-only, the path is a folder, or the temporary name is refused. Probes by creating (and removing)
    the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, not a file")
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"{path}: folder {str(folder)!r} {what}")
    tmp = temp_path(path)
    try:
        with open(tmp, "xb"):
            pass
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({describe(e)})") from None
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    """Remove a temporary file if it is there; a failure here must not hide the error being raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
