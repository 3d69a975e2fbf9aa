-- tapgate ledger, schema version 2: views finance reads in SQL (docs/postgres.md shows the
-- psql queries). They read the tables of version 1 and change nothing.

-- Fare revenue per operator per UTC day: fares card → operator:<id> less fares undone
-- operator:<id> → card (a limited credit), from the postings.
CREATE VIEW revenue_per_operator_day AS
SELECT operator,
       day,
       sum(fares_minor)  AS fares_minor,
       sum(undone_minor) AS undone_minor,
       sum(fares_minor) - sum(undone_minor) AS revenue_minor,
       sum(taps)         AS taps
FROM (
    SELECT substr(to_account, 10) AS operator,
           (to_timestamp(time_ms / 1000.0) AT TIME ZONE 'UTC')::date AS day,
           amount_minor AS fares_minor, 0::bigint AS undone_minor, 1 AS taps
    FROM postings WHERE to_account LIKE 'operator:%'
    UNION ALL
    SELECT substr(from_account, 10),
           (to_timestamp(time_ms / 1000.0) AT TIME ZONE 'UTC')::date,
           0, amount_minor, 0
    FROM postings WHERE from_account LIKE 'operator:%'
) AS moves
GROUP BY operator, day;

-- What each franchise owes per UTC day: its offline loads onto cards (franchise:<id> → card)
-- less what it paid us (→ franchise:<id>); its `account_balances` row is the running total.
CREATE VIEW settlement_per_franchise_day AS
SELECT franchise,
       day,
       sum(loads_minor)    AS loads_minor,
       sum(payments_minor) AS payments_minor,
       sum(loads_minor) - sum(payments_minor) AS owed_minor,
       sum(loads)          AS loads
FROM (
    SELECT substr(from_account, 11) AS franchise,
           (to_timestamp(time_ms / 1000.0) AT TIME ZONE 'UTC')::date AS day,
           amount_minor AS loads_minor, 0::bigint AS payments_minor, 1 AS loads
    FROM postings WHERE from_account LIKE 'franchise:%'
    UNION ALL
    SELECT substr(to_account, 11),
           (to_timestamp(time_ms / 1000.0) AT TIME ZONE 'UTC')::date,
           0, amount_minor, 0
    FROM postings WHERE to_account LIKE 'franchise:%'
) AS moves
GROUP BY franchise, day;

-- Every card against what it proved, with the cause of a difference, in the order
-- `tapgate charging reconcile` decides it: clone (blocked as one), pending_load,
-- counter_gap, uncleared, mismatch — or balanced.
CREATE VIEW reconciliation AS
SELECT c.uid AS card_uid,
       coalesce(b.balance_minor, 0) AS ledger_balance_minor,
       (c.record->>'booked_balance_minor')::bigint AS card_balance_minor,
       (c.record->>'booked_through_tmc')::bigint AS booked_through_tmc,
       (c.record->>'last_tmc')::bigint AS last_tmc,
       CASE
         WHEN (c.record->>'blocked')::boolean
              AND coalesce(c.record->>'block_reason', '') LIKE 'clone suspected%' THEN 'clone'
         WHEN EXISTS (SELECT 1 FROM load_intents i
                      WHERE i.uid = c.uid AND i.state = 'authorised') THEN 'pending_load'
         WHEN jsonb_array_length(coalesce(c.record->'booked_above', '[]'::jsonb)) > 0
              THEN 'counter_gap'
         WHEN (c.record->>'last_tmc')::bigint > (c.record->>'booked_through_tmc')::bigint
              THEN 'uncleared'
         WHEN coalesce((c.record->>'booked_balance_minor')::bigint, 0)
              = coalesce(b.balance_minor, 0) THEN 'balanced'
         ELSE 'mismatch'
       END AS cause
FROM cards c
LEFT JOIN account_balances b ON b.account = 'card:' || c.uid;

-- The reconciliation causes counted (what finance looks at first).
CREATE VIEW reconciliation_causes AS
SELECT cause, count(*) AS cards,
       sum(ledger_balance_minor - coalesce(card_balance_minor, 0)) AS difference_minor
FROM reconciliation GROUP BY cause;
