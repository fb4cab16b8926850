"""Where a site's bytes live: fsspec filesystems for file:// and s3://, and checksums.

A `Storage` is small and picklable so quanta carry it to the workers; it holds no credentials.
S3 credentials come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) on
whichever machine opens the filesystem. Each S3 site may have its own endpoint, so for the
Butler (lsst.resources) the site's bucket is addressed through a named S3 profile
(`s3://<profile>@bucket/...`, endpoint in LSST_RESOURCES_S3_PROFILE_<profile>).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO
from urllib.parse import quote, urlsplit

import fsspec

from drp_flows.errors import InputError

CHUNK = 8 * 2**20


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
        if "w" in mode and self.scheme == "file":
            self.fs.makedirs(os.path.dirname(self.path(uri)), exist_ok=True)
        return self.fs.open(self.path(uri), mode)

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
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not (key and secret):
            raise RuntimeError(f"storage {storage.root!r}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY in the environment")
        parts = urlsplit(endpoint)
        auth = f"{quote(key, safe='')}:{quote(secret, safe='')}@"
        os.environ[f"LSST_RESOURCES_S3_PROFILE_{storage.profile}"] = (
            f"{parts.scheme}://{auth}{parts.netloc}{parts.path}")


_KINDS = {"file": _FileKind, "s3": _S3Kind}
