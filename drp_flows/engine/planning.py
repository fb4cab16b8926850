"""Planning helpers: what the planners ask the site's registry, in bulk and bounded by the
group being planned, so that planning a group costs what the group holds, not what the
campaign has already done.

- A group's data IDs are bound as a list (`visit IN (ids)` with `bind`): daf_butler turns a
  bound list into one SQL IN, where a literal list becomes a chain of ORs that SQLite refuses
  past 1,000 terms ("Expression tree is too large").
- URIs come from the datastore in one query per call, not one per dataset.
- What is already done is looked up for the group's data IDs only, in every RUN of the
  campaign's chain at once (not find-first: any registered output counts).
"""

from __future__ import annotations

from collections.abc import Iterable

from lsst.daf.butler import Butler, CollectionType, DatasetRef, MissingCollectionError

from drp_flows.datamodel import DATASET_TYPES
from drp_flows.engine.quanta import RecordedURI
from drp_flows.errors import InputError
from drp_flows.sites.storage import Storage
from drp_flows.tasks.camera import INSTRUMENT
from drp_flows.tasks.skymap import SKYMAP_NAME

TRACT_GROUP = "tracts-"     # the prefix of tract groups' names; visit groups are visit ranges


def make_groups(ids: list[int], size: int, prefix: str = "") -> dict[str, list[int]]:
    """Groups of at most `size` of the ids in order (visit or tract ranges), named by their
    first and last id."""
    if size < 1:
        raise ValueError(f"group size {size}: must be >= 1")
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
    return {prefix + "-".join(map(str, sorted({c[0], c[-1]}))): c for c in chunks}


def group_range(run: str) -> tuple[str, int, int] | None:
    """What a group attempt's RUN (<chain>/<step>/<group>/<attempt>) covers, from its group's
    name: (dimension, first id, last id), or None for a RUN not named so."""
    parts = run.rsplit("/", 3)
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    ids = parts[2].removeprefix(TRACT_GROUP).split("-")
    if len(ids) not in (1, 2) or not all(i.isdigit() for i in ids):
        return None
    return ("tract" if parts[2].startswith(TRACT_GROUP) else "visit"), int(ids[0]), int(ids[-1])


def output_path(dataset_type: str, data_id: dict) -> str:
    """Where a quantum writes an output, within its RUN's folder for the dataset type
    (<datastore>/<run>/<type>/): <visit or tract>/<type>_<instrument>_<ids>.<ext>."""
    name = "_".join([dataset_type, INSTRUMENT] + [str(data_id[k]) for k in sorted(data_id)])
    folder = [str(data_id[k]) for k in ("visit", "tract") if k in data_id][:1]
    return "/".join([*folder, name + DATASET_TYPES[dataset_type].extension])


def dataset_uri(butler: Butler, storage: Storage, ref) -> str:
    return storage.from_butler_uri(butler.getURI(ref))


def dataset_uris(butler: Butler, storage: Storage, refs: list[DatasetRef]) -> list[str]:
    """The URIs of many datasets, in the order of `refs`, from one query of the datastore's
    records.

    Butler.getURI asks once per dataset and the datastore's getManyURIs builds a resource
    object per file (80 us each: 7 s for a 10,000-visit group's raws); the records table
    holds each file's path, relative to the datastore's root or absolute, which is all a
    quantum needs, and the size and sha256 registration recorded (a `RecordedURI`, which the
    quanta check what they read against). A datastore without such a table (not ours) falls
    back to getManyURIs."""
    if not refs:
        return []
    datastore = butler._datastore                          # noqa: SLF001 (no public bulk call)
    table = getattr(datastore, "_table", None)
    if table is None:
        found = datastore.getManyURIs(refs)
        return [storage.from_butler_uri(found[ref].primaryURI) for ref in refs]
    root = storage.from_butler_uri(str(datastore.root)).rstrip("/")
    ids = [r.id for r in refs]          # a ref makes its UUID anew at every .id
    rows = {row["dataset_id"]: (row["path"], row["checksum"], row["file_size"])
            for row in table.fetch(dataset_id=ids) if row["component"] in (None, NO_COMPONENT)}
    missing = [r for r, i in zip(refs, ids, strict=True) if i not in rows]
    if missing:
        raise LookupError(f"{len(missing)} datasets have no file in the datastore, e.g. "
                          f"{missing[0]}")
    uris = []
    for path, sha256, size in (rows[i] for i in ids):
        uri = storage.from_butler_uri(path) if "://" in path else f"{root}/{path}"
        uris.append(RecordedURI(uri, sha256, size) if sha256 else uri)
    return uris


NO_COMPONENT = "__NULL_STRING__"     # how the records table stores "no component"


GOVERNORS = {"visit": ("instrument", INSTRUMENT), "exposure": ("instrument", INSTRUMENT),
             "tract": ("skymap", SKYMAP_NAME)}


BOOLEAN_OPS = {"AND", "OR", "=", "!=", "<", "<=", ">", ">=", "OVERLAPS"}


