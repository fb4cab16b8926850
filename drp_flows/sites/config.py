"""Sites and the campaign-site file: loaded from YAML and validated.

A site is one or two Dask clusters, one storage root, one Butler repository and flags. Any
key of a cluster other than `kind` and `jobs` passes through to the dask-jobqueue class (or to
LocalCluster), so every option those accept works here unchanged.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from astropy.time import Time, TimeDelta
from dask.utils import parse_bytes
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from drp_flows.errors import InputError
from drp_flows.sites.storage import Storage


class ConfigError(InputError):
    """A site file that cannot be used; the message names the file and the key."""


class ClusterConfig(BaseModel):
    """One Dask cluster: `kind` picks the backend, the keys below are ours, every other key is
    an argument of the backend (dask-jobqueue's class, or LocalCluster).

    Jobqueue and local clusters adapt between `minimum_jobs` and `maximum_jobs` (both default
    to `jobs`), so that workers lost to walltime, preemption or a failed node, or retired by
    `--lifetime`, are replaced. The executor's watchdog warns and then fails the group when a
    pool has had no worker, or no finished quantum while quanta wait, for too long.
    """

    model_config = ConfigDict(extra="allow")
    kind: Literal["local", "slurm", "htcondor", "address"]
    jobs: int = Field(1, ge=0, description="batch jobs (or local workers) to start")
    minimum_jobs: int | None = Field(None, ge=0, description="adapt down to this many jobs")
    maximum_jobs: int | None = Field(None, ge=1, description="adapt up to this many jobs")
    address: str | None = Field(None, description="scheduler address, for kind=address")
    no_worker_warn: float = Field(60.0, gt=0, description="s without a worker before a warning")
    no_worker_timeout: float = Field(3600.0, gt=0,
                                     description="s without a worker before the group fails")
    stall_warn: float | None = Field(
        None, gt=0, description="s without a finished quantum, while quanta wait, before a "
                                "warning (default a quarter of stall_timeout)")
    stall_timeout: float | None = Field(
        None, gt=0, description="s without a finished quantum, while quanta wait, before the "
                                "group fails (default 2 h for a site's cluster, 24 h for its "
                                "long_cluster)")

    @model_validator(mode="after")
    def _check(self):
        unknown = sorted(set(self.backend_kwargs) - backend_parameters(self.kind))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} for a {self.kind!r} cluster "
                             f"(not arguments of {BACKENDS[self.kind]}, nor ours)")
        if self.kind == "address" and not self.address:
            raise ValueError("kind 'address' needs an 'address' (tcp://host:port)")
        if self.kind != "address" and self.maximum < 1:
            raise ValueError("a cluster needs at least one job: set jobs or maximum_jobs >= 1")
        if self.minimum > self.maximum:
            raise ValueError(f"minimum_jobs {self.minimum} is above maximum_jobs {self.maximum}")
        return self

    @property
    def minimum(self) -> int:
        return self.jobs if self.minimum_jobs is None else self.minimum_jobs

    @property
    def maximum(self) -> int:
        return max(self.jobs, self.minimum_jobs or 0) if self.maximum_jobs is None else self.maximum_jobs

    @property
    def backend_kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


BACKENDS = {"local": "distributed.LocalCluster and its workers",
            "slurm": "dask_jobqueue.SLURMCluster and its jobs",
            "htcondor": "dask_jobqueue.HTCondorCluster and its jobs",
            "address": "nothing: an existing scheduler takes no options"}


def backend_parameters(kind: str) -> set[str]:
    """The keyword arguments a cluster kind's backend accepts (every class in the chain that
    receives them), less those we set ourselves."""
    import inspect

    if kind == "local":
        from distributed import LocalCluster, Nanny, Worker
        classes: tuple = (LocalCluster, Nanny, Worker)
    elif kind in ("slurm", "htcondor"):
        import dask_jobqueue

        cluster = getattr(dask_jobqueue, {"slurm": "SLURMCluster", "htcondor": "HTCondorCluster"}[kind])
        classes = (cluster, cluster.job_cls)
    else:
        return set()
    names = {name for cls in classes for base in cls.__mro__ if "__init__" in vars(base)
             for name, p in inspect.signature(base.__init__).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "n_workers"}


SECRET_OPTIONS = {"key", "secret", "token", "password", "aws_access_key_id",
                  "aws_secret_access_key", "aws_session_token"}


def _no_password(what: str, url: str) -> None:
    """URLs end up in butler.yaml, logs and Prefect parameters: none may carry a password."""
    password = urlsplit(url).password
    if password is not None:
        raise ValueError(
            f"{what} {url.replace(':' + password + '@', ':***@')!r} holds a password, which "
            "would be written to butler.yaml and logs: leave it out "
            "and give it to the database client instead (~/.pgpass, PGPASSWORD, or "
            "daf_butler's ~/.lsst/db-auth.yaml)")


class ButlerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    registry: str | None = Field(
        None, description="registry database URL, without a password (~/.pgpass, PGPASSWORD "
                          "or ~/.lsst/db-auth.yaml give it); default SQLite in the site's "
                          "repo directory")
    repo: str | None = Field(
        None, description="local directory of butler.yaml; default <storage>/repo when file://")

    @field_validator("registry")
    @classmethod
    def _secret_free(cls, value: str | None) -> str | None:
        if value:
            _no_password("registry", value)
        return value


class SkyShare(BaseModel):
    """Which tracts a site processes (it holds the raws of visits aimed at them)."""

    model_config = ConfigDict(extra="forbid")
    tracts: list[int] | None = Field(None, min_length=1)
    dec_min: float = Field(-90.0, ge=-90.0, le=90.0)
    dec_max: float = Field(90.0, ge=-90.0, le=90.0)

    @model_validator(mode="after")
    def _range(self):
        if self.dec_min >= self.dec_max:
            raise ValueError(f"dec_min {self.dec_min} is not below dec_max {self.dec_max}: "
                             "the share holds no tract")
        return self


class SiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    cluster: ClusterConfig
    long_cluster: ClusterConfig | None = None
    storage: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    butler: ButlerConfig = Field(default_factory=ButlerConfig)
    embargo: StrictBool = False
    sky: SkyShare = Field(default_factory=SkyShare)
    memory_multiplier: float = Field(
        2.0, gt=1, description="a quantum the memory limit killed is retried with its memory "
                               "request times this (BPS's memoryMultiplier)")
    request_memory_max: str | None = Field(
        None, description="the largest memory request a retry may make (e.g. 64GB; default: "
                          "the memory of the site's largest worker); past it the quantum is "
                          "quarantined with reason 'memory'")
    max_worker_deaths: int = Field(
        3, ge=1, description="a quantum running when this many workers died is quarantined "
                             "with reason 'killed worker'")
    group_window: int = Field(
        2, ge=1, description="groups of a stage that run at once at this site (one group's "
                             "quanta fill the cores another's long quanta leave idle)")
    follow_data: StrictBool = Field(
        True, description="a step starts on a visit (or tract) as soon as the step before it "
                          "has finished it; false: each step waits for the whole group")
    deployment: str | None = Field(
        None, pattern=r"^[^/]+/[^/]+$",
        description="Prefect deployment (flow/name) that runs this site's stages on the worker "
                    "of the site's own work pool; unset, the campaign's process runs them")
    deployment_start_timeout: float = Field(
        900.0, gt=0, description="s for the site's worker to start a stage's deployment run")
    deployment_timeout: float = Field(
        14 * 86400.0, gt=0, description="s for a stage's deployment run to end")

    @field_validator("storage")
    @classmethod
    def _scheme(cls, value: str) -> str:
        Storage(value)  # raises for a scheme with no filesystem kind
        parts = urlsplit(value)
        if "@" in parts.netloc:
            raise ValueError("a storage URL holds no user or key: S3 keys come from the "
                             "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the "
                             "AWS profile files")
        if parts.scheme == "file" and (parts.netloc not in ("", "localhost")
                                       or not parts.path.startswith("/")):
            raise ValueError(f"{value!r} is not an absolute path: write file:///abs/path "
                             "(three slashes)")
        return value

    @field_validator("storage_options")
    @classmethod
    def _no_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        def walk(options: dict, where: str) -> None:
            for k, v in options.items():
                if k.lower() in SECRET_OPTIONS:
                    raise ValueError(f"{where}{k}: keys and secrets are never written in a "
                                     "site file; S3 takes them from the environment "
                                     "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the AWS "
                                     "profile files (~/.aws/credentials)")
                if isinstance(v, dict):
                    walk(v, f"{where}{k}.")
                elif isinstance(v, str) and "://" in v:
                    _no_password(f"{where}{k}", v)
        walk(value, "")
        return value

    @field_validator("request_memory_max")
    @classmethod
    def _bytes(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bytes(value)      # raises ValueError naming what it could not read
        return value

    @property
    def store(self) -> Storage:
        return Storage(self.storage, self.storage_options, profile=self.name)

    @property
    def repo_dir(self) -> str:
        """Where butler.yaml lives: on S3 sites a local directory (SQLite cannot live on S3)."""
        if self.butler.repo:
            return self.butler.repo
        if self.store.scheme != "file":
            raise ConfigError(f"site {self.name}: storage {self.storage} is not a local path; "
                              "set butler.repo to a local directory for butler.yaml")
        return self.store.path(self.store.join("repo"))

    def owns_tract(self, tract: int, tract_dec: float) -> bool:
        if self.sky.tracts is not None:
            return tract in self.sky.tracts
        return self.sky.dec_min <= tract_dec < self.sky.dec_max


class EmbargoConfig(BaseModel):
    """Exposures that began less than `hours` before `now` are embargoed: they, and what is
    derived from them, stay at embargo sites. `now` defaults to the current time; a
    simulated survey, whose nights are in the past, sets its own."""

    model_config = ConfigDict(extra="forbid")
    hours: float = Field(80.0, gt=0, description="embargo period")
    now: datetime | None = Field(None, description="the time the period counts back from (UTC)")

    def covers(self, begin: Time) -> bool:
        """Whether an exposure that began at `begin` is under embargo."""
        now = self.now or datetime.now(UTC)
        if now.tzinfo is not None:          # naive times are UTC already
            now = now.astimezone(UTC).replace(tzinfo=None)
        return bool(begin > Time(now, scale="utc") - TimeDelta(self.hours * 3600, format="sec"))

    def embargoed_exposures(self, butler) -> set[int]:
        """The exposures of a site's repository that are under embargo."""
        return {int(r.id) for r in butler.registry.queryDimensionRecords("exposure")
                if self.covers(r.timespan.begin)}


