"""Catalogs as Parquet, written exactly as daf_butler's ParquetFormatter writes ArrowAstropy."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
from astropy.table import Table
from lsst.daf.butler.formatters.parquet import arrow_to_astropy, astropy_to_arrow


def table_bytes(table: Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(astropy_to_arrow(table), buf)
    return buf.getvalue()


def read_table(storage, uri: str) -> Table:
    with storage.open(uri, "rb") as f:
        return arrow_to_astropy(pq.read_table(io.BytesIO(f.read())))