def checked_query(where: str) -> str:
    """A user's data query, refused unless daf_butler's parser reads it as one condition (a
    comparison, IN, NOT, AND or OR of such): a value alone ('1') is not one, and text such
    as "a) OR (b" that only makes sense spliced into another query does not parse."""
    from lsst.daf.butler.queries.expressions.parser import ParserYacc, exprTree
    from lsst.daf.butler.queries.expressions.parser.parserLex import ParserLexError
    from lsst.daf.butler.queries.expressions.parser.parserYacc import ParserYaccError

    def condition(node) -> bool:
        if isinstance(node, exprTree.Parens):
            return condition(node.expr)
        if isinstance(node, exprTree.UnaryOp):
            return node.op.upper() == "NOT" and condition(node.operand)
        if isinstance(node, exprTree.BinaryOp):
            op = node.op.upper()
            return op in BOOLEAN_OPS and (op not in ("AND", "OR") or
                                         (condition(node.lhs) and condition(node.rhs)))
        return isinstance(node, exprTree.IsIn | exprTree.GlobNode)

    try:
        tree = ParserYacc().parse(where)
    except (ParserYaccError, ParserLexError) as e:
        raise InputError(f"data query {where!r}: {e}") from None
    if tree is None or not condition(tree):
        raise InputError(f"data query {where!r}: not a condition (compare a dimension or "
                         "its field with a value, e.g. band = 'r' or visit > 100; join "
                         "conditions with AND, OR, NOT)")
    return where


def all_of(*conditions: str) -> str:
    """The conjunction of data queries, each checked as a whole condition first, so that
    none can widen another (the weekly run's release cut and a user's query)."""
    return " AND ".join(f"({checked_query(c)})" for c in conditions if c)


def within(dimension: str, ids: Iterable[int]) -> dict:
    """Query arguments restricting a query to a group's data IDs, as one bound list (and the
    governor the dimension depends on, which daf_butler wants constrained with it)."""
    bind: dict = {"group_ids": sorted(set(ids))}
    where = f"{dimension} IN (group_ids)"
    if dimension in GOVERNORS:
        governor, value = GOVERNORS[dimension]
        where = f"{governor} = group_governor AND {where}"
        bind["group_governor"] = value
    return {"where": where, "bind": bind}


def existing_collections(butler: Butler, collections: list[str]) -> list[str]:
    """Those of the collections that exist (a new campaign's chain does not yet)."""
    existing = []
    for c in collections:
        try:
            butler.registry.getCollectionType(c)
        except MissingCollectionError:
            continue
        existing.append(c)
    return existing


def data_key(data_id) -> tuple:
    """A data ID as a hashable key, without the instrument."""
    return tuple(sorted((k, v) for k, v in dict(data_id).items() if k != "instrument"))


def done_quanta(butler: Butler, collections: list[str], outputs: tuple[str, ...],
                dimension: str | None = None, ids: Iterable[int] = ()) -> set[tuple]:
    """Data IDs (without instrument) for which every output is registered in the
    collections: the quanta that skip-existing leaves out. Given a group's `ids` of
    `dimension`, only those, looked for only in the chains' RUNs whose group covers some of
    them (group attempts of any step, campaign or site whose range overlaps the group's, and
    RUNs not named as groups): planning a group costs the same whether the campaign has
    done nothing else or a thousand other groups."""
    existing = existing_collections(butler, collections)
    if not existing:
        return set()
    query: dict = {}
    if dimension:
        ids = sorted(set(ids))
        if not ids:
            return set()
        query = within(dimension, ids)
        existing = overlapping(butler, existing, dimension, ids[0], ids[-1])
        if not existing:
            return set()
    done = None
    for dataset_type in outputs:
        ids_done = {data_key(ref.dataId.required) for ref in butler.registry.queryDatasets(
            dataset_type, collections=existing, findFirst=False, **query)}
        done = ids_done if done is None else done & ids_done
    return done or set()


def overlapping(butler: Butler, collections: list[str], dimension: str, first: int,
                last: int) -> list[str]:
    """The collections, chains replaced by their members, less the group RUNs whose range
    of `dimension` misses [first, last] (or that cover another dimension)."""
    out = []
    for name in collections:
        members = (butler.registry.getCollectionChain(name)
                   if butler.registry.getCollectionType(name) == CollectionType.CHAINED else [name])
        for run in members:
            covered = group_range(run)
            if covered is None or (covered[0] == dimension and covered[1] <= last
                                   and covered[2] >= first):
                out.append(run)
    return out


def visit_uris(butler: Butler, storage: Storage, dataset_type: str, collections: list[str],
               visits: Iterable[int] | None = None) -> dict[int, str]:
    """URIs of a per-visit dataset type, by visit (find-first in the collections), of the
    given visits only when they are given."""
    existing = existing_collections(butler, collections)
    if not existing or (visits is not None and not visits):
        return {}
    query = within("visit", visits) if visits is not None else {}
    refs = list(butler.registry.queryDatasets(dataset_type, collections=existing, findFirst=True,
                                              instrument=INSTRUMENT, **query))
    return {int(r.dataId["visit"]): uri
            for r, uri in zip(refs, dataset_uris(butler, storage, refs), strict=True)}
