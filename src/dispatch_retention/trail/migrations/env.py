"""Alembic environment for the job's own tables.

Always run through `dispatch_retention.migrate`, which passes the open connection and the
audit schema in `config.attributes`. The version table has its own name and lives in the
job's schema, so it never collides with the Messaging API's own migrations.
"""

from alembic import context

from dispatch_retention.trail.audit_tables import ALEMBIC_VERSION_TABLE

config = context.config
connection = config.attributes["connection"]
schema = config.attributes["schema"]

context.configure(
    connection=connection,
    version_table=ALEMBIC_VERSION_TABLE,
    version_table_schema=schema,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations(schema=schema)
