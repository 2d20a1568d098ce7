"""``fskd bench``'s room: reading a grid and running it (:mod:`fskd.bench.grid`), a grid's plan and
the code that runs one cell (:mod:`fskd.bench.runner`), chained rows (:mod:`fskd.bench.chains`),
and the Slurm executor (:mod:`fskd.bench.slurm`). The results file, tables and plots are
:mod:`fskd.reports.bench`; a cell runs the verbs of :mod:`fskd.verbs`."""
