-- tapgate ledger, schema version 1: everything the LMDB ledger holds, one table per database.
-- Keys and the columns constraints or finance's queries need are real columns; each record is
-- also kept whole as jsonb (the ledger's own serde form), so a field added to a record needs no
-- migration. Amounts are integer minor units (bigint); times are Unix milliseconds (bigint).

-- Account balances, kept beside the postings in the same transaction: they sum to zero. An
-- account's balance is the sum of its shards: a card's account has one (shard 0); an account
-- every load or tap moves (funding:card, operator:<id>) is spread over the connections' shards,
-- so concurrent transactions do not all update one row (which SERIALIZABLE would abort and
-- retry one after the other). `account_balances` sums them.
CREATE TABLE balances (
    account        text NOT NULL,
    shard          smallint NOT NULL,
    balance_minor  bigint NOT NULL,
    PRIMARY KEY (account, shard)
);

CREATE VIEW account_balances AS
SELECT account, sum(balance_minor)::bigint AS balance_minor
FROM balances GROUP BY account;

-- Every movement of value (double entry): from one account to another.
CREATE TABLE postings (
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms        bigint NOT NULL,
    from_account   text NOT NULL,
    to_account     text NOT NULL,
    amount_minor   bigint NOT NULL CHECK (amount_minor > 0),
    reference      text NOT NULL,
    CHECK (from_account <> to_account)
);
CREATE INDEX postings_reference ON postings (reference text_pattern_ops);
CREATE INDEX postings_time ON postings (time_ms);

-- Card shadows (counters booked once, what the card reported, block state, owner, PIN).
CREATE TABLE cards (
    uid            text PRIMARY KEY CHECK (uid ~ '^[0-9A-F]{14}$'),
    record         jsonb NOT NULL
);

-- Cards with counters booked above a gap, and the gap's clock.
CREATE TABLE counter_gaps (
    uid            text PRIMARY KEY,
    from_tmc       bigint NOT NULL,
    since_ms       bigint NOT NULL,
    reported       boolean NOT NULL
);

-- Load intents (loads, reversals, payments, refunds) by (card, counter before, attempt): at
-- most one that is not voided per card counter, enforced by the database.
CREATE TABLE load_intents (
    uid            text NOT NULL,
    tmc_before     bigint NOT NULL,
    attempt        integer NOT NULL,
    state          text NOT NULL,
    kind           text NOT NULL,
    record         jsonb NOT NULL,
    PRIMARY KEY (uid, tmc_before, attempt)
);
CREATE UNIQUE INDEX load_intents_one_live ON load_intents (uid, tmc_before)
    WHERE state <> 'voided';

-- Idempotency answers (loads, clearing batches per gateway token, franchise grants, partner
-- orders, learned cards …), by key.
CREATE TABLE idempotency (
    key            text PRIMARY KEY,
    answer         jsonb NOT NULL
);

CREATE TABLE vouchers (
    code           text PRIMARY KEY,
    record         jsonb NOT NULL
);

-- The blocklist's numbered changes: one sequence, no gaps (ledger_sequences).
CREATE TABLE block_changes (
    version        bigint PRIMARY KEY,
    card_uid       text NOT NULL,
    action         text NOT NULL,
    reason         text NOT NULL,
    time_ms        bigint NOT NULL
);

-- Anomalies (clearing, the gap sweep), numbered from 1 without gaps.
CREATE TABLE anomalies (
    seq            bigint PRIMARY KEY,
    kind           text NOT NULL,
    card_uid       text NOT NULL,
    record         jsonb NOT NULL
);

-- The numbered series whose readers page by number (a later commit never holds a lower one).
CREATE TABLE ledger_sequences (
    name           text PRIMARY KEY,
    last           bigint NOT NULL
);
INSERT INTO ledger_sequences (name, last) VALUES ('block_changes', 0), ('anomalies', 0);

-- Loaded per (funding source, instrument, UTC day): the per-instrument daily limit.
CREATE TABLE funding_days (
    source         text NOT NULL,
    instrument     text NOT NULL,
    day            bigint NOT NULL,
    total_minor    bigint NOT NULL,
    PRIMARY KEY (source, instrument, day)
);

-- Funding instruments and the account each belongs to.
CREATE TABLE instruments (
    source         text NOT NULL,
    id             text NOT NULL,
    owner          text NOT NULL,
    record         jsonb NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX instruments_owner ON instruments (owner);

-- Merchants' payments; one per (merchant, order).
CREATE TABLE payments (
    id             text PRIMARY KEY,
    merchant       text NOT NULL,
    order_id       text NOT NULL,
    record         jsonb NOT NULL,
    UNIQUE (merchant, order_id)
);

-- A payment's notification to its merchant.
CREATE TABLE notifications (
    payment_id     text PRIMARY KEY,
    next_attempt_ms bigint NOT NULL,
    delivered      boolean NOT NULL,
    record         jsonb NOT NULL
);
CREATE INDEX notifications_due ON notifications (next_attempt_ms) WHERE NOT delivered;

-- Merchants' refunds; the uncollected ones by when they were made (the expiry sweep).
CREATE TABLE refunds (
    id             text PRIMARY KEY,
    state          text NOT NULL,
    created_ms     bigint NOT NULL,
    record         jsonb NOT NULL
);
CREATE INDEX refunds_uncollected ON refunds (created_ms, id) WHERE state = 'pending';
