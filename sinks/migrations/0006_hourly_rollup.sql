-- What /v1/stats reads, hour by hour, for any range of whole hours (days in UTC or any
-- whole-hour time zone are sums of hours). Exact under redelivery as daily_rollup is: every
-- state is a set, so a row seen twice changes nothing. The sets hold 64-bit hashes of the ids
-- (uniqExact of a String keeps 128-bit ones): merging them is what a read costs, and half the
-- width merged about 1.5x faster at 1 M events; two of 10 M distinct ids share a hash with
-- probability ~3e-6. migrate() fills it from the events stored before it (sinks/migrate.py);
-- a forget rebuilds the person's hours from the events that remain (sinks/erasure_executor.py).
CREATE TABLE IF NOT EXISTS hourly_rollup (
    project $LC_STRING,
    hour DateTime('UTC'),
    event $LC_STRING,
    events AggregateFunction(uniqExact, UInt64),
    visitors AggregateFunction(uniqExact, UInt64),
    users AggregateFunction(uniqExactIf, UInt64, UInt8)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (project, hour, event);

CREATE MATERIALIZED VIEW IF NOT EXISTS hourly_rollup_mv TO hourly_rollup AS
SELECT
    project,
    toStartOfHour(toDateTime(timestamp, 'UTC')) AS hour,
    event,
    uniqExactState(cityHash64(event_id)) AS events,
    uniqExactState(cityHash64(anonymous_id)) AS visitors,
    uniqExactIfState(cityHash64(user_id), user_id != '') AS users
FROM events
GROUP BY project, hour, event;
