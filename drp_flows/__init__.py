"""drp-flows: multi-site Data Release Processing as Prefect flows on Dask clusters."""

import os

# Offline defaults, set before Prefect reads its settings: no telemetry, and time for the
# ephemeral API server to migrate its database on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Dask's scheduler and nanny INFO lines drown the flow logs (in a worker's too); set before
# distributed is imported
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
