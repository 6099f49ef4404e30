"""docs/auditor.md's two cross-checks ("Two cross-checks, which return matching numbers"),
run as the page writes them, as the read-only role, after a run whose cleaned rows got
personal data back and a `run --reclean` that stripped them again: the chunks of kind
`reclean` count rows an earlier chunk counted too, and the checks, which leave them out,
still match (without that filter they would not)."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import URL

from dispatch_retention.pg import engines
from tests.helpers import granted_role, invoke, run_records, seed_series

DOC = Path(__file__).parents[2] / "docs" / "auditor.md"
PAGE_RUN_ID = "4609ae6c-f0a2-4aad-86f7-a1b9cef72272"


def cross_checks() -> list[str]:
    """The SQL of each `psql` command in the block after "Two cross-checks"."""
    block = DOC.read_text().split("Two cross-checks", 1)[1].split("```console", 1)[1]
    block = block.split("```", 1)[0]
    return re.findall(r'\$ psql "\$RO_URL" -c "(.+?)"\n', block, flags=re.S)


def test_the_cross_checks_match_after_a_reclean(
    engine: Engine, database_url: URL, base: list[str]
) -> None:
    per_chunk, totals = cross_checks()
    seed_series(engine, range(1, 41))
    assert invoke(*base, "run", "--yes").exit_code == 0
    (run_id,) = run_records(engine)
    with engine.begin() as conn:  # the application writes personal data back into ten
        conn.execute(text("UPDATE dispatches SET msisdn = '+4700000000' WHERE id <= 10"))
    recleaned = invoke(*base, "run", "--yes", "--reclean")
    assert recleaned.exit_code == 0, recleaned.output
    with engine.connect() as conn:
        kinds = dict(conn.execute(text("SELECT kind, sum(rows) FROM dispatch_retention.chunks"
                                       " GROUP BY kind")).all())  # fmt: skip
    assert kinds == {"clean": 40, "reclean": 10}

    with granted_role(engine, database_url, "read-only") as (_, url):
        as_role = engines.make_engine(engines.parse_url(url))
        with as_role.connect() as conn:
            chunks = conn.execute(text(per_chunk.replace(PAGE_RUN_ID, run_id))).all()
            (sums,) = conn.execute(text(totals)).all()
            unfiltered = conn.execute(text(totals.replace(" WHERE kind = 'clean'", ""))).one()
        as_role.dispose()
    assert chunks and all(recorded == found for _seq, recorded, found in chunks), chunks
    assert sum(found for _seq, _recorded, found in chunks) == 40
    assert tuple(sums) == (40, 40)
    assert tuple(unfiltered) == (50, 40)  # the filter is what keeps them matching
