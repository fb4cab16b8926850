"""A site's LSST Butler: create or wipe the repository, register the data model, open it.

Registry (what exists) and datastore (where the bytes are) stay apart as in daf_butler: the
registry is SQLite in the repo directory by default or PostgreSQL when configured; the
datastore root is the site's storage (POSIX or S3), so workers can write there directly and
registration only records what they wrote.
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import IO, Any

from astropy.io import fits
from lsst.daf.butler import (
    Butler,
    CollectionType,
    Config,
    DatasetRef,
    DatasetType,
    FileDataset,
    FormatterV2,
)
from lsst.resources import ResourcePath

from drp_flows.datamodel import (
    CALIB_COLLECTION,
    DATASET_TYPES,
    DEFAULTS,
    RAW_RUN,
    REFCAT_RUN,
    SKYMAP_RUN,
)
from drp_flows.errors import InputError
from drp_flows.sites.config import SiteConfig
from drp_flows.sites.storage import ZIP_MEMBER, digest


class FitsFormatter(FormatterV2):
    """Read and write `astropy.io.fits.HDUList` (raws, calibs and images) through the Butler."""

    supported_extensions = frozenset({".fits"})
    default_extension = ".fits"
    can_read_from_local_file = True

    def read_from_local_file(self, path: str, component: str | None = None,
                             expected_size: int = -1) -> Any:
        with fits.open(path, memmap=False) as hdul:
            return fits.HDUList([h.copy() for h in hdul])

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        in_memory_dataset.writeto(uri.ospath, overwrite=True)


class HealSparseFormatter(FormatterV2):
    """Read and write `healsparse.HealSparseMap` (property maps) as HealSparse FITS files."""

    supported_extensions = frozenset({".hsp"})
    default_extension = ".hsp"
    can_read_from_local_file = True

    def read_from_local_file(self, path: str, component: str | None = None,
                             expected_size: int = -1) -> Any:
        import healsparse

        return healsparse.HealSparseMap.read(path)

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        in_memory_dataset.write(uri.ospath, clobber=True, format="fits")


FORMATTERS = {
    "FitsHDUList": f"{FitsFormatter.__module__}.{FitsFormatter.__qualname__}",
    "HealSparseMap": f"{HealSparseFormatter.__module__}.{HealSparseFormatter.__qualname__}",
    "ArrowAstropy": "lsst.daf.butler.formatters.parquet.ParquetFormatter",
    "StructuredDataDict": "lsst.daf.butler.formatters.yaml.YamlFormatter",
    "Plot": "lsst.daf.butler.formatters.matplotlib.MatplotlibFormatter",   # PNG, write-only
}

REPO_CONFIG = {
    "storageClasses": {"FitsHDUList": {"pytype": "astropy.io.fits.HDUList"}},
    "datastore": {"formatters": {"FitsHDUList": FORMATTERS["FitsHDUList"],
                                 "HealSparseMap": FORMATTERS["HealSparseMap"]}},
}


def formatter_for(storage_class: str) -> str:
    return FORMATTERS[storage_class]


def _registry_config(site: SiteConfig) -> dict:
    if not site.butler.registry:
        return {}
    cfg = {"db": site.butler.registry}
    if site.butler.registry.startswith("postgresql"):
        cfg["namespace"] = f"drp_{site.name}"   # one schema per site: sites may share a server
    return cfg


MARKER = "drp-site.json"    # written in the repo directory by create_repo: whose it is


def _marker(site: SiteConfig) -> dict:
    return {"site": site.name, "storage": site.storage, "registry": _registry_config(site)}


def _schema_exists(db: str, namespace: str) -> bool:
    import sqlalchemy

    engine = sqlalchemy.create_engine(db)
    try:
        with engine.connect() as conn:
            return sqlalchemy.inspect(conn).has_schema(namespace)
    finally:
        engine.dispose()


def check_wipeable(site: SiteConfig, force: bool = False) -> None:
    """Refuse to wipe what `drp setup` did not make for this site: a repo directory, datastore
    folder or registry schema that exists without our marker for the site (an unrelated
    folder a typo points at, another site's repository, a schema someone else uses)."""
    if force:
        return
    repo = Path(site.repo_dir)
    try:
        ours = json.loads((repo / MARKER).read_text()) == _marker(site)
    except (OSError, ValueError):
        ours = False
    if ours:
        return
    found = []
    if repo.is_dir() and any(repo.iterdir()):
        found.append(f"directory {repo}")
    datastore = site.store.join("repo")
    if site.store.path(datastore) != str(repo) and site.store.exists(datastore):
        found.append(f"datastore {datastore}")
    reg = _registry_config(site)
    if "namespace" in reg and _schema_exists(reg["db"], reg["namespace"]):
        found.append(f"registry schema {reg['namespace']}")
    if found:
        raise InputError(
            f"site {site.name}: {', '.join(found)} exist(s), but {repo / MARKER} does not say "
            f"`drp setup` made them for this site: nothing was deleted. Point the site "
            f"elsewhere, move them away, or run `drp setup --force` to wipe them")


def wipe_repo(site: SiteConfig, force: bool = False) -> None:
    """Remove a site's repository: registry, repo directory and datastore files, when
    check_wipeable allows."""
    check_wipeable(site, force)
    reg = _registry_config(site)
    if "namespace" in reg:
        import sqlalchemy

        engine = sqlalchemy.create_engine(reg["db"])
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{reg["namespace"]}" CASCADE'))
        engine.dispose()
    shutil.rmtree(site.repo_dir, ignore_errors=True)
    site.store.rm(site.store.join("repo"))


def create_repo(site: SiteConfig) -> Butler:
    """A new empty repository for a site with the data model registered."""
    repo = Path(site.repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    config = Config({**REPO_CONFIG, "datastore": {**REPO_CONFIG["datastore"],
                                                  "root": site.store.butler_uri("repo")}})
    if site.butler.registry:
        config["registry"] = _registry_config(site)
    Butler.makeRepo(str(repo), config=config, forceConfigRoot=False)   # keep our datastore root
    (repo / MARKER).write_text(json.dumps(_marker(site)))
    butler = Butler.from_config(str(repo), writeable=True)
    register_dataset_types(butler)
    return butler


def open_butler(site: SiteConfig, writeable: bool = False, **kwargs) -> Butler:
    if site.store.scheme == "s3":
        site.store.butler_uri()   # export the endpoint profile for lsst.resources
    return Butler.from_config(site.repo_dir, writeable=writeable, **kwargs)


def register_dataset_types(butler: Butler) -> None:
    for spec in DATASET_TYPES.values():
        butler.registry.registerDatasetType(DatasetType(
            spec.name, spec.dimensions, spec.storage_class, universe=butler.dimensions,
            isCalibration=spec.is_calibration))


def define_default_chain(butler: Butler) -> None:
    """`<instrument>/defaults`: raws, calibs, refcats and skymap, the inputs of every campaign."""
    butler.registry.registerCollection(DEFAULTS, CollectionType.CHAINED)
    butler.registry.setCollectionChain(DEFAULTS, [RAW_RUN, CALIB_COLLECTION, REFCAT_RUN, SKYMAP_RUN])


def ingest_recorded(butler: Butler, datasets: list[FileDataset],
                    files: dict[uuid.UUID, tuple[int, str]], transfer: str | None = None) -> None:
    """Ingest files and keep each one's size and sha256 (`files`: dataset ID -> both) in the
    datastore's records, whose checksum and size columns daf_butler fills only by re-reading
    every file (a request per file on S3). The planner hands them to the quanta, which check
    every input they read whole against them (engine/quanta.py read_input); the Butler's own
    `get` checks the size. Datasets already registered (skipped) get the new record: their
    file was written again, perhaps elsewhere (a new zip).

    Ingested in place, a dataset's path may name a file inside a zip, `<zip>#zip-path=<name>`:
    its record says so, daf_butler's form for a file read in place from a zip (what its
    ingest_zip writes, without the index file that needs inside the zip)."""
    datastore = butler._datastore                      # noqa: SLF001 (no public records API)
    root = str(datastore.root).rstrip("/") + "/"
    paths = {}    # in place: each record's path anew (a file written again may lie elsewhere)
    for dataset in datasets if transfer is None else ():
        archive, _, member = str(dataset.path).partition(ZIP_MEMBER)
        if not archive.startswith(root):
            raise ValueError(f"{archive} lies outside the datastore {root}")
        dataset.path, inside = archive, archive[len(root):]
        paths[dataset.refs[0].id] = inside + ZIP_MEMBER + member if member else inside
    with butler.transaction():
        butler.ingest(*datasets, transfer=transfer, skip_existing=True,
                      record_validation_info=transfer is not None)
        rows = [dict(row) | {"file_size": files[row["dataset_id"]][0],
                             "checksum": files[row["dataset_id"]][1],
                             "path": paths.get(row["dataset_id"], row["path"])}
                for row in datastore._table.fetch(dataset_id=list(files))]
        datastore._table.replace(*rows)


def ingest_copied(butler: Butler, datasets: list[FileDataset]) -> None:
    """Copy local files into the datastore (raws, calibrations, reference catalogs at setup),
    recording each one's size and sha256 as ingest_recorded does."""
    files = {}
    for dataset in datasets:
        with open(dataset.path, "rb") as f:
            files[dataset.refs[0].id] = digest(f)
    ingest_recorded(butler, datasets, files, transfer="copy")


def open_dataset_file(butler: Butler, ref: DatasetRef) -> IO[bytes]:
    """A dataset's file for reading through lsst.resources, whose `open` would give the whole
    zip for a file inside one (`<zip>#zip-path=<name>`): such a file is read from it whole."""
    uri = butler.getURI(ref)
    if not uri.fragment.startswith("zip-path="):
        return uri.open("rb")
    with uri.replace(fragment="").open("rb") as f, zipfile.ZipFile(f) as z:
        return io.BytesIO(z.read(uri.fragment.removeprefix("zip-path=")))
