"""The README's "The table the job expects" shows the table the code describes
(`rule/dispatch_table.dispatches_table`): the same columns, types and key, as DDL."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

from dispatch_retention.config import Target
from dispatch_retention.rule.dispatch_table import dispatches_table

README = Path(__file__).parents[2] / "README.md"


def _words(ddl: str) -> list[str]:
    return re.findall(r"[A-Za-z_]+|\(|\)", ddl)


def test_the_readme_shows_the_table_the_code_describes() -> None:
    section = README.read_text().split("## The table the job expects", 1)[1]
    shown = section.split("```sql", 1)[1].split("```", 1)[0]
    code = str(CreateTable(dispatches_table(Target())).compile(dialect=postgresql.dialect()))
    assert _words(shown) == _words(code)
