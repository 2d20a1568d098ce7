"""``fskd bench``'s room: a grid's plan and the code that runs one cell (:mod:`fskd.bench.runner`),
and where the cells run: in this process (``--executor local``) or as Slurm jobs through submitit
(``--executor slurm``, :mod:`fskd.bench.slurm`). The results file, tables and plots are
:mod:`fskd.reports.bench`. The verbs a cell runs (adapt, evaluate, ...) are given by
:func:`fskd.api.bench`, so this room imports nothing to its right."""
