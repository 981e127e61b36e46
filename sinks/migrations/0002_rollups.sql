-- Aggregates kept by materialized views, idempotent by construction: every state is a set
-- (uniqExact of event_id, visitors, users) or an extremum (min, max, argMin, argMax), so a
-- redelivered or replayed row changes nothing. Query with the -Merge functions (README).

CREATE TABLE IF NOT EXISTS daily_rollup (
    project $LC_STRING,
    day Date,
    event $LC_STRING,
    source $LC_STRING,
    medium $LC_STRING,
    channel $LC_STRING,
    events AggregateFunction(uniqExact, String),
    visitors AggregateFunction(uniqExact, String),
    users AggregateFunction(uniqExactIf, String, UInt8)
) ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (project, day, event, source, medium, channel);

CREATE MATERIALIZED VIEW IF NOT EXISTS daily_rollup_mv TO daily_rollup AS
SELECT
    project,
    toDate(timestamp) AS day,
    event,
    source,
    medium,
    channel,
    uniqExactState(event_id) AS events,
    uniqExactState(anonymous_id) AS visitors,
    uniqExactIfState(user_id, user_id != '') AS users
FROM events
GROUP BY project, day, event, source, medium, channel;

CREATE TABLE IF NOT EXISTS sessions (
    project $LC_STRING,
    session_id String,
    anonymous_id AggregateFunction(any, String),
    user_id AggregateFunction(max, String),
    start AggregateFunction(min, $TIME),
    end AggregateFunction(max, $TIME),
    events AggregateFunction(uniqExact, String),
    entry_url AggregateFunction(argMin, String, $TIME),
    entry_source AggregateFunction(argMin, String, $TIME),
    entry_medium AggregateFunction(argMin, String, $TIME),
    entry_campaign AggregateFunction(argMin, String, $TIME),
    entry_channel AggregateFunction(argMin, String, $TIME),
    entry_click_id AggregateFunction(argMin, String, $TIME),
    entry_click_id_network AggregateFunction(argMin, String, $TIME),
    exit_path AggregateFunction(argMax, String, $TIME)
) ENGINE = AggregatingMergeTree
ORDER BY (project, session_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS sessions_mv TO sessions AS
SELECT
    project,
    session_id,
    anyState(anonymous_id) AS anonymous_id,
    maxState(user_id) AS user_id,
    minState(timestamp) AS start,
    maxState(timestamp) AS end,
    uniqExactState(event_id) AS events,
    argMinState(url, timestamp) AS entry_url,
    argMinState(source, timestamp) AS entry_source,
    argMinState(medium, timestamp) AS entry_medium,
    argMinState(campaign, timestamp) AS entry_campaign,
    argMinState(channel, timestamp) AS entry_channel,
    argMinState(click_id, timestamp) AS entry_click_id,
    argMinState(click_id_network, timestamp) AS entry_click_id_network,
    argMaxState(path, timestamp) AS exit_path
FROM events
GROUP BY project, session_id
