-- Rollups packed a row per tenant and month (two arrays indexed by day of month) beside the
-- live daily layout, and the time PostgreSQL takes to produce the enterprise report's rollup
-- rows in each, server side (COPY to /dev/null: no transfer, no client).
--
-- On a seeded database (analytics-repo/README.md, "Weak points"):
--   createdb packed_exp
--   DATABASE_URL=postgres://postgres@127.0.0.1/packed_exp \
--     target/release/analytics-repo seed --rows 10000000 --tenants 1000 --days 730
--   PGOPTIONS='-c search_path=analytics' psql -d packed_exp -f docs/adr/measurements/0016-packed-rollups.sql
-- then run the two COPY statements at the end a few more times (\timing is on).

DROP TABLE IF EXISTS monthly_rollups;
CREATE TABLE monthly_rollups AS
SELECT m.tenant_id, m.month,
       array_agg(coalesce(d.events, 0) ORDER BY g) AS events,
       array_agg(coalesce(d.processing_time_sum, 0) ORDER BY g) AS sums
FROM (SELECT DISTINCT tenant_id, date_trunc('month', day)::date AS month FROM daily_rollups) m
CROSS JOIN generate_series(0, 30) g
LEFT JOIN daily_rollups d ON d.tenant_id = m.tenant_id AND d.day = m.month + g
     AND date_trunc('month', m.month + g) = m.month
GROUP BY m.tenant_id, m.month;
ALTER TABLE monthly_rollups ADD PRIMARY KEY (tenant_id, month) INCLUDE (events, sums);
VACUUM ANALYZE monthly_rollups;
VACUUM ANALYZE daily_rollups;
SELECT count(*) AS daily_rows, (SELECT count(*) FROM monthly_rollups) AS monthly_rows
FROM daily_rollups;
SELECT pg_size_pretty(pg_total_relation_size('daily_rollups')) AS daily,
       pg_size_pretty(pg_total_relation_size('monthly_rollups')) AS monthly;

\timing on
-- The live layout: ~140K rows (200 enterprise tenants, 700 days).
COPY (SELECT tenant_id, day, events, processing_time_sum FROM daily_rollups
      WHERE tenant_id = ANY(ARRAY(SELECT id FROM tenants WHERE plan = 'enterprise'))
        AND day >= current_date - 700) TO '/dev/null' (FORMAT binary);
-- Packed: ~5,000 rows.
COPY (SELECT tenant_id, month, events, sums FROM monthly_rollups
      WHERE tenant_id = ANY(ARRAY(SELECT id FROM tenants WHERE plan = 'enterprise'))
        AND month >= date_trunc('month', current_date - 700)::date) TO '/dev/null' (FORMAT binary);
