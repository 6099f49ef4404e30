"""The retention job against the single-statement bound: `python -m bench`.

The modules, in the order a run uses them: `__main__` (the command line, the run, its
cleanup), `server` (the server and the databases a run creates), `scenarios` (a scenario's
template), `contenders` (the contenders and the turns they take), `jobs` (the job as a
subprocess) and `report` (the results, the printed tables and the JSON). `figures` renders
the figures of docs/performance.md from committed JSON reports (`make doc-figures`).
`bench/README.md` says how to run it and what it reports.
"""
