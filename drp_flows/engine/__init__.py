"""How work runs, knowing no science: quanta and their execution on Dask, registration of
their outputs, and the closed-loop transfers between sites."""