class PipelineConfig(BaseModel):
    """The science settings every site's quanta run with (Rubin's pipeline config
    overrides): one campaign, one pipeline."""

    model_config = ConfigDict(extra="forbid")
    psf_model: Literal["moffat", "empirical"] = Field(
        "moffat", description="step 1's PSF: the CCD's Moffat, or the empirical model that "
        "varies over the CCD (tasks/psf_model.py)")


class CampaignSites(BaseModel):
    """A site file: the sites and which one runs the global steps and keeps the archive."""

    model_config = ConfigDict(extra="forbid")
    campaign_site: str
    sites: dict[str, SiteConfig]
    embargo: EmbargoConfig | None = None
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    source: str = ""

    @model_validator(mode="after")
    def _names(self):
        if self.campaign_site not in self.sites:
            raise ValueError(f"campaign_site {self.campaign_site!r} is not one of the sites "
                             f"{sorted(self.sites)}")
        for name, site in self.sites.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ValueError(f"site name {name!r}: letters, digits and _ only")
            site.name = name
        _apart(self.sites)
        if self.embargo and not self.sites[self.campaign_site].embargo:
            raise ValueError("an embargo period needs the campaign site to be an embargo site "
                             "(embargo: true): it holds the embargoed raws and gathers every "
                             "site's products")
        return self

    def __getitem__(self, name: str) -> SiteConfig:
        return self.sites[name]


