"""The audit trail: its tables (`audit_tables`), the run's writer (`run_record`), the readers
of `audit list` / `audit show` (`listing`), legal holds (`holds`), the read-only role's view
(`facts`), the stories a row's events may tell (`history`), the catalog the migrations make
(`objects`), and the migrations themselves (`migrate`, `migrations/`).
"""
