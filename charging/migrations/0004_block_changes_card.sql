-- tapgate ledger, schema version 4: a card's block changes by card.
-- The cardholder's card page and the console ask, every 2 seconds while the page is open, for
-- the card's latest block change (the blocklist version whose reach they show). Without an
-- index that is a scan of every change ever made; with this one it is one probe, read
-- backwards from the card's highest version.

CREATE INDEX block_changes_card ON block_changes (card_uid, version);
