"""The pipeline table's mechanism, as lsst/pipe_base has it: every label declares its quanta's
dimensions and its connections (inputs with how their data IDs relate to the quantum's, and
outputs), its stage and scope, its resources and clustering; one planner builds any label's
quanta for a group from that declaration, with a handful of bulk registry queries.

How an input's data IDs relate to its quantum's (dimensions without the governors instrument
and skymap; a raw's exposure counts as its visit, one exposure per visit):
- SAME: the one dataset whose data ID is the quantum's, or a coarser one (a visit's summary for
  a CCD's quantum, the campaign's calibration for a visit's);
- EACH: every dataset within the quantum's data ID (all CCDs of a visit, all bands of a patch,
  all of the campaign's for a quantum without dimensions);
- OVERLAP: every dataset whose sky region overlaps the quantum's (the registry's spatial join;
  `exact` checks each pair again on the exact regions, the input's region passed through it,
  an inset for instance);
- OF_DRIVER: for each dataset of the first input, the one of its data ID (the visit summary of
  every overlapping CCD's visit);
- CALIBRATION: the certified dataset of the quantum's detector (and its visit's filter) valid
  when the visit's exposure was taken.

The first input drives: a label's quanta are the data IDs where it has datasets (a label
without dimensions has its one quantum). A quantum whose outputs are all registered is
skipped; one missing a required input is blocked. A label's `adjust` (pipe_base's
adjustQuantum) may then trim a quantum's inputs, drop it (None) or block it (raise Blocked),
for what only the science can tell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lsst.daf.butler import Butler

from drp_flows.datamodel import CALIB_COLLECTION, DATASET_TYPES, DEFAULTS
from drp_flows.engine.planning import (
    data_key,
    dataset_uris,
    done_quanta,
    existing_collections,
    output_path,
    within,
)
from drp_flows.engine.quanta import Quantum, StepFunction
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.skymap import SKYMAP_NAME

SAME, EACH, OVERLAP, OF_DRIVER, CALIBRATION = "same", "each", "overlap", "of driver", "calibration"
RELATIONS = (SAME, EACH, OVERLAP, OF_DRIVER, CALIBRATION)
SCOPES = {"visit": "visit", "tract": "tract", "campaign": None}   # a group's key dimension


class Blocked(Exception):
    """Raised by a label's `adjust`: the quantum cannot run with the inputs there are."""


@dataclass(frozen=True)
class Input:
    dataset_type: str
    relation: str = SAME
    name: str = ""                  # its key in the quantum's inputs (default: the dataset type)
    required: bool = True           # a quantum without it is blocked (else the key is left out)
    region: tuple[str, ...] = ()    # OVERLAP: the quantum dimensions whose region (default all)
    exact: Callable | None = None   # OVERLAP: check pairs on exact regions, the input's through this

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"input {self.dataset_type}: relation {self.relation!r} is not one "
                             f"of {RELATIONS}")

    @property
    def key(self) -> str:
        return self.name or self.dataset_type


@dataclass(frozen=True)
class Label:
    """One row of the pipeline table."""

    name: str
    step: str                            # the step it belongs to (collections are per step)
    stage: str                           # where it runs between data movements
    scope: str                           # what a group of it is: visit, tract or campaign
    dimensions: tuple[str, ...]          # its quanta's (without the governors)
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    run: StepFunction
    cluster_by: tuple[str, ...] = ()     # BPS-style clustering dimensions
    pool: str = "short"                  # the class: short, or long (the long_cluster)
    memory: str = "1GB"                  # the first memory request of a quantum
    adjust: Callable[[Storage, dict, dict], dict | None] | None = None

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"label {self.name}: scope {self.scope!r} is not one of {list(SCOPES)}")
        if not self.inputs and self.dimensions:
            raise ValueError(f"label {self.name}: quanta with dimensions need a first input")
        if any(i.relation in (OF_DRIVER, CALIBRATION) for i in self.inputs[:1]):
            raise ValueError(f"label {self.name}: its first input cannot be "
                             f"{self.inputs[0].relation!r}")
        if any(i.relation == CALIBRATION for i in self.inputs) and "visit" not in self.dimensions:
            raise ValueError(f"label {self.name}: a calibration input needs quanta of a visit "
                             "(its exposure says when and through which filter)")
        for i in self.inputs:
            dims = set(dims_of(i.dataset_type))
            if (i.relation == SAME and not dims <= set(self.dimensions)) or \
                    (i.relation == EACH and not set(self.dimensions) <= dims):
                raise ValueError(f"label {self.name}: input {i.dataset_type} of {sorted(dims)} "
                                 f"cannot be {i.relation!r} for quanta of {list(self.dimensions)}")

    def plan(self, butler: Butler, storage: Storage, run: str, ids: list[int],
             collections: list[str]) -> tuple[list[Quantum], int, list[dict]]:
        """The label's quanta for the group's `ids` (of its scope's dimension; all for the
        campaign scope), writing into `run`, what is done looked for in `collections`:
        (quanta, skipped, blocked data IDs)."""
        return _Planning(self, butler, storage, collections, ids).plan(run)


