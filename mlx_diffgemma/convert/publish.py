"""Where a conversion's output goes, and publishing it without losing data: the output
never overlaps the source, publishing never removes what it did not check (an atomic
no-replace rename; with --force only the directory found at the start is replaced), a
symlinked output is written at its target, SIGTERM/SIGHUP clean up like Ctrl-C, the
final swap is not cut in half by a signal, and what killed runs leave (temporary
directories, a swap cut by SIGKILL or power loss) is cleaned up or undone by the next."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from ..models.checkpoint import ConversionError


@dataclass
class OutputTarget:
    """The output directory: `path` as the user named it, `dest` the real directory
    written (a symlinked output is published at the link's target, keeping the link),
    and `identity` (st_dev, st_ino) of the directory found there at the start (None when
    there was none): publishing replaces only that directory."""

    path: Path
    dest: Path
    identity: Optional[Tuple[int, int]]

    @property
    def tmp(self) -> Path:
        return self.dest.parent / f"{self.dest.name}.tmp-{os.getpid()}"


def _identity(p: Path) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _lineage(p: Path) -> set:
    """Identities of `p` and of each of its existing ancestors. Compared by inode, not
    by name, so case-insensitive file systems, bind mounts and hard links cannot hide
    that two paths are the same directory."""
    ids = set()
    for a in (p, *p.parents):
        i = _identity(a)
        if i is not None:
            ids.add(i)
    return ids


def check_no_overlap(src: Path, dest: Path, files: Sequence[Path] = (),
                     output_flag: str = "--mlx-path") -> None:
    """Refuses an output that is the source, lies inside it, or contains it (or any of
    the source's files, which may be symlinks elsewhere, as in the hub cache): replacing
    it would delete the checkpoint being read."""
    src = Path(os.path.realpath(src))
    src_id, dest_id = _identity(src), _identity(dest)
    if dest_id is not None and dest_id == src_id:
        how = "is"
    elif src_id is not None and src_id in _lineage(dest):
        how = "is inside"
    elif dest_id is not None and any(dest_id in _lineage(Path(os.path.realpath(f))) for f in (src, *files)):
        how = "contains"
    else:
        return
    raise ConversionError(
        f"refusing to write {dest}: it {how} the source {src}, which would be deleted; "
        f"choose an output ({output_flag}) outside the source directory"
    )


def output_target(mlx_path: Union[str, Path], force: bool) -> OutputTarget:
    out = Path(mlx_path).expanduser().absolute()
    dest = Path(os.path.realpath(out))
    if not os.path.lexists(dest):
        return OutputTarget(out, dest, None)
    if not force:
        raise ConversionError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if not dest.is_dir():
        raise ConversionError(f"{out} exists and is not a directory")
    return OutputTarget(out, dest, _identity(dest))


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; keep the directory
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _leftovers(dest: Path, kind: str) -> List[Tuple[Path, int]]:
    """(path, pid) of each `<dest>.<kind>-<pid>` directory whose process is gone."""
    pattern = re.compile(re.escape(dest.name) + re.escape(f".{kind}-") + r"(\d+)")
    out = []
    if not dest.parent.is_dir():
        return out
    for p in sorted(dest.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # a conversion in progress
        out.append((p, pid))
    return out


def recover_swaps(dest: Path) -> List[str]:
    """Finishes or undoes the final swap of a conversion killed in the middle of it
    (SIGKILL, power loss; a signal that can be caught waits for the swap, see `publish`).
    The swap moves the previous output to `<dest>.old-<pid>`, renames the finished
    `<dest>.tmp-<pid>` to `dest`, then removes the old one. So a leftover `.old-<pid>`
    with `dest` missing is a swap cut in half: the previous output is moved back. With
    `dest` there and that run's `.tmp-<pid>` gone, the new output was published: the old
    one is removed. With both there, `dest` was made since by someone else: both are
    left, and the message says so. Returns what it did, one line each."""
    done = []
    for old, pid in _leftovers(dest, "old"):
        tmp = dest.parent / f"{dest.name}.tmp-{pid}"
        if not os.path.lexists(dest):
            rename_noreplace(old, dest)
            done.append(f"moved {old.name} back to {dest.name}: a conversion replacing it was "
                        "killed in the middle of its final swap, so the previous output is restored")
        elif not tmp.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}, the previous output of {dest.name}, left by a "
                        "conversion killed after publishing its new output")
        else:
            done.append(f"{old.name} is the previous output of {dest.name}, left by a conversion "
                        f"killed during its final swap, and {dest.name} was made since: both left "
                        "as they are; remove the one you do not want")
    return done


def remove_stale_tmp(dest: Path) -> List[str]:
    """Removes `<dest>.tmp-<pid>` directories left by conversions killed beyond cleanup
    (SIGKILL, power loss): those whose process is gone. Returns what it removed."""
    removed = []
    for p, _ in _leftovers(dest, "tmp"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


@functools.lru_cache(maxsize=None)
def _noreplace_rename() -> Optional[Callable[[bytes, bytes], int]]:
    """The C call that renames without replacing: macOS renamex_np(RENAME_EXCL), Linux
    renameat2(RENAME_NOREPLACE); None where neither exists."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        f = libc.renamex_np
        f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: f(a, b, 0x4)
    if hasattr(libc, "renameat2"):
        f = libc.renameat2
        f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: f(-100, a, -100, b, 1)  # AT_FDCWD, RENAME_NOREPLACE
    return None  # pragma: no cover


def rename_noreplace(src: Path, dst: Path) -> None:
    """os.rename that raises FileExistsError instead of replacing `dst` (plain rename
    silently replaces an empty directory or a file). Atomic where the OS supports it;
    elsewhere checks first, leaving a window of microseconds."""
    fn = _noreplace_rename()
    if fn is not None:
        if fn(os.fsencode(src), os.fsencode(dst)) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EINVAL)):
            raise OSError(err, os.strerror(err), str(src))
        # the file system does not support the flag: fall through
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _keep_finished(tmp: Path, dest: Path, why: str) -> ConversionError:
    """The error for a publish that would replace what was not checked: the finished
    output is kept under a name no cleanup removes."""
    kept = dest.parent / f"{dest.name}.converted-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        rename_noreplace(tmp, kept)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return ConversionError(f"{why}; left it untouched and removed the new output")
    return ConversionError(f"{why}; left it untouched and kept the new output at {kept}")


