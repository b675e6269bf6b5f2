-- Room on every page for each of its rows to be rewritten once, on that page.
--
-- Marking a row sent changes `sent_at`, which the pending index's predicate names, so the
-- UPDATE is never HOT and writes a new version of the row. With the 10 % a fillfactor of
-- 90 leaves, a 1 KB row's new version does not fit on its page: it lands at the end of the
-- table, where the services insert, and the whole row goes to WAL again (about 1.4 KB of
-- WAL per mark). With the new version on the old one's page, PostgreSQL logs only the
-- bytes that changed (about 0.2 KB per mark) and the mark stays off the inserts' pages.
--
-- A page filled to 45 % still has room for every one of its rows to grow by the ~20
-- bytes of the mark. The price is table size: pending rows take about twice the space.
-- In delete mode rows are never rewritten, so `ALTER TABLE outbox SET (fillfactor = 90)`
-- takes that space back.
--
-- It applies to pages filled from now on; existing pages keep their rows where they are.

ALTER TABLE outbox SET (fillfactor = 45);
