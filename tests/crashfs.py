"""crashfs: a FUSE filesystem that forgets what was not synced, for power-cut tests.

The tests used to SIGKILL processes, and a SIGKILL leaves the page cache
alone: a spool or a sink that never fsync'd passed them all the same. This
filesystem gives a test the page cache's failure mode instead. It passes
through to a backing directory, but keeps every byte written to a regular
file in the FUSE process's memory until an fsync() or fdatasync() of that
file; reads see it at once, as they would see the page cache. The sync
writes the file's unsynced data into the backing file and fsyncs (or
fdatasyncs) the backing file before it returns. A cut is a SIGKILL of the
FUSE process followed by a lazy unmount: what was only in memory is gone,
as after a power cut, and the backing directory holds what was synced.

    with crash_mount(tmp_path / "disk", tmp_path / "mnt") as fs:
        ...write under fs.path...
        fs.cut()          # power cut: the unsynced data is gone, unmounted
        fs.remount()      # a fresh crashfs on the same backing dir, same path
        ...read what survived...
    # unmounted (also on failure); nothing left in /proc/mounts

The model, and its limits:
- Data. Unsynced data lives in 4 KB pages per file (per backing inode: hard
  links and renames share it) with the file's size. A sync of a file makes
  all of that file's data durable, whichever descriptor wrote it, and only
  that file's: fsync of a directory, sync(2), syncfs(2) and close() make no
  file data durable. A write that extended a file extends its durable size
  only at the file's next sync, so a cut loses appended data and the size
  that went with it. O_SYNC / O_DSYNC descriptors sync the file after each
  write. All unsynced data is lost at a cut, nothing of it survives: no
  partial writeback, no reordering, no torn sector. A real disk may keep some
  of it, so a test may only rely on "synced survives", never on "unsynced is
  lost" as a property of the code under test (only of this model).
- Metadata is journaled: create, mkdir, mknod, symlink, link, rename, unlink,
  rmdir, chmod, chown, utimens and truncate (also O_TRUNC) are applied to the
  backing directory at once, and survive a cut with or without a sync of the
  file or its directory. So this model cannot show a missing fsync of a
  directory after a create or a rename (a real filesystem may lose the name).
  A truncate changes the durable size at once; data written beyond the
  backing file's size and not synced reads as zeros after a cut when a later
  truncate took the size over it.
- A cut also kills every process's view of the old mount: writes and syncs
  on descriptors still open on it fail with ENOTCONN (reads may still be
  served from the kernel's cache of the old mount). Kill the processes that
  use it first, as the power would.
- mmap: reads see unsynced data; shared writable mappings reach crashfs when
  the kernel writes their pages back (msync, writeback) and are then
  unsynced writes like any other (msync(MS_SYNC) syncs the file).
- Space: unsynced data takes none on the backing filesystem, so a write never
  fails for lack of room; the sync that writes it does (as with delayed
  allocation). fallocate is not supported (EOPNOTSUPP).
- Not modelled: xattrs (ENOTSUP); POSIX and flock locks are the kernel's own
  (local to one mount); permissions are root's (no checks of its own: mount
  and use it as root only); fstat of an open file whose last name was
  removed fails with ENOENT (libfuse2's path-based API has no path for it;
  its reads, writes and syncs work).

The FUSE process is this file run as a script (Debian's python3-fusepy over
libfuse2; as root libfuse mounts with mount(2), no fusermount). It serves
until it is killed; there is no clean unmount that would write anything
back. It dies with the thread that started it (PR_SET_PDEATHSIG), and a
mount whose owner died is detached by the next mount (`cleanup_stale`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from streamer.demo.testbed import pid_alive

PAGE = 4096
MOUNT_TIMEOUT = 10.0     # FUSE process started, mounted, INIT answered
KILL_TIMEOUT = 10.0
FSTYPE = "fuse.crashfs"
FSNAME_PREFIX = "crashfs."   # + the pid of the process that owns the mount
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1


class CrashFSError(Exception):
    """crashfs could not mount, cut or unmount."""


# ---------------------------------------------------------------- the mount table


def _unescape(field: str) -> str:
    """A /proc/mounts field: space, tab, newline and backslash are octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and re.fullmatch(r"[0-7]{3}", field[i + 1:i + 4]):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def crashfs_mounts() -> list[tuple[str, str]]:
    """(fsname, mount point) of every crashfs mount in /proc/mounts."""
    found = []
    with open("/proc/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == FSTYPE:
                found.append((_unescape(parts[0]), _unescape(parts[1])))
    return found


def mounted(path) -> bool:
    """Whether a crashfs is mounted at path (a dead one counts)."""
    where = os.path.realpath(path)
    return any(mp == where for _, mp in crashfs_mounts())


_libc = ctypes.CDLL(None, use_errno=True)


def _detach(path: str) -> None:
    """umount2(MNT_DETACH): works on a dead FUSE mount and a busy one."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:      # EINVAL: not a mount point (any more)
            raise CrashFSError(f"cannot unmount {path}: {os.strerror(err)}")


def cleanup_stale() -> list[str]:
    """Unmount the crashfs mounts whose owning process is gone (a test run
    that was killed); never one of a live process."""
    removed = []
    for fsname, mp in crashfs_mounts():
        owner = fsname[len(FSNAME_PREFIX):] if fsname.startswith(FSNAME_PREFIX) else ""
        if owner.isdigit() and not pid_alive(int(owner)):
            _detach(mp)
            removed.append(mp)
    return removed


# ---------------------------------------------------------------- the test's side


class CrashMount:
    """One mount point over one backing directory, mounted and cut as the
    test says. Use crash_mount(); `close()` always leaves nothing mounted."""

    def __init__(self, backing, path, log=None):
        self.backing = Path(backing).resolve()
        self.path = Path(path).absolute()
        self.log = Path(log) if log else self.path.with_name(self.path.name + ".crashfs.log")
        self.proc: subprocess.Popen | None = None
        self.cuts = 0
        self._made_path = False

    def mount(self) -> None:
        if self.proc is not None:
            raise CrashFSError(f"{self.path} is already mounted")
        cleanup_stale()
        self.backing.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self._made_path = True
        if mounted(self.path):
            raise CrashFSError(f"something is already mounted at {self.path}")
        if any(self.path.iterdir()):
            raise CrashFSError(f"the mount point {self.path} is not empty")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.path), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        try:
            self._wait_ready()
        except BaseException:
            self._kill_and_detach()
            raise

    def _wait_ready(self) -> None:
        """Until the FUSE process answered the kernel's INIT (it prints
        "ready" from init()) and the mount is in /proc/mounts."""
        deadline = time.monotonic() + MOUNT_TIMEOUT
        got = b""
        fd = self.proc.stdout.fileno()
        while b"ready\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CrashFSError(f"crashfs at {self.path}: not ready within "
                                   f"{MOUNT_TIMEOUT} s; log: {self._log_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 64)
                if not chunk:
                    rc = self.proc.wait(timeout=KILL_TIMEOUT)
                    raise CrashFSError(f"crashfs at {self.path} exited (rc={rc}) before it "
                                       f"was ready; log: {self._log_tail()}")
                got += chunk
        if not mounted(self.path):
            raise CrashFSError(f"crashfs said ready, but {self.path} is not in /proc/mounts")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def cut(self) -> None:
        """The power cut: the FUSE process dies with every unsynced byte, and
        the mount is detached. Processes using the mount should be gone."""
        if self.proc is None:
            raise CrashFSError(f"nothing is mounted at {self.path} to cut")
        self._kill_and_detach()
        self.cuts += 1

    def remount(self) -> None:
        """A fresh crashfs on the same backing directory at the same path."""
        if self.proc is not None:
            raise CrashFSError(f"{self.path} is still mounted: cut it first")
        self.mount()

    def _kill_and_detach(self) -> None:
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                proc.kill()
                proc.wait(timeout=KILL_TIMEOUT)
                proc.stdout.close()
        finally:
            if mounted(self.path):
                _detach(str(self.path))
        if mounted(self.path):
            raise CrashFSError(f"{self.path} is still in /proc/mounts after the unmount")

    def close(self) -> None:
        """Cut if mounted, check that nothing is mounted at the path any more,
        and remove the mount point if this made it. Idempotent."""
        try:
            self._kill_and_detach()
        finally:
            if self._made_path and not mounted(self.path):
                with contextlib.suppress(OSError):
                    self.path.rmdir()
                    self._made_path = False


@contextlib.contextmanager
def crash_mount(backing, path, log=None):
    """A crashfs over `backing` mounted at `path` (made if missing, must be
    empty); always unmounted afterwards, also when the body fails."""
    fs = CrashMount(backing, path, log)
    try:
        fs.mount()
        yield fs
    finally:
        fs.close()


# ---------------------------------------------------------------- the FUSE side


class _Unsynced:
    """One file's data that no sync has made durable: its pages (PAGE bytes,
    by page number) and its size as the writers see it. The backing file
    holds the rest, and is never longer than `size`."""

    __slots__ = ("size", "pages", "mtime_ns")

    def __init__(self, size: int):
        self.size = size
        self.pages: dict[int, bytearray] = {}
        self.mtime_ns = 0


class CrashOps:
    """The filesystem's operations (fusepy, raw_fi): a path-based pass-through
    to `backing` whose regular files keep unsynced data in `self.unsynced`.
    Every operation runs under one lock: the model, not speed, is the point.

    Every open regular file gets a backing descriptor opened O_RDWR without
    O_APPEND, O_TRUNC or O_SYNC (writes come with their offset from the
    kernel; a sync must be able to write whatever the opener's mode was); the
    opener's flags are kept beside it."""

    use_ns = True
    flag_nullpath_ok = 1     # with hard_remove: ops on an unlinked open file get no path

    def __init__(self, backing: str):
        self.backing = os.path.realpath(backing)
        self.unsynced: dict[int, _Unsynced] = {}
        self.handles: dict[int, tuple[int, int]] = {}    # backing fd -> (inode, open flags)
        self.opens: dict[int, int] = {}                  # inode -> open handles
        self.orphans: set[int] = set()                   # unlinked inodes still open
        self._lock = threading.Lock()

    def __call__(self, op, *args):
        with self._lock:
            return getattr(self, op)(*args)

    def _real(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    @staticmethod
    def _fd(fi) -> int | None:
        fd = getattr(fi, "fh", None)
        return fd if isinstance(fd, int) else None

    # -- unsynced data

    def _state(self, ino: int, fd: int) -> _Unsynced:
        f = self.unsynced.get(ino)
        if f is None:
            f = self.unsynced[ino] = _Unsynced(os.fstat(fd).st_size)
        return f

    @staticmethod
    def _pread(fd: int, n: int, pos: int) -> bytes:
        data = os.pread(fd, n, pos)
        return data + bytes(n - len(data))     # past the backing file's end: a hole

    def _write(self, f: _Unsynced, fd: int, data: bytes, offset: int) -> None:
        end = offset + len(data)
        pos = offset
        while pos < end:
            pno, off = divmod(pos, PAGE)
            n = min(PAGE - off, end - pos)
            page = f.pages.get(pno)
            if page is None:
                page = f.pages[pno] = bytearray(self._pread(fd, PAGE, pno * PAGE)
                                                if pno * PAGE < f.size else PAGE)
            page[off:off + n] = data[pos - offset:pos - offset + n]
            pos += n
        f.size = max(f.size, end)
        f.mtime_ns = time.time_ns()

    def _read(self, f: _Unsynced, fd: int, size: int, offset: int) -> bytes:
        end = min(offset + size, f.size)
        out = bytearray()
        pos = offset
        while pos < end:
            pno, off = divmod(pos, PAGE)
            page = f.pages.get(pno)
            if page is not None:
                n = min(PAGE - off, end - pos)
                out += page[off:off + n]
            else:
                # a run of clean pages in one read
                stop = (pno + 1) * PAGE
                while stop < end and stop // PAGE not in f.pages:
                    stop += PAGE
                n = min(stop, end) - pos
                out += self._pread(fd, n, pos)
            pos += n
        return bytes(out)

    def _sync(self, ino: int, fd: int, datasync: bool) -> None:
        f = self.unsynced.pop(ino, None)
        try:
            if f is not None:
                for pno in sorted(f.pages):
                    start = pno * PAGE
                    n = min(PAGE, f.size - start)
                    if n > 0:
                        written = os.pwrite(fd, f.pages[pno][:n], start)
                        if written != n:
                            raise OSError(errno.EIO, f"short write to the backing file ({written}/{n})")
                if os.fstat(fd).st_size < f.size:
                    os.ftruncate(fd, f.size)
            (os.fdatasync if datasync else os.fsync)(fd)
        except BaseException:
            if f is not None:
                self.unsynced.setdefault(ino, f)
            raise

    def _truncated(self, ino: int, length: int) -> None:
        f = self.unsynced.get(ino)
        if f is None:
            return
        f.size = length
        for pno in [p for p in f.pages if p * PAGE >= length]:
            del f.pages[pno]
        pno, off = divmod(length, PAGE)
        if off and pno in f.pages:
            f.pages[pno][off:] = bytes(PAGE - off)
        f.mtime_ns = time.time_ns()

    def _gone(self, ino: int) -> None:
        """The inode's last name went: its unsynced data goes with its last handle."""
        if self.opens.get(ino):
            self.orphans.add(ino)
        else:
            self.unsynced.pop(ino, None)

    def _victim(self, real: str) -> int | None:
        """The inode that loses its last name if `real` goes, if any."""
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            return None
        return st.st_ino if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1 else None

    # -- the operations

    def init(self, path):
        os.write(1, b"ready\n")

    def destroy(self, path):
        pass

    def getattr(self, path, fi=None):
        fd = self._fd(fi)
        st = os.fstat(fd) if fd in self.handles else os.lstat(self._real(path))
        attrs = {k: getattr(st, k) for k in ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid",
                                             "st_gid", "st_rdev", "st_size", "st_blksize",
                                             "st_blocks")}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        f = self.unsynced.get(st.st_ino) if stat.S_ISREG(st.st_mode) else None
        if f is not None:
            attrs["st_size"] = f.size
            attrs["st_blocks"] = max(st.st_blocks, (f.size + 511) // 512)
            attrs["st_mtime"] = attrs["st_ctime"] = max(st.st_mtime_ns, f.mtime_ns)
        return attrs

    def access(self, path, amode):
        if not os.access(self._real(path), amode):
            raise OSError(errno.EACCES, path)

    def readlink(self, path):
        return os.readlink(self._real(path))

    def opendir(self, path):
        return 0

    def readdir(self, path, fh):
        out: list = [".", ".."]
        with os.scandir(self._real(path)) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                out.append((entry.name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
        return out

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        if path is None:
            return 0
        fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def statfs(self, path):
        sv = os.statvfs(self._real(path))
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                            "f_bavail", "f_files", "f_ffree", "f_favail",
                                            "f_flag", "f_namemax")}

    def mknod(self, path, mode, dev):
        os.mknod(self._real(path), mode, dev)

    def mkdir(self, path, mode):
        os.mkdir(self._real(path), mode)

    def rmdir(self, path):
        os.rmdir(self._real(path))

    def symlink(self, target, source):
        os.symlink(source, self._real(target))

    def link(self, target, source):
        os.link(self._real(source), self._real(target), follow_symlinks=False)

    def unlink(self, path):
        real = self._real(path)
        victim = self._victim(real)
        os.unlink(real)
        if victim is not None:
            self._gone(victim)

    def rename(self, old, new):
        real_old, real_new = self._real(old), self._real(new)
        victim = self._victim(real_new)
        if victim is not None and victim == os.lstat(real_old).st_ino:
            victim = None        # a rename onto itself (a hard link) removes nothing
        os.rename(real_old, real_new)
        if victim is not None:
            self._gone(victim)

    def chmod(self, path, mode):
        os.chmod(self._real(path), mode)

    def chown(self, path, uid, gid):
        os.lchown(self._real(path), uid, gid)

    def utimens(self, path, times=None):
        if times is None:
            os.utime(self._real(path), follow_symlinks=False)
        else:
            os.utime(self._real(path), ns=tuple(int(t) for t in times), follow_symlinks=False)

    def truncate(self, path, length, fi=None):
        fd = self._fd(fi)
        if fd in self.handles:
            os.ftruncate(fd, length)
            ino = self.handles[fd][0]
        else:
            real = self._real(path)
            os.truncate(real, length)
            ino = os.lstat(real).st_ino
        self._truncated(ino, length)

    def _open_backing(self, real: str, flags: int, create_mode: int | None, fi) -> int:
        if create_mode is not None:
            try:
                fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, create_mode)
                fresh = True
            except FileExistsError:
                fd = os.open(real, os.O_RDWR | os.O_CLOEXEC)
                fresh = False
        else:
            fd = os.open(real, os.O_RDWR | os.O_CLOEXEC)
            fresh = False
        ino = os.fstat(fd).st_ino
        if fresh:
            # A new inode may reuse a number whose file is long gone.
            self.unsynced.pop(ino, None)
            self.orphans.discard(ino)
        self.handles[fd] = (ino, flags)
        self.opens[ino] = self.opens.get(ino, 0) + 1
        if flags & os.O_TRUNC and not fresh:
            os.ftruncate(fd, 0)
            self._truncated(ino, 0)
        fi.fh = fd
        fi.direct_io = 0
        fi.keep_cache = 0
        return 0

    def open(self, path, fi):
        real = self._real(path)
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise OSError(errno.EOPNOTSUPP, "crashfs opens regular files only")
        return self._open_backing(real, fi.flags, None, fi)

    def create(self, path, mode, fi):
        return self._open_backing(self._real(path), fi.flags, stat.S_IMODE(mode), fi)

    def read(self, path, size, offset, fi):
        fd = fi.fh
        ino = self.handles[fd][0]
        f = self.unsynced.get(ino)
        if f is None:
            return os.pread(fd, size, offset)
        return self._read(f, fd, size, offset)

    def write(self, path, data, offset, fi):
        fd = fi.fh
        ino, flags = self.handles[fd]
        self._write(self._state(ino, fd), fd, data, offset)
        if flags & os.O_DSYNC:       # O_SYNC includes O_DSYNC
            self._sync(ino, fd, datasync=(flags & os.O_SYNC) != os.O_SYNC)
        return len(data)

    def fsync(self, path, datasync, fi):
        fd = fi.fh
        self._sync(self.handles[fd][0], fd, bool(datasync))

    def release(self, path, fi):
        fd = fi.fh
        ino, _ = self.handles.pop(fd)
        os.close(fd)
        left = self.opens[ino] - 1
        if left:
            self.opens[ino] = left
            return
        del self.opens[ino]
        if ino in self.orphans:
            self.orphans.discard(ino)
            self.unsynced.pop(ino, None)


def serve(backing: str, mountpoint: str, owner: int) -> None:
    """Mount and serve until killed (the process of `owner` dying kills it)."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise CrashFSError("prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != owner:
        raise CrashFSError("the process that started crashfs is gone")
    from fusepy import FUSE  # Debian's python3-fusepy (libfuse2)

    FUSE(CrashOps(backing), mountpoint, raw_fi=True, foreground=True,
         fsname=f"{FSNAME_PREFIX}{owner}", subtype="crashfs",
         big_writes=True, hard_remove=True, use_ino=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: crashfs.py BACKING_DIR MOUNT_POINT OWNER_PID")
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
