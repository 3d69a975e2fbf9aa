-- tapgate ledger, schema version 3: a card shadow's counters in their own columns.
-- Clearing changes, at every tap, only the counter and balance the card reported last and the
-- counter and balance booked through. They are columns now, updated in place by one multi-row
-- UPDATE per batch instead of a whole JSON document rewritten per card; `record` keeps the rest
-- of the shadow (block state, owner, day totals, counters booked above a gap, PIN). A card's
-- shadow is its columns and its record together.

ALTER TABLE cards
    ADD COLUMN last_tmc                    bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_reported_balance_minor integer,
    ADD COLUMN booked_through_tmc          bigint NOT NULL DEFAULT 0,
    ADD COLUMN booked_balance_minor        integer;

-- The shadows written by version 2 (whole records) split: their counters to the columns, the
-- rest left in the record.
UPDATE cards SET
    last_tmc = coalesce((record->>'last_tmc')::bigint, 0),
    last_reported_balance_minor = (record->>'last_reported_balance_minor')::integer,
    booked_through_tmc = coalesce((record->>'booked_through_tmc')::bigint, 0),
    booked_balance_minor = (record->>'booked_balance_minor')::integer,
    record = record - ARRAY['last_tmc', 'last_reported_balance_minor',
                            'booked_through_tmc', 'booked_balance_minor'];

ALTER TABLE cards
    ALTER COLUMN last_tmc DROP DEFAULT,
    ALTER COLUMN booked_through_tmc DROP DEFAULT,
    ADD CONSTRAINT cards_counters CHECK (last_tmc BETWEEN 0 AND 4294967295
                                         AND booked_through_tmc BETWEEN 0 AND 4294967295);

-- Room on each page for a row's next version: an update that changes no indexed column stays
-- on its page (a HOT update) and adds no index entry.
ALTER TABLE cards SET (fillfactor = 70);

-- The reconciliation reads the counters from their columns (the same columns as version 2).
CREATE OR REPLACE VIEW reconciliation AS
SELECT c.uid AS card_uid,
       coalesce(b.balance_minor, 0) AS ledger_balance_minor,
       c.booked_balance_minor::bigint AS card_balance_minor,
       c.booked_through_tmc AS booked_through_tmc,
       c.last_tmc AS last_tmc,
       CASE
         WHEN (c.record->>'blocked')::boolean
              AND coalesce(c.record->>'block_reason', '') LIKE 'clone suspected%' THEN 'clone'
         WHEN EXISTS (SELECT 1 FROM load_intents i
                      WHERE i.uid = c.uid AND i.state = 'authorised') THEN 'pending_load'
         WHEN jsonb_array_length(coalesce(c.record->'booked_above', '[]'::jsonb)) > 0
              THEN 'counter_gap'
         WHEN c.last_tmc > c.booked_through_tmc THEN 'uncleared'
         WHEN coalesce(c.booked_balance_minor::bigint, 0)
              = coalesce(b.balance_minor, 0) THEN 'balanced'
         ELSE 'mismatch'
       END AS cause
FROM cards c
LEFT JOIN account_balances b ON b.account = 'card:' || c.uid;
