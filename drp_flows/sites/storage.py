"""Where a site's bytes live: fsspec filesystems for file:// and s3://, and checksums.

A `Storage` is small and picklable so quanta carry it to the workers; it holds no credentials.
S3 credentials come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or
the standard AWS profile files on whichever machine opens the filesystem. Each S3 site may have
its own endpoint, so for the Butler (lsst.resources) the site's bucket is addressed through a
named S3 profile (`s3://<profile>@bucket/...`, endpoint and keys in the process's environment
variable LSST_RESOURCES_S3_PROFILE_<profile>, never in a file).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import uuid
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO
from urllib.parse import quote, urlsplit

import fsspec

from drp_flows.errors import InputError

CHUNK = 8 * 2**20
ZIP_MEMBER = "#zip-path="     # a file inside a zip, as daf_butler writes it: <zip URI>#zip-path=<name>
SMALL_FILE_BYTES = 4 * 2**20  # files below this are kept in zips (a cluster's outputs, a transfer's)
FLAT = "~"                    # '/' in a file's name inside a zip (never in our paths)


@dataclass(frozen=True)
class Storage:
    """A site's storage root (`file:///...` or `s3://bucket/prefix`) and non-secret options."""

    root: str
    options: dict = field(default_factory=dict, hash=False, compare=False)
    profile: str = ""   # S3 profile name used for lsst.resources URIs

    def __post_init__(self):
        scheme = urlsplit(self.root).scheme
        if scheme not in _KINDS:
            raise ValueError(f"storage {self.root!r}: scheme {scheme!r} is not one of {sorted(_KINDS)}")

    @property
    def scheme(self) -> str:
        return urlsplit(self.root).scheme

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        return _KINDS[self.scheme].filesystem(self)

    def path(self, uri: str) -> str:
        """The filesystem path of a URI (fsspec wants paths without the scheme)."""
        return self.fs._strip_protocol(_strip_profile(uri))

    def join(self, *parts: str) -> str:
        """A URI below the root; a part that would climb out of it ('..') is refused, as
        names from users (campaigns, groups) become parts."""
        parts = [p.strip("/") for p in parts]
        if any(".." in p.split("/") for p in parts):
            raise InputError(f"path {'/'.join(parts)!r} leaves the storage root {self.root}")
        return "/".join([self.root.rstrip("/"), *parts])

    def open(self, uri: str, mode: str = "rb") -> IO:
        """A file of this storage; a file inside a zip (transfers store small files so) is
        read whole from it, the zip's directory and the member in a few ranged reads."""
        if ZIP_MEMBER in uri:
            if mode != "rb":
                raise ValueError(f"{uri}: a file inside a zip can only be read")
            return io.BytesIO(self.read_all([uri])[0])
        if "w" in mode and self.scheme == "file":
            self.fs.makedirs(os.path.dirname(self.path(uri)), exist_ok=True)
        return self.fs.open(self.path(uri), mode)

    def read_all(self, uris: list[str], missing_ok: bool = False) -> list[bytes | None]:
        """Several files' bytes, in order; those inside one zip from one opening of it.
        `missing_ok`: None for a file missing from its zip instead of FileNotFoundError."""
        archives: dict[str, list[int]] = {}
        out: list[bytes | None] = [None] * len(uris)
        for k, uri in enumerate(uris):
            if ZIP_MEMBER in uri:
                archives.setdefault(uri.partition(ZIP_MEMBER)[0], []).append(k)
            else:
                with self.open(uri, "rb") as f:
                    out[k] = f.read()
        for archive, ks in archives.items():
            with self.fs.open(self.path(archive), "rb") as f:
                # one file: ranged reads of the zip's directory and the file; several: the zip
                # whole, once (a request on S3), and the stored files sliced out of it
                whole = io.BytesIO(f.read()) if len(ks) > 1 else None
                with zipfile.ZipFile(whole or f) as z:
                    for k in ks:
                        try:
                            info = z.getinfo(uris[k].partition(ZIP_MEMBER)[2])
                        except KeyError:
                            if not missing_ok:
                                raise FileNotFoundError(f"{uris[k]}: not in {archive}") from None
                            continue
                        out[k] = _stored(whole.getbuffer(), info) if whole else z.read(info)
        return out

    def new_zip(self) -> str:
        """Where a new zip of the repository's files goes."""
        return self.join("repo", "zips", f"{uuid.uuid4().hex}.zip")

    def repo_path(self, uri: str) -> str:
        """Where a URI of this storage lies in the repository (or below the root)."""
        return uri.removeprefix(self.join("repo") + "/").removeprefix(self.root.rstrip("/") + "/")

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self.path(uri))

    def put_file(self, local_path: str, uri: str) -> None:
        with open(local_path, "rb") as src, self.open(uri, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)

    def rm(self, uri: str, recursive: bool = True) -> None:
        if self.exists(uri):
            self.fs.rm(self.path(uri), recursive=recursive)

    def butler_uri(self, *parts: str) -> str:
        """The URI lsst.resources understands for a path under this root."""
        return self.butler_uri_of(self.join(*parts))

    def butler_uri_of(self, uri: str) -> str:
        """A URI of this storage as lsst.resources understands it (profile-qualified on S3)."""
        if self.scheme == "s3":
            _KINDS["s3"].export_profile(self)
            return f"s3://{self.profile}@{_strip_profile(uri).removeprefix('s3://')}"
        return uri

    def from_butler_uri(self, uri) -> str:
        """A Butler URI back in this storage's form."""
        return _strip_profile(str(uri))


