"""Crash-safe file publishing (temp name, fsync, rename) and sha256 hashing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

TMP_SUFFIX = ".tmp"
# errno values meaning "this filesystem cannot fsync a directory", not "the disk failed".
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM}
_HASH_CHUNK = 8 << 20


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry table so a rename inside it survives a crash."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _NO_DIR_FSYNC:  # some filesystems do not allow opening directories
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:  # a real I/O error means the rename may not be durable
            raise
    finally:
        os.close(fd)


def tmp_path_for(path: str | os.PathLike) -> Path:
    """The temporary name a file is written under before it is published."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Make a fully written temp file visible under its final name: fsync, rename, fsync the directory."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)  # one reused buffer: no page faults on fresh memory per chunk
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def sha256_and_fsync(path: str | os.PathLike) -> str:
    """Hex sha256 of a closed file, computed while another thread fsyncs it (the two overlap)."""
    syncer = threading.Thread(target=fsync_file, args=(path,), name="fsync")
    syncer.start()
    try:
        return sha256_file(path)
    finally:
        syncer.join()


class TailHasher:
    """sha256 of a file that another writer only appends to, computed on a background thread.

    The writer calls advance(size) after each append and finish(size) after closing; the thread reads the
    new bytes back from the page cache and hashes them while the writer goes on (hashlib and pread release
    the GIL), so hashing a shard costs no extra pass over the file at the end. Only for append-only
    formats (Arrow IPC); LMDB and HDF5 rewrite earlier pages and are hashed after closing.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._hash = hashlib.sha256()
        self._view = memoryview(bytearray(_HASH_CHUNK))
        self._done = 0
        self._target = 0
        self._closing = False
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="shard-hasher", daemon=True)
        self._thread.start()

    def advance(self, size: int) -> None:
        """Bytes [0, size) of the file are written."""
        with self._cv:
            self._target = size
            self._cv.notify()

    def finish(self, size: int) -> str:
        """The file is complete at `size` bytes; return its hex sha256."""
        with self._cv:
            self._target = size
            self._closing = True
            self._cv.notify()
        self._thread.join()
        os.close(self._fd)
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Stop hashing (the file is being thrown away)."""
        with self._cv:
            self._closing = True
            self._target = self._done
            self._cv.notify()
        self._thread.join()
        try:
            os.close(self._fd)
        except OSError:
            pass

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while self._done >= self._target and not self._closing:
                        self._cv.wait()
                    target, closing = self._target, self._closing
                while self._done < target:
                    want = min(_HASH_CHUNK, target - self._done)
                    n = os.preadv(self._fd, [self._view[:want]], self._done)
                    if not n:
                        raise OSError(f"{self._path}: file ended at {self._done} bytes, expected {target}")
                    self._hash.update(self._view[:n])
                    self._done += n
                if closing:
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in finish()
            self._error = exc
