-- tapgate ledger, schema version 5: a write that must change a known number of rows says so
-- in its own statement.
-- The ledger sends a transaction's last writes together with its COMMIT, in one round trip
-- (docs/postgres.md, "Round trips"), so it cannot look at a write's row count before the
-- COMMIT goes. A write that must move exactly the rows it read (a card's counters, a balance
-- shard, a stored answer, a locked intent) is sent as
--   WITH w AS (UPDATE … RETURNING 1) SELECT ledger_expect_rows('what', count(*), n) FROM w
-- and this function raises when the count is not n: the statement fails, so the transaction
-- is aborted and the COMMIT behind it rolls it back.

CREATE FUNCTION ledger_expect_rows(what text, got bigint, want bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF got <> want THEN
        RAISE EXCEPTION '%: % rows changed where % were expected', what, got, want
            USING ERRCODE = 'data_exception';
    END IF;
    RETURN got;
END
$$;
