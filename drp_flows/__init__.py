"""drp-flows: multi-site Data Release Processing as Prefect flows on Dask clusters."""

import os

# Offline defaults, set before Prefect reads its settings: no telemetry, and time for the
# ephemeral API server to migrate its database on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