def _apart(sites: dict[str, SiteConfig]) -> None:
    """Sites share no storage (one root inside another's), repository directory or registry:
    a site's setup wipes its own, which would be the other's."""
    def inside(a: str, b: str) -> bool:
        a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
        return a.startswith(b) or b.startswith(a)

    names = sorted(sites)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = sites[a], sites[b]
            if inside(sa.storage, sb.storage):
                raise ValueError(f"sites {a} and {b} share storage ({sa.storage}, {sb.storage}): "
                                 "each site needs a root of its own")
            if sa.butler.repo and sb.butler.repo and inside(sa.butler.repo, sb.butler.repo):
                raise ValueError(f"sites {a} and {b} share butler.repo {sa.butler.repo}")
            if sa.butler.registry and sa.butler.registry == sb.butler.registry \
                    and not sa.butler.registry.startswith("postgresql"):
                raise ValueError(f"sites {a} and {b} share registry {sa.butler.registry} "
                                 "(PostgreSQL keeps each site in a schema of its own; SQLite "
                                 "cannot)")


class _UniqueKeys(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":    # '<<: *anchor' may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line "
                    f"{seen[key].start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand(text: str, variables: dict[str, str]) -> str:
    """${NAME} and ${NAME:-default} from `variables`, then the environment."""
    def sub(m):
        name, default = m.group(1), m.group(2)
        value = variables.get(name, os.environ.get(name, default))
        if value is None:
            raise KeyError(name)
        return value
    return _VAR.sub(sub, text)


_parsed: dict[tuple[str, str], CampaignSites] = {}


def load_sites(path: str | Path, **variables: str) -> CampaignSites:
    """Load and validate a site file; any problem raises ConfigError naming the file and key.
    A file is parsed once per process while its text (after ${VAR} expansion) stays the same:
    flows and tasks take the file's path (a Prefect parameter) and all share one object, which
    nobody changes."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read site file ({e.strerror})") from e
    try:
        text = _expand(text, variables)
    except KeyError as e:
        raise ConfigError(f"{path}: variable ${{{e.args[0]}}} is not set") from e
    key = (str(path), text)
    if key not in _parsed:
        _parsed[key] = _parse(path, text)
    return _parsed[key]


def _parse(path: Path, text: str) -> CampaignSites:
    try:
        data = yaml.load(text, Loader=_UniqueKeys)   # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'campaign_site' and 'sites'")
    try:
        cfg = CampaignSites.model_validate(data)
    except ValidationError as e:
        lines = [f"{path}: invalid site file"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    cfg.source = str(path)
    return cfg


LOCAL_SITES = Path(__file__).with_name("local.yaml")
