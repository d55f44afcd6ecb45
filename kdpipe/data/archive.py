"""Safe, read-only listing of image files in a folder or a tar archive, without extracting anything.

An archive is listed completely and every member is checked before a single image is decoded: absolute paths,
``..`` components, links and device/FIFO members are refused even though nothing is ever written to disk, because
an archive that carries them was not made for this and its other contents cannot be trusted either. A folder gets
the same rules where they apply: symlinks may point only inside the root, special files are refused. Hidden
entries (``.DS_Store``, macOS ``._x.jpg`` resource forks, ``__MACOSX/``) and non-image files are skipped.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kdpipe.data import cache
from kdpipe.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# tarfile raises these (and OSError) for truncated or non-tar input; gzip adds zlib.error and EOFError.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ImageEntry:
    """One image file: its normalised relative path, a display name for errors and how to read it."""

    parts: tuple[str, ...]
    name: str
    handle: tarfile.TarInfo | Path = field(repr=False)
    """TarInfo for an archive member, the absolute Path for a file in a folder."""


@dataclass
class Listing:
    """Everything a source holds, after the safety checks: image files, every folder, the top-level names."""

    images: list[ImageEntry]
    dirs: set[tuple[str, ...]]
    top_level: list[str]


def _member(entry: ImageEntry) -> tarfile.TarInfo:
    if not isinstance(entry.handle, tarfile.TarInfo):
        raise TypeError(f"{entry.name} is not an archive member")
    return entry.handle


def is_hidden(name: str) -> bool:
    """Dotfiles and macOS archive debris, which sit beside real images and are never images themselves."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def is_tar_path(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


