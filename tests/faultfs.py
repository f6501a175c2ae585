#!/usr/bin/env python3
"""A pass-through FUSE file system that fails chosen writes on demand, for tests/disk_faults.rs.

    faultfs.py BACKING MOUNTPOINT CONTROL

Every operation is passed to BACKING. While the JSON file CONTROL holds
{"errno": "EIO", "paths": ["outbox/", "state/"]}, every operation that would change a file
whose path (relative to the mount) starts with one of the prefixes (an empty prefix: every
file) fails with that errno, the way a failing SD card (EIO), a full disk (ENOSPC) or a file
system the kernel remounted read-only after an error (EROFS) refuse them:

- ENOSPC: write, create, mkdir, truncate (growing), rename and link fail; open, fsync, unlink
  and rmdir work (deleting frees space; a full disk still syncs what it holds);
- EIO: write, create, mkdir, truncate, rename, link and fsync fail; open and unlink work;
- EROFS: everything that changes the file system fails, opening a file for writing too.

Each refusal is counted in CONTROL + ".hits" (one line per refusal: errno and path), so a test
knows the fault was met. The test can make real ENOSPC with a small tmpfs; EIO and a read-only
remount need a device that fails, which device-mapper's error target would give but a
container usually lacks; FUSE is available wherever the tests run as root.
"""

import errno
import json
import os
import sys
import threading

try:
    from fusepy import FUSE, FuseOSError, Operations
except ImportError:  # the upstream module name
    from fuse import FUSE, FuseOSError, Operations

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class FaultFS(Operations):
    def __init__(self, root, control):
        self.root = os.path.realpath(root)
        self.control = control
        self.mutex = threading.Lock()
        self.stamp = None
        self.rule = (0, ())

    # The current fault, re-read when CONTROL changes (a stat per operation).
    def _current(self):
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            return 0, ()
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        with self.mutex:
            if stamp != self.stamp:
                try:
                    with open(self.control) as f:
                        text = f.read()
                    spec = json.loads(text) if text.strip() else {}
                except (OSError, ValueError):
                    spec = {}
                code = getattr(errno, spec.get("errno") or "", 0) if spec.get("errno") else 0
                self.rule = (code, tuple(spec.get("paths", [""])))
                self.stamp = stamp
            return self.rule

    def _fail(self, path, op):
        code, prefixes = self._current()
        if not code:
            return
        rel = path.lstrip("/")
        if not any(rel.startswith(p) for p in prefixes):
            return
        exempt = {
            errno.ENOSPC: {"open", "fsync", "unlink", "rmdir", "shrink", "access"},
            errno.EIO: {"open", "unlink", "rmdir", "shrink", "access"},
        }.get(code, set())
        if op in exempt:
            return
        with self.mutex:
            with open(self.control + ".hits", "a") as f:
                f.write(f"{errno.errorcode[code]} {op} {rel}\n")
        raise FuseOSError(code)

    def _full(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    # Reading: passed through.
    def access(self, path, mode):
        # A read-only mount answers access(W_OK) with EROFS, without trying a write.
        if mode & os.W_OK:
            self._fail(path, "access")
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self._full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._full(path))

    def readlink(self, path):
        return os.readlink(self._full(path))

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def open(self, path, flags):
        if flags & WRITE_FLAGS:
            self._fail(path, "open")
        return os.open(self._full(path), flags)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        return os.close(fh)

    def flush(self, path, fh):
        return None

    # Changing: refused while the fault is on.
    def create(self, path, mode, fi=None):
        self._fail(path, "create")
        return os.open(self._full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def write(self, path, data, offset, fh):
        self._fail(path, "write")
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        grows = length > os.lstat(self._full(path)).st_size
        self._fail(path, "truncate" if grows else "shrink")
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)

    def fsync(self, path, datasync, fh):
        self._fail(path, "fsync")
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    def fsyncdir(self, path, datasync, fh):
        self._fail(path, "fsync")

    def mkdir(self, path, mode):
        self._fail(path, "mkdir")
        os.mkdir(self._full(path), mode)

    def rmdir(self, path):
        self._fail(path, "rmdir")
        os.rmdir(self._full(path))

    def unlink(self, path):
        self._fail(path, "unlink")
        os.unlink(self._full(path))

    def rename(self, old, new):
        self._fail(new, "rename")
        self._fail(old, "rename")
        os.rename(self._full(old), self._full(new))

    def link(self, target, name):
        self._fail(target, "link")
        os.link(self._full(name), self._full(target))

    def symlink(self, name, target):
        self._fail(name, "symlink")
        os.symlink(target, self._full(name))

    def chmod(self, path, mode):
        self._fail(path, "chmod")
        os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        self._fail(path, "chown")
        os.chown(self._full(path), uid, gid)

    def utimens(self, path, times=None):
        self._fail(path, "utimens")
        os.utime(self._full(path), times)


if __name__ == "__main__":
    backing, mountpoint, control = sys.argv[1:4]
    FUSE(FaultFS(backing, control), mountpoint, foreground=True, nothreads=False, default_permissions=False)
