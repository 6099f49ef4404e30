"""One run, the only writer of the dispatches table: the job from start to end (`job`), the
chunk loop (`cleaner`) and `--reclean` (`reclean`), the plan (`planning`), the statements they
execute (`statements`), the id windows (`windows`), the chunk size (`sizing`), the rest
between chunks (`pacing`), the run lock (`lock`) and the pushed metrics (`metrics`). Imports
`trail` and the layers below it, never `checks`.
"""