def _stored(raw: memoryview, info: zipfile.ZipInfo) -> bytes:
    """A stored (uncompressed) file's bytes sliced out of its whole zip, past its local header
    (30 bytes, then its name and extra field, whose lengths the header's last 4 bytes give):
    zipfile's per-file reads cost ~50 us a file, a third of a transfer of 30 kB files. Its
    CRC is not checked here; the sha256 of its record is, by whoever reads it."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{info.filename}: compressed in its zip (ours are stored)")
    start = info.header_offset
    name_length, extra_length = struct.unpack("<HH", raw[start + 26:start + 30])
    start += 30 + name_length + extra_length
    return bytes(raw[start:start + info.file_size])


def member_name(path: str) -> str:
    """A file's name inside a zip: its path in the repository, flat ('/' written FLAT):
    daf_butler reads a '/' in the zip-path fragment as part of the zip's own path, and warns
    of double encoding on a quoted one."""
    if FLAT in path:
        raise ValueError(f"{path}: a path with {FLAT!r} in it cannot be kept in a zip")
    return path.replace("/", FLAT)


def member_uri(archive: str, path: str) -> str:
    """The URI of the file at repository path `path` kept in the zip at `archive`."""
    return archive + ZIP_MEMBER + member_name(path)


def split_member(uri: str) -> tuple[str, str]:
    """(zip URI, repository path) of a file inside a zip; (uri, '') of any other file."""
    archive, _, name = uri.partition(ZIP_MEMBER)
    return archive, name.replace(FLAT, "/")


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip of the given files (stored, not compressed: our files are compressed already or
    are pixels, and a member is read in place)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def digest(f: IO[bytes]) -> tuple[int, str]:
    """Size and sha256 of what is left to read in a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def _strip_profile(uri: str) -> str:
    if uri.startswith("s3://") and "@" in uri.split("/", 3)[2]:
        return "s3://" + uri.split("@", 1)[1]
    return uri


class _FileKind:
    @staticmethod
    def filesystem(storage: Storage) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem("file", auto_mkdir=True)


class _S3Kind:
    @staticmethod
    def filesystem(storage: Storage) -> fsspec.AbstractFileSystem:
        import s3fs

        opts = dict(storage.options)
        endpoint = opts.pop("endpoint_url", None)
        client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
        # skip the instance cache: sites on different endpoints must never share a client
        return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, **opts)

    @staticmethod
    def export_profile(storage: Storage) -> None:
        """Tell lsst.resources this site's endpoint and the environment's credentials."""
        if not storage.profile:
            raise ValueError(f"storage {storage.root!r}: an S3 site needs a profile name")
        endpoint = storage.options.get("endpoint_url")
        if not endpoint:
            return  # the default AWS endpoint and credential chain
        import botocore.session

        # botocore's chain, as s3fs's: the environment, then the AWS profile files
        # (AWS_PROFILE, ~/.aws/credentials, AWS_SHARED_CREDENTIALS_FILE)
        found = botocore.session.Session().get_credentials()
        key, secret = (found.access_key, found.secret_key) if found else (None, None)
        if not (key and secret):
            raise RuntimeError(f"storage {storage.root!r}: no S3 keys: set AWS_ACCESS_KEY_ID "
                               "and AWS_SECRET_ACCESS_KEY in the environment, or a profile in "
                               "the AWS credentials file (AWS_PROFILE to choose one)")
        parts = urlsplit(endpoint)
        auth = f"{quote(key, safe='')}:{quote(secret, safe='')}@"
        os.environ[f"LSST_RESOURCES_S3_PROFILE_{storage.profile}"] = (
            f"{parts.scheme}://{auth}{parts.netloc}{parts.path}")


_KINDS = {"file": _FileKind, "s3": _S3Kind}
