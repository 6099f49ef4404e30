"""The window walk: id windows over the plan's due blocks, each about `size` due rows.

Pure arithmetic on the plan's block map (no I/O): the chunk loop (`cleaner.py`) asks for
the next window, cleans it, and says where the next one starts.
"""

from __future__ import annotations

from dispatch_retention.run.statements import BLOCK_IDS, MAX_ID

#: Index entries read for the cost of one row read by id (`Windows.sparse`): an estimate,
#: derived in docs/performance.md ("Which way a window goes").
INDEX_ENTRIES_PER_ROW = 20


class Windows:
    """Id windows over the plan's due blocks, each holding about `size` due rows.

    A window runs over consecutive due blocks until it holds `size` due rows by the plan's
    counts, cutting the last block in proportion (so a dense backlog is not split into a
    full chunk and a small remainder at every block edge). Blocks without due rows are never
    read: a window stops before one, unless it goes through the policies' arms (`sparse`),
    which read index entries, not ids, and so may span the gap. Memory: the plan's block
    list (one entry per 10,000 ids that hold due rows).
    """

    def __init__(self, blocks: tuple[tuple[int, int], ...], arm_rows: int | None = None) -> None:
        self.blocks = blocks
        self.arm_rows = arm_rows
        self.i = 0
        self.lo = blocks[0][0] * BLOCK_IDS if blocks else 0

    @property
    def done(self) -> bool:
        return self.i >= len(self.blocks)

    def block_end(self) -> int:
        """The first id after the block the next window starts in."""
        return (self.blocks[self.i][0] + 1) * BLOCK_IDS

    def peek(self, size: int) -> tuple[int, int]:
        block, rows = self.blocks[self.i]
        end = (block + 1) * BLOCK_IDS
        left_in_block = rows * (end - self.lo) / BLOCK_IDS
        if left_in_block > size:
            return self.lo, min(end, self.lo + max(1, int(size * BLOCK_IDS / rows)))
        estimate, hi, j = left_in_block, end, self.i + 1
        contiguous_hi: int | None = None  # where the window ends if it must not span a gap
        while j < len(self.blocks):
            nxt, nxt_rows = self.blocks[j]
            if nxt != self.blocks[j - 1][0] + 1:
                if not self._sparse((nxt + 1) * BLOCK_IDS - self.lo, estimate + nxt_rows):
                    break
                contiguous_hi = hi if contiguous_hi is None else contiguous_hi
            if estimate + nxt_rows > size:  # the rest of the size, cut inside that block
                hi, estimate = nxt * BLOCK_IDS + int((size - estimate) * BLOCK_IDS / nxt_rows), size
                break
            estimate, hi, j = estimate + nxt_rows, (nxt + 1) * BLOCK_IDS, j + 1
        if contiguous_hi is not None and not self._sparse(hi - self.lo, estimate):
            return self.lo, contiguous_hi  # read by ids after all: never the ids of a gap
        return self.lo, hi

    def advance(self, hi: int) -> None:
        """Everything below `hi` is done: move on to the next due block at or after it.

        A block is walked to its end (or to where an empty window found no further due row:
        `Chunk.resume_at`), never cut short on the plan's count of it: rows that became due
        since the plan are in it too."""
        self.lo = hi
        if hi > MAX_ID:  # past the last id a bigint holds
            self.i = len(self.blocks)
        while self.i < len(self.blocks) and (self.blocks[self.i][0] + 1) * BLOCK_IDS <= hi:
            self.i += 1
        if self.i < len(self.blocks):
            self.lo = max(hi, self.blocks[self.i][0] * BLOCK_IDS)

    def estimate(self, lo: int, hi: int) -> float:
        """Due rows the plan counted in [lo, hi) (spread evenly inside each block)."""
        rows, j = 0.0, self.i
        while j < len(self.blocks) and self.blocks[j][0] * BLOCK_IDS < hi:
            block, n = self.blocks[j]
            start = block * BLOCK_IDS
            overlap = min(hi, start + BLOCK_IDS) - max(lo, start)
            rows += n * max(overlap, 0) / BLOCK_IDS
            j += 1
        return rows

    def sparse(self, lo: int, hi: int) -> bool:
        """Is [lo, hi) cheaper to clean through the policies' arms than by its ids?

        By ids, a window reads every row in it. Through the arms it reads the arms' index
        entries (all of them: `arm_rows`, about 1/20 of a row's cost each) and then only its
        due rows (about 4 times a sequential row each, being scattered: PostgreSQL's
        `random_page_cost` against `seq_page_cost`). Without the arms'
        indexes (`arm_rows` None), and for a window within one block, it goes by ids."""
        return self._sparse(hi - lo, self.estimate(lo, hi))

    def _sparse(self, ids: int, rows: float) -> bool:
        if self.arm_rows is None or ids <= BLOCK_IDS:  # a block's rows are cheap to read
            return False
        return ids > self.arm_rows / INDEX_ENTRIES_PER_ROW + 4 * rows