def dims_of(dataset_type: str) -> tuple[str, ...]:
    """A dataset type's dimensions as the planner keys them."""
    return tuple("visit" if d == "exposure" else d for d in DATASET_TYPES[dataset_type].dimensions
                 if d not in ("instrument", "skymap"))


def registry_name(dataset_type: str, dim: str) -> str:
    """The registry's name of a planner dimension for a dataset type (a raw's visit is its
    exposure)."""
    return "exposure" if dim == "visit" and "exposure" in DATASET_TYPES[dataset_type].dimensions \
        else dim


Key = tuple   # a data ID as the planner keys it: its values in the order of some dimensions


def region_element(dims) -> str:
    """The registry element whose records hold the region of data IDs of these dimensions."""
    dims = set(dims)
    if {"visit", "detector"} <= dims:
        return "visit_detector_region"
    found = next((d for d in ("visit", "patch", "tract") if d in dims), None)
    if found is None:
        raise ValueError(f"no region for data IDs of {sorted(dims)}")
    return found


# the fields of an element's records that key its regions: (attribute, planner dimension)
REGION_FIELDS = {"visit_detector_region": (("visit", "visit"), ("detector", "detector")),
                 "visit": (("id", "visit"),), "patch": (("tract", "tract"), ("id", "patch")),
                 "tract": (("id", "tract"),)}


def governors(dims) -> dict:
    """The governor values a query of these dimensions is constrained with."""
    out = {}
    if set(dims) & {"visit", "exposure", "detector"}:
        out["instrument"] = INSTRUMENT
    if set(dims) & {"tract", "patch"}:
        out["skymap"] = SKYMAP_NAME
    return out


