-- tapgate ledger, schema version 6: cards by owner.
-- The cardholder's cards page lists the cards of the signed-in cardholder. Without an index it
-- read every card in the ledger at every view; with this one it reads the holder's cards only:
-- `SELECT uid FROM cards WHERE owner = $1 ORDER BY uid`, one range of the index.
-- The owner stays in the card's record (where the ledger writes it); `owner` is computed from it
-- by the database. An index on the column rather than on an expression over `record` keeps a
-- write that rewrites the record without changing the owner (a load's day total, a block) a HOT
-- update: only a changed owner changes an indexed column.

ALTER TABLE cards ADD COLUMN owner text GENERATED ALWAYS AS (record->>'owner') STORED;
CREATE INDEX cards_owner ON cards (owner, uid) WHERE owner IS NOT NULL;
