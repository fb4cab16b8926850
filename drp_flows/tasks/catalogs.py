"""Catalogs as Parquet, written exactly as daf_butler's ParquetFormatter writes ArrowAstropy."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import Table
from lsst.daf.butler.formatters.parquet import arrow_to_astropy, astropy_to_arrow

from drp_flows.engine.quanta import read_input, reading


def table_bytes(table: Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(astropy_to_arrow(table), buf)
    return buf.getvalue()


def read_table(storage, uri: str) -> Table:
    """The file's bytes read here, then parsed from an Arrow buffer: with a Python file object
    Arrow's reader threads take the GIL to read and free it, one side of the deadlock that hung
    a weekly run's stage 1 (the other: Dask's profiler, see drp_flows/__init__.py)."""
    data = read_input(storage, uri)
    with reading(uri):
        return arrow_to_astropy(pq.read_table(pa.BufferReader(data)))
