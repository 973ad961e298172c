"""Apply an OCI layer tar to a directory tree: whiteouts, opaque dirs, and nothing outside.

OCI layer semantics (image-spec ``layer.md``): ``D/.wh.NAME`` deletes ``D/NAME`` of the lower
layers; ``D/.wh..wh..opq`` hides every lower entry of ``D``. Both refer to the lower layers
only, so a layer is applied in two passes: :func:`scan_layer` collects the whiteouts, which
are applied first, then :class:`TreeWriter` extracts the entries.

Removals (whiteouts, an opaque directory's entries, an entry a later one replaces) are renames
into a graveyard directory that :meth:`TreeWriter.finish` deletes after the layer's last
create. Why: ext4 without a journal reuses a freed inode at once but skips one freed in an
earlier second of the wall clock (``recently_deleted`` in the kernel's ``fs/ext4/ialloc.c``),
so whether a create reused a removed entry's inode depended on whether the clock ticked
between the two, and the same layer converted twice gave two digests. Freed after the last
create, no inode is reused within the layer, and the builder zeroes freed inodes when it
commits, so the next layer's creates see them as never used.

Safety: every path is resolved one component at a time with ``O_NOFOLLOW`` directory file
descriptors from the root, so no entry can be written through a symlink or outside the root;
members with ``..`` components, hard links to outside the root, or a symlink as a parent
directory are rejected with :class:`UnsafeArchiveError`. Owners, modes, timestamps, xattrs
(PAX ``SCHILY.xattr.*``), hard links, symlinks, FIFOs and device nodes are reproduced.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import shutil
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tidal.blockdev.ext4_pins import BUILD_TIME_NS
from tidal.errors import ArchiveFormatError, UnsafeArchiveError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_COPY_BUFFER = 1 << 20
_DIR_CACHE_SIZE = 256
"""Open directory fds kept between entries: tars list siblings together, so a small cache
saves nearly every path walk."""
_XATTR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
GRAVEYARD = ".tidal-removed"
"""The root-level directory removed entries wait in until the layer's end (a suffix is added
if the root or the layer has an entry of that name)."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def free_name(base: str, taken: Collection[str]) -> str:
    """``base``, or ``base-1``, ``base-2``, ... : the first that is not in ``taken`` (a
    root-level name the converter uses for a while must not be one a tree has)."""
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def normalize(name: str, *, layer: str = "layer") -> str:
    """A member name relative to the root (``""`` is the root); ``..`` is refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{layer}: entry {name!r} has a '..' component and would escape the root; "
            "the archive is unsafe and was not applied"
        )
    return "/".join(parts)


@dataclass(frozen=True)
class LayerScan:
    """What a first pass over a layer tar found."""

    whiteouts: tuple[str, ...]
    """Paths (relative to the root) deleted by ``.wh.NAME`` entries."""
    opaque_dirs: tuple[str, ...]
    """Directories whose lower contents ``.wh..wh..opq`` hides."""
    entries: int
    content_bytes: int
    """Sum of regular file sizes rounded up to 4 KiB blocks (for sizing the disk)."""
    file_bytes: int = 0
    """Exact sum of regular file sizes (for progress, and the content bound)."""
    largest_file_bytes: int = 0
    top_level: frozenset[str] = frozenset()
    """First path components of the layer's entries (the graveyard's name avoids them)."""


def scan_layer(members: Iterable[tarfile.TarInfo], *, layer: str = "layer") -> LayerScan:
    """First pass: validate every name and collect whiteouts."""
    whiteouts: list[str] = []
    opaque: list[str] = []
    entries = 0
    content = 0
    exact = 0
    largest = 0
    top: set[str] = set()
    for m in members:
        path = normalize(m.name, layer=layer)
        top.add(path.partition("/")[0])
        if m.islnk():
            normalize(m.linkname, layer=layer)
        parent, _, base = path.rpartition("/")
        if base == OPAQUE_MARKER:
            opaque.append(parent)
        elif base.startswith(WHITEOUT_PREFIX):
            whiteouts.append(f"{parent}/{base[len(WHITEOUT_PREFIX) :]}".lstrip("/"))
        else:
            entries += 1
            if m.isfile():
                content += -(-m.size // 4096) * 4096
                exact += m.size
                largest = max(largest, m.size)
    return LayerScan(
        tuple(whiteouts), tuple(opaque), entries, content, exact, largest, frozenset(top)
    )


@dataclass
class ApplyStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    symlinks: int = 0
    specials: int = 0
    removed: int = 0
    bytes_written: int = 0
    skipped: list[str] = field(default_factory=list)


class TreeWriter:
    """Writes tar members below ``root`` without ever following a symlink."""

    def __init__(
        self,
        root: Path,
        *,
        layer: str = "layer",
        on_bytes: Callable[[int], None] | None = None,
        reserved: Collection[str] = (),
    ) -> None:
        """``reserved``: root-level names the layer will create (:attr:`LayerScan.top_level`),
        which the graveyard must not take."""
        self.root = root
        self.layer = layer
        self._on_bytes = on_bytes
        self._reserved = reserved
        self._grave: tuple[str, int] | None = None
        """(name, fd) of the graveyard once a removal made it (see the module's docstring)."""
        self._buried = 0
        self.stats = ApplyStats()
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: OrderedDict[str, int] = OrderedDict()
        self._dir_times: dict[str, int] = {}
        self._prior_times: dict[str, int] = {}
        """Directories whose entries this layer changed but whose tar entry (if any) has not
        given a time: restored at :meth:`finish` to what they had before (creating or
        removing a child stamps the kernel's clock on the directory, which would make the
        layer's bytes differ between two conversions)."""

    def _note_dir(self, key: str, fd: int) -> None:
        """Remember directory ``key``'s times before this layer first changes its entries."""
        if key not in self._prior_times:
            self._prior_times[key] = os.fstat(fd).st_mtime_ns

    def close(self) -> None:
        self._forget_all()
        if self._grave is not None:
            os.close(self._grave[1])
            self._grave = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- path walking -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _parent(self, path: str, *, create: bool) -> Iterator[tuple[int, str]]:
        """Yield (fd of the parent directory, last component) for ``path``.

        The fd belongs to the writer's cache: callers must not close it.
        """
        parts = path.split("/")
        yield self._dir_fd(parts[:-1], path, create=create), parts[-1]

    def _dir_fd(self, parts: list[str], path: str, *, create: bool) -> int:
        """An ``O_NOFOLLOW`` fd of directory ``parts``, walked from the root, cached."""
        if not parts:
            return self._root_fd
        key = "/".join(parts)
        fd = self._dirs.get(key)
        if fd is not None:
            self._dirs.move_to_end(key)
            return fd
        parent = self._dir_fd(parts[:-1], path, create=create)
        flags = _DIR_FLAGS
        try:
            try:
                fd = os.open(parts[-1], flags, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
                self._note_dir("/".join(parts[:-1]), parent)
                os.mkdir(parts[-1], 0o755, dir_fd=parent)
                fd = os.open(parts[-1], flags, dir_fd=parent)
                self._prior_times[key] = BUILD_TIME_NS  # no tar entry has timed it yet
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchiveError(
                    f"{self.layer}: entry {path!r} lies below {key!r}, which is not a "
                    "directory (a symlink would be followed out of the tree); "
                    "the archive is unsafe and was not applied"
                ) from None
            raise
        self._dirs[key] = fd
        return fd

    def _forget(self, path: str) -> None:
        """Drop cached fds of ``path`` and everything below it (it was removed)."""
        for key in [k for k in self._dirs if k == path or k.startswith(path + "/")]:
            os.close(self._dirs.pop(key))

    def _trim(self) -> None:
        """Bound the fd cache; only between entries, never while a caller holds an fd."""
        while len(self._dirs) > _DIR_CACHE_SIZE:
            _, fd = self._dirs.popitem(last=False)
            os.close(fd)

    def _forget_all(self) -> None:
        while self._dirs:
            os.close(self._dirs.popitem()[1])

    def _lstat(self, fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove_entry(self, fd: int, name: str, st: os.stat_result, path: str) -> None:
        """Move ``path`` into the graveyard (a rename frees nothing: see the module's
        docstring); :meth:`finish` deletes it."""
        self._note_dir(path.rpartition("/")[0], fd)
        if stat.S_ISDIR(st.st_mode):
            self._forget(path)
        os.rename(name, str(self._buried), src_dir_fd=fd, dst_dir_fd=self._graveyard())
        self._buried += 1
        self.stats.removed += 1

    def _graveyard(self) -> int:
        if self._grave is None:
            name = free_name(GRAVEYARD, set(os.listdir(self._root_fd)) | set(self._reserved))
            self._note_dir("", self._root_fd)
            os.mkdir(name, 0o700, dir_fd=self._root_fd)
            self._grave = (name, os.open(name, _DIR_FLAGS, dir_fd=self._root_fd))
        return self._grave[1]

    def _bury_graveyard(self) -> None:
        """Delete the removed entries: after the layer's last create, so none is reused."""
        if self._grave is not None:
            name, fd = self._grave
            os.close(fd)
            self._grave = None
            shutil.rmtree(name, dir_fd=self._root_fd)

    # --- whiteouts --------------------------------------------------------------------------

    def apply_whiteouts(self, scan: LayerScan) -> None:
        for d in scan.opaque_dirs:
            self._clear_dir(d)
        for path in scan.whiteouts:
            try:
                with self._parent(path, create=False) as (fd, name):
                    st = self._lstat(fd, name)
                    if st is not None:
                        self._remove_entry(fd, name, st, path)
            except (FileNotFoundError, NotADirectoryError, UnsafeArchiveError):
                continue  # absent, or below a non-directory: there is no lower entry to hide

    def _clear_dir(self, path: str) -> None:
        if not path:
            fd = os.dup(self._root_fd)
        else:
            try:
                with self._parent(path, create=False) as (pfd, name):
                    fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            except (FileNotFoundError, NotADirectoryError, UnsafeArchiveError):
                return  # absent, or below a non-directory: no lower entries to hide
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return  # the directory itself is a symlink: nothing of ours to clear
                raise
        try:
            for entry in os.listdir(fd):
                if path == "" and entry == "lost+found":
                    continue  # belongs to the filesystem, not to any layer
                if path == "" and self._grave is not None and entry == self._grave[0]:
                    continue
                st = self._lstat(fd, entry)
                if st is not None:
                    self._remove_entry(fd, entry, st, f"{path}/{entry}".lstrip("/"))
        finally:
            os.close(fd)

    # --- extraction -------------------------------------------------------------------------

    def add(self, member: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        """Create ``member`` (whiteouts must have been filtered out by the caller)."""
        path = normalize(member.name, layer=self.layer)
        self._trim()
        if path == "":
            self._set_meta_fd(self._root_fd, member)
            self._dir_times[""] = int(member.mtime * 1e9)
            return
        if self._grave is not None and path.partition("/")[0] == self._grave[0]:
            raise ArchiveFormatError(
                f"{self.layer}: entry {member.name!r} lies in {self._grave[0]!r}, the name the "
                "converter keeps removed entries under; pass the layer's top-level names as "
                "reserved="
            )
        with self._parent(path, create=True) as (fd, name):
            self._note_dir(path.rpartition("/")[0], fd)
            existing = self._lstat(fd, name)
            if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
                self._remove_entry(fd, name, existing, path)
                self.stats.removed -= 1  # a replacement, not a deletion
                for stale in [p for p in self._dir_times if p == path or p.startswith(path + "/")]:
                    del self._dir_times[stale]  # gone with the directory it timed
            if member.isdir():
                if existing is None or not stat.S_ISDIR(existing.st_mode):
                    os.mkdir(name, 0o700, dir_fd=fd)
                dfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._set_meta_fd(dfd, member)
                finally:
                    os.close(dfd)
                self._dir_times[path] = int(member.mtime * 1e9)
                self.stats.dirs += 1
            elif member.isfile():
                self._write_file(fd, name, member, data)
            elif member.issym():
                os.symlink(member.linkname, name, dir_fd=fd)
                os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
                self._set_xattrs(f"/proc/self/fd/{fd}/{name}", member)
                ns = int(member.mtime * 1e9)
                os.utime(name, ns=(ns, ns), dir_fd=fd, follow_symlinks=False)
                self.stats.symlinks += 1
            elif member.islnk():
                self._link(fd, name, member)
            elif member.ischr() or member.isblk() or member.isfifo():
                kind = (
                    stat.S_IFCHR
                    if member.ischr()
                    else stat.S_IFBLK
                    if member.isblk()
                    else stat.S_IFIFO
                )
                dev = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
                os.mknod(name, kind | 0o600, dev, dir_fd=fd)
                os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
                os.chmod(name, member.mode & 0o7777, dir_fd=fd)
                self._set_xattrs(f"/proc/self/fd/{fd}/{name}", member)
                ns = int(member.mtime * 1e9)
                os.utime(name, ns=(ns, ns), dir_fd=fd, follow_symlinks=False)
                self.stats.specials += 1
            else:
                self.stats.skipped.append(path)

    def _write_file(
        self, fd: int, name: str, member: tarfile.TarInfo, data: IO[bytes] | None
    ) -> None:
        ffd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=fd,
        )
        with os.fdopen(ffd, "wb", buffering=0, closefd=True) as out:
            if data is not None:
                copied = 0
                while block := data.read(_COPY_BUFFER):
                    out.write(block)
                    copied += len(block)
                    if self._on_bytes is not None:
                        self._on_bytes(len(block))
                self.stats.bytes_written += copied
            self._set_meta_fd(out.fileno(), member)
        self.stats.files += 1

    def _link(self, fd: int, name: str, member: tarfile.TarInfo) -> None:
        src = normalize(member.linkname, layer=self.layer)
        if not src:
            raise UnsafeArchiveError(f"{self.layer}: hard link {member.name!r} points at the root")
        try:
            with self._parent(src, create=False) as (sfd, sname):
                st = self._lstat(sfd, sname)
                if st is None or stat.S_ISDIR(st.st_mode):
                    raise ArchiveFormatError(
                        f"{self.layer}: hard link {member.name!r} -> {member.linkname!r}: "
                        "the target is missing or a directory"
                    )
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            raise ArchiveFormatError(
                f"{self.layer}: hard link {member.name!r} -> {member.linkname!r}: target missing"
            ) from None
        self.stats.links += 1

    def _set_meta_fd(self, fd: int, member: tarfile.TarInfo) -> None:
        # order matters: chown clears setuid bits and file capabilities
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        self._set_xattrs(fd, member)
        ns = int(member.mtime * 1e9)
        os.utime(fd, ns=(ns, ns))

    def _set_xattrs(self, target: int | str, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            for prefix in _XATTR_PREFIXES:
                if key.startswith(prefix):
                    attr = key[len(prefix) :]
                    raw = value.encode("utf-8", "surrogateescape")
                    if prefix.startswith("LIBARCHIVE"):
                        raw = base64.b64decode(raw)
                    try:
                        if isinstance(target, int):
                            os.setxattr(target, attr, raw)
                        else:
                            os.setxattr(target, attr, raw, follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EPERM):
                            raise
                        self.stats.skipped.append(f"{member.name} xattr {attr}: {exc.strerror}")

    def finish(self) -> None:
        """The graveyard goes, then directory mtimes last: creating their children changed
        them. A directory the tar does not time gets back the time it had before the layer
        (see ``_prior_times``)."""
        self._bury_graveyard()
        times = {**self._prior_times, **self._dir_times}
        for path, ns in sorted(times.items(), key=lambda kv: -kv[0].count("/")):
            if not path:
                os.utime(self._root_fd, ns=(ns, ns))
                continue
            with (
                contextlib.suppress(FileNotFoundError, UnsafeArchiveError),
                self._parent(path, create=False) as (fd, name),
            ):
                os.utime(name, ns=(ns, ns), dir_fd=fd, follow_symlinks=False)


def is_whiteout(member: tarfile.TarInfo) -> bool:
    return member.name.rstrip("/").rpartition("/")[2].startswith(WHITEOUT_PREFIX)


def extract(tf: tarfile.TarFile, writer: TreeWriter) -> None:
    """Second pass: every non-whiteout member of a streaming tar, in order."""
    for member in tf:
        if is_whiteout(member):
            continue
        data = tf.extractfile(member) if member.isfile() else None
        try:
            writer.add(member, data)
        finally:
            if data is not None:
                data.close()
    writer.finish()
