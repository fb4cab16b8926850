"""drp-flows: multi-site Data Release Processing as Prefect flows on Dask clusters."""

import os

# Offline defaults, set before Prefect reads its settings: no telemetry, and time for the
# ephemeral API server to migrate its database on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Dask's scheduler and nanny INFO lines drown the flow logs (in a worker's too); set before
# distributed is imported
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
# No statistical profiler in the workers: its sys._current_frames() every 10 ms, with a
# garbage collection inside it, deadlocks CPython 3.11 against any thread that ends at that
# moment (python/cpython#106883); a stage's cluster of threads hung so in a weekly run
os.environ.setdefault("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False")