class TarSource:
    """Images inside a ``.tar`` / ``.tar.gz`` / ``.tgz``, read member by member with ``tarfile``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None

    def identity(self) -> str:
        return cache.file_identity(self.path)

    def _open(self) -> tarfile.TarFile:
        if self._tar is None:
            try:
                # Kept open between scan() and read() so the members need not be parsed twice; see close().
                self._tar = tarfile.open(self.path, "r:*")  # noqa: SIM115
            except _TAR_ERRORS as exc:
                raise DataError(f"data.root {self.path} is not a readable tar archive: {exc}") from exc
        return self._tar

    def _refuse(self, member: tarfile.TarInfo, why: str) -> DataError:
        return DataError(
            f"archive {self.path} has an unsafe member {member.name!r}: {why}",
            hint="kdpipe only reads archives of plain files and folders; rebuild it from regular files "
            "(e.g. tar czf data.tar.gz --dereference train test)",
        )

    def _check(self, member: tarfile.TarInfo) -> tuple[str, ...]:
        """Refuse unsafe members; return the normalised path components (``.`` and empty parts dropped)."""
        name = member.name
        if name.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(name):
            raise self._refuse(member, "absolute path")
        parts = tuple(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in (".", ""))
        if ".." in parts:
            raise self._refuse(member, "'..' path component")
        if member.issym() or member.islnk():
            raise self._refuse(member, f"link to {member.linkname!r}")
        if member.ischr() or member.isblk() or member.isfifo():
            raise self._refuse(member, "device or FIFO")
        if not (member.isreg() or member.isdir()):
            raise self._refuse(member, f"unsupported member type {member.type!r}")
        return parts

    def scan(self) -> Listing:
        tar = self._open()
        try:
            members = tar.getmembers()
        except _TAR_ERRORS as exc:
            raise DataError(f"archive {self.path} is truncated or corrupt: {exc}") from exc
        images: dict[tuple[str, ...], ImageEntry] = {}
        dirs: set[tuple[str, ...]] = set()
        top: set[str] = set()
        for member in members:
            parts = self._check(member)
            if not parts or any(is_hidden(p) for p in parts):
                continue
            top.add(parts[0])
            folder = parts if member.isdir() else parts[:-1]
            dirs.update(folder[:i] for i in range(1, len(folder) + 1))
            if member.isreg() and is_image_name(parts[-1]):
                # A name stored twice: the later member wins, as it would on extraction.
                images[parts] = ImageEntry(parts, f"{self.path}:{member.name}", member)
        return Listing(list(images.values()), dirs, sorted(top))

    def read(self, entries: list[ImageEntry]) -> Iterator[tuple[ImageEntry, bytes]]:
        """Yield ``(entry, bytes)`` in archive order, so a compressed stream is decompressed once, front to back."""
        tar = self._open()
        members = [(_member(entry), entry) for entry in entries]
        for member, entry in sorted(members, key=lambda item: item[0].offset_data):
            try:
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
            except _TAR_ERRORS as exc:
                raise DataError(f"cannot read {entry.name}: {exc}", hint="the archive may be truncated") from exc
            yield entry, data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


class FolderSource:
    """Images under a folder; symlinks are followed only when they resolve inside the folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._real_root = Path(os.path.realpath(path))
        self._listing: Listing | None = None
        self._stats: list[tuple[str, int, int]] = []

    def identity(self) -> str:
        self.scan()
        return cache.listing_identity(self.path, self._stats)

    def scan(self) -> Listing:
        if self._listing is None:
            images: list[ImageEntry] = []
            dirs: set[tuple[str, ...]] = set()
            self._walk(self._real_root, (), images, dirs, {self._real_root})
            top = sorted({e.name for e in os.scandir(self._real_root) if not is_hidden(e.name)})
            self._listing = Listing(images, dirs, top)
        return self._listing

    def _walk(
        self,
        folder: Path,
        rel: tuple[str, ...],
        images: list[ImageEntry],
        dirs: set[tuple[str, ...]],
        visited: set[Path],
    ) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"cannot list folder {folder}: {exc}") from exc
        for entry in entries:
            if is_hidden(entry.name):
                continue
            parts = (*rel, entry.name)
            path = Path(entry.path)
            if entry.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(self._real_root):
                    raise DataError(
                        f"{path} is a symlink to {target}, outside data.root {self.path}",
                        hint="copy the files into data.root, or point data.root at the real folder",
                    )
                if not target.exists():
                    raise DataError(f"{path} is a broken symlink (to {target})", hint="remove or fix the link")
                is_dir, is_file = target.is_dir(), target.is_file()
            else:
                target = path
                is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)
            if is_dir:
                if target not in visited:  # a link back up the tree would otherwise recurse forever
                    dirs.add(parts)
                    self._walk(target, parts, images, dirs, visited | {target})
            elif not is_file:
                raise DataError(
                    f"{path} is a device, FIFO or socket, not a regular file",
                    hint="keep only images and folders under data.root",
                )
            elif is_image_name(entry.name):
                st = target.stat()
                images.append(ImageEntry(parts, str(path), target))
                self._stats.append(("/".join(parts), st.st_size, st.st_mtime_ns))

    def read(self, entries: list[ImageEntry]) -> Iterator[tuple[ImageEntry, bytes]]:
        for entry in entries:
            if not isinstance(entry.handle, Path):
                raise TypeError(f"{entry.name} is not a file in a folder")
            try:
                data = entry.handle.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read image {entry.name}: {exc}") from exc
            yield entry, data

    def close(self) -> None:
        pass


ImageSource = TarSource | FolderSource


def open_image_source(path: Path) -> ImageSource:
    """A reader for ``path``: a folder or a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive; DataError for anything else."""
    if not path.exists():
        raise DataError(
            f"data.root {path} does not exist",
            hint="point data.root at a folder or .tar/.tar.gz with train/<class>/* and test/<class>/*",
        )
    if path.is_dir():
        return FolderSource(path)
    if is_tar_path(path):
        return TarSource(path)
    raise DataError(
        f"data.root {path} is neither a folder nor a {'/'.join(TAR_SUFFIXES)} archive",
        hint="for kind imagefolder, point data.root at a folder or a tar archive of train/<class>/* images",
    )
