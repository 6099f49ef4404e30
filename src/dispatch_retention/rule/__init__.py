"""Pure expressions and plain data, no connection: the rule of what is due (`policy`), the
dispatches table as SQLAlchemy describes it (`dispatch_table`), its shape as plain data
(`shape`), a run's plan (`plans`) and sharded runs (`shard`).
"""