class _Planning:
    """One call of a label's planner: the group, and what its queries found."""

    def __init__(self, label: Label, butler: Butler, storage: Storage, collections: list[str],
                 ids: list[int]):
        self.label, self.butler, self.storage = label, butler, storage
        self.registry = butler.registry
        self.collections = collections
        # inputs come from the campaign's chain and, before it exists, from the defaults
        # (raws, reference catalogs, skymap) that every chain ends with
        self.existing = existing_collections(butler, collections) + [DEFAULTS]
        self.key_dim = SCOPES[label.scope]
        self.ids = sorted(set(ids)) if self.key_dim else []
        self.dims = label.dimensions
        self.visits: dict[int, dict] | None = None     # CALIBRATION: each visit's values

    # -- queries ---------------------------------------------------------------------------

    def restriction(self, dataset_type: str, values: dict[str, set] | None = None) -> dict:
        """Query arguments keeping a dataset type's query to the group: its key dimension's
        ids when the type has it, else the values of its first dimension that are wanted."""
        dims = dims_of(dataset_type)
        if self.key_dim in dims:
            return within(registry_name(dataset_type, self.key_dim), self.ids)
        for dim in dims:
            if values and dim in values:
                return within(registry_name(dataset_type, dim), values[dim])
        return {}

    def find(self, dataset_type: str, restriction: dict) -> dict[Key, tuple]:
        """Find-first datasets of a type: key (in its dims' order) -> (ref, URI)."""
        refs = list(self.registry.queryDatasets(dataset_type, collections=self.existing,
                                                findFirst=True, **restriction))
        uris = dataset_uris(self.butler, self.storage, refs)
        names = [registry_name(dataset_type, d) for d in dims_of(dataset_type)]
        return {tuple(r.dataId[n] for n in names): (r, u) for r, u in zip(refs, uris, strict=True)}

    def pairs(self, inp: Input, qdims: tuple[str, ...]) -> set[tuple[Key, Key]]:
        """(key on qdims, input key) of the registry's spatial join of the dimensions, within
        the group. Joined with the datasets too, SQLite takes seconds per hundred visits
        once the campaign's chain holds many RUNs: the datasets are found apart."""
        idims = dims_of(inp.dataset_type)
        names = sorted(set(qdims) | set(idims))
        where = within(self.key_dim, self.ids) if self.key_dim else {}
        return {(tuple(d[n] for n in qdims), tuple(d[n] for n in idims))
                for d in self.registry.queryDataIds(names, **governors(names), **where)}

    def regions(self, dims: tuple[str, ...], keys: set[Key]) -> dict[Key, object]:
        """The exact sky regions of data IDs of these dimensions, from one records query."""
        element = region_element(dims)
        fields = REGION_FIELDS[element]
        first = fields[0][1]
        values = {k[dims.index(first)] for k in keys}
        records = self.registry.queryDimensionRecords(element, **within(first, values))
        by_key = {tuple(getattr(r, attr) for attr, _ in fields): r.region for r in records}
        return {k: by_key[tuple(k[dims.index(d)] for _, d in fields)] for k in keys}

    # -- relations -------------------------------------------------------------------------

    def project(self, key: Key, dims: tuple[str, ...], onto: tuple[str, ...]) -> Key:
        return tuple(key[dims.index(d)] for d in onto)

    def same(self, inp: Input, qkeys: list[Key]) -> dict[Key, list]:
        idims = dims_of(inp.dataset_type)
        wanted = {d: {self.project(k, self.dims, (d,))[0] for k in qkeys} for d in idims}
        found = self.find(inp.dataset_type, self.restriction(inp.dataset_type, wanted))
        out = {}
        for k in qkeys:
            hit = found.get(self.project(k, self.dims, idims))
            if hit:
                out[k] = [hit]
        return out

    def each(self, inp: Input, qkeys: list[Key] | None) -> dict[Key, list]:
        idims = dims_of(inp.dataset_type)
        found = self.find(inp.dataset_type, self.restriction(inp.dataset_type))
        out: dict[Key, list] = {}
        for ikey, hit in sorted(found.items()):
            out.setdefault(self.project(ikey, idims, self.dims), []).append(hit)
        return out if qkeys is None else {k: out[k] for k in qkeys if k in out}

    def overlap(self, inp: Input, qkeys: list[Key] | None) -> dict[Key, list]:
        idims = dims_of(inp.dataset_type)
        qdims = inp.region or self.dims
        pairs = self.pairs(inp, qdims)
        values = {d: {i[idims.index(d)] for _, i in pairs} for d in idims}
        found = self.find(inp.dataset_type, self.restriction(inp.dataset_type, values)) \
            if pairs else {}
        pairs = {(q, i) for q, i in pairs if i in found}
        if inp.exact is not None and pairs:
            qregions = self.regions(qdims, {q for q, _ in pairs})
            iregions = {k: inp.exact(r) for k, r in self.regions(idims, {i for _, i in pairs}).items()}
            pairs = {(q, i) for q, i in pairs if not iregions[i].isDisjointFrom(qregions[q])}
        by_region: dict[Key, list] = {}
        for q, i in sorted(pairs):
            by_region.setdefault(q, []).append(found[i])
        if qdims == self.dims:
            return by_region if qkeys is None else {k: by_region[k] for k in qkeys
                                                    if k in by_region}
        if qkeys is None:
            raise ValueError(f"label {self.label.name}: its first input must overlap the "
                             f"quanta's own region, not that of {qdims}")
        return {k: by_region[r] for k in qkeys
                if (r := self.project(k, self.dims, qdims)) in by_region}

    # -- the plan --------------------------------------------------------------------------

    def plan(self, run: str) -> tuple[list[Quantum], int, list[dict]]:
        label = self.label
        if self.key_dim and not self.ids:
            return [], 0, []
        inputs: dict[str, dict[Key, list]] = {}
        if not self.dims:
            qkeys = [()]
        else:
            driver = label.inputs[0]
            inputs[driver.key] = self.resolve(driver, None)
            qkeys = sorted(inputs[driver.key])
        if not qkeys:
            return [], 0, []
        done = done_quanta(self.butler, self.collections, label.outputs, self.key_dim, self.ids)
        skymap = any("skymap" in DATASET_TYPES[o].dimensions for o in label.outputs)
        data_ids = {k: ({"skymap": SKYMAP_NAME} if skymap else {}) | dict(zip(self.dims, k,
                                                                             strict=True))
                    for k in qkeys}
        todo = [k for k in qkeys if data_key(data_ids[k]) not in done]
        skipped = len(qkeys) - len(todo)
        for inp in label.inputs:
            if inp.key not in inputs:
                inputs[inp.key] = self.resolve(inp, todo, inputs)
        folders = {o: self.storage.join("repo", run, o) for o in label.outputs}
        quanta, blocked = [], []
        for k in todo:
            data_id = data_ids[k]
            found = {}
            missing = False
            for inp in label.inputs:
                hits = inputs[inp.key].get(k)
                if not hits:
                    missing = missing or inp.required
                    continue
                uris = [uri for _, uri in hits]
                found[inp.key] = uris[0] if inp.relation in (SAME, CALIBRATION) else uris
            if missing:
                blocked.append(data_id)
                continue
            if label.adjust:
                try:
                    found = label.adjust(self.storage, data_id, found)
                except Blocked:
                    blocked.append(data_id)
                    continue
                if found is None:
                    continue
            quanta.append(Quantum(label.name, data_id, found,
                                  {o: f"{folders[o]}/{output_path(o, data_id)}"
                                   for o in label.outputs}))
        return quanta, skipped, blocked

    def resolve(self, inp: Input, qkeys: list[Key] | None,
                inputs: dict[str, dict[Key, list]] | None = None) -> dict[Key, list]:
        """An input's datasets for each quantum key (for every key it has, when qkeys is None):
        key -> [(ref, URI), ...]."""
        if inp.relation == SAME:
            if qkeys is None:
                idims = dims_of(inp.dataset_type)
                return {self.project(ikey, idims, self.dims): [hit] for ikey, hit in
                        self.find(inp.dataset_type, self.restriction(inp.dataset_type)).items()}
            return self.same(inp, qkeys)
        if inp.relation == EACH:
            return self.each(inp, qkeys)
        if inp.relation == OVERLAP:
            return self.overlap(inp, qkeys)
        if inp.relation == OF_DRIVER:
            return self.of_driver(inp, qkeys, inputs[self.label.inputs[0].key])
        return self.calibration(inp, qkeys, inputs[self.label.inputs[0].key])

    def of_driver(self, inp: Input, qkeys: list[Key], driver: dict[Key, list]) -> dict[Key, list]:
        """For each of a quantum's driving datasets, the dataset of its data ID; all or none."""
        idims = dims_of(inp.dataset_type)
        names = {d: registry_name(self.label.inputs[0].dataset_type, d) for d in idims}
        wanted = {k: sorted({tuple(ref.dataId[names[d]] for d in idims) for ref, _ in driver[k]})
                  for k in qkeys}
        values = {d: {w[idims.index(d)] for ws in wanted.values() for w in ws} for d in idims}
        found = self.find(inp.dataset_type, self.restriction(inp.dataset_type, values))
        return {k: [found[w] for w in ws] for k, ws in wanted.items()
                if all(w in found for w in ws)}

    def calibration(self, inp: Input, qkeys: list[Key], driver: dict[Key, list]) -> dict[Key, list]:
        """The certified dataset of each quantum's detector (and its visit's physical filter)
        valid at its visit's exposure: one query of the calibration collection per dataset
        type; the exposures' timespans queried only where a detector has more than one."""
        idims = dims_of(inp.dataset_type)
        certified: dict[Key, list] = {}
        for a in self.registry.queryDatasetAssociations(inp.dataset_type,
                                                        collections=CALIB_COLLECTION):
            certified.setdefault(tuple(a.ref.dataId[d] for d in idims), []).append(a)
        refs = [a.ref for found in certified.values() for a in found]
        uris = dict(zip([r.id for r in refs], dataset_uris(self.butler, self.storage, refs),
                        strict=True))
        visit = self.dims.index("visit")
        if self.visits is None:     # a visit's values, from its first driving data ID
            self.visits = {}
            for k in qkeys:
                if k[visit] not in self.visits:
                    self.visits[k[visit]] = dict(driver[k][0][0].dataId.mapping)
        # a quantum's calibration key: its own values, else its visit's
        getters = [(True, self.dims.index(d)) if d in self.dims else (False, d) for d in idims]
        single = {c: [(found[0].ref, uris[found[0].ref.id])] for c, found in certified.items()
                  if len(found) == 1}
        timespans: dict[int, object] = {}
        out = {}
        for k in qkeys:
            values = self.visits[k[visit]]
            ckey = tuple(k[i] if own else values[i] for own, i in getters)
            if ckey in single:
                out[k] = single[ckey]
                continue
            found = certified.get(ckey, [])
            if len(found) > 1:
                if not timespans:
                    timespans.update({int(r.id): r.timespan for r in self.registry
                                      .queryDimensionRecords("exposure", **within(
                                          "exposure", self.visits))})
                found = [a for a in found if a.timespan.overlaps(timespans[k[visit]])]
                if len(found) == 1:
                    out[k] = [(found[0].ref, uris[found[0].ref.id])]
        return out
