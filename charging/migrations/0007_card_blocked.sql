-- tapgate ledger, schema version 7: the blocked cards.
-- The signed blocklist's snapshot and the operator's console list the blocked cards. Without an
-- index they read every card in the ledger at every request; with this one they read the
-- blocked cards only: `SELECT … FROM cards c WHERE c.blocked ORDER BY c.uid`, the partial index.
-- The block state stays in the card's record (where the ledger writes it); `blocked` is computed
-- from it by the database (as `owner`, migration 6). A write that rewrites the record without
-- changing the block state (a load's day total) changes no indexed column and stays a HOT
-- update: only a block or an unblock does.

ALTER TABLE cards ADD COLUMN blocked boolean
    GENERATED ALWAYS AS (coalesce((record->>'blocked')::boolean, false)) STORED;
CREATE INDEX cards_blocked ON cards (uid) WHERE blocked;