class Published(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP that came during the final swap: it was held until the
    swap was done, so the new output is in place (`replaced`: and the previous one,
    moved aside, was removed)."""

    def __init__(self, signum: int, replaced: bool):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.replaced = replaced


@contextlib.contextmanager
def _signals_held():
    """For its duration Ctrl-C, SIGTERM and SIGHUP are recorded (in the list it yields)
    instead of raised. Main thread only; elsewhere nothing changes."""
    got: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    sigs = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in sigs}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def publish(tmp: Path, target: OutputTarget) -> None:
    """Moves the finished `tmp` to `target.dest`. Never removes what was not checked at
    the start: with nothing there then, the rename refuses to replace whatever appeared
    since; with a directory there then (--force), only that same directory (same inode)
    is moved aside and removed. A signal during the swap waits for its end and is then
    raised as `Published`; a kill cannot wait, and `recover_swaps` repairs it."""
    with _signals_held() as got:
        replaced = _swap(tmp, target)
    if got:
        raise Published(got[0], replaced)


def _swap(tmp: Path, target: OutputTarget) -> bool:
    """`publish`'s renames; True when a previous output was replaced (and removed)."""
    dest, old = target.dest, None
    if target.identity is not None:
        old = dest.parent / f"{dest.name}.old-{os.getpid()}"
        try:
            rename_noreplace(dest, old)
        except FileNotFoundError:
            old = None  # gone meanwhile: nothing to replace
        else:
            if _identity(old) != target.identity:
                rename_noreplace(old, dest)
                raise _keep_finished(tmp, dest, f"{dest} was replaced by another directory during the conversion")
    try:
        rename_noreplace(tmp, dest)
    except FileExistsError:
        if old is not None:
            raise _keep_finished(
                tmp, dest, f"{dest} appeared during the conversion (the previous output is at {old})"
            ) from None
        raise _keep_finished(tmp, dest, f"{dest} appeared during the conversion") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return old is not None


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the conversion was, as Ctrl-C's KeyboardInterrupt is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt():
    """For its duration, SIGTERM and SIGHUP (a closed terminal, `kill`, a service
    manager) interrupt the conversion as Ctrl-C does, so its partial output is removed
    instead of left behind. The first signal only: cleanup is not interrupted again.
    Handlers can only be installed from the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise _Terminated(signum)

    sigs = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
