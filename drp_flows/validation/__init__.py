"""The simulated survey and the QA of every step against its truth: apart from the science
(tasks/), so that what checks the pipeline is not the pipeline."""
