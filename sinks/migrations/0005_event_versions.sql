-- Re-derived rows replace the old ones: `version` is 0 for a row the live processor derived and
-- the replay's start (epoch ms) for one `millimetric replay` re-derived; the events table keeps
-- the highest (ReplacingMergeTree(version)). An engine cannot be altered, so the table is rebuilt:
-- the views go first (the copy must not feed the aggregates again), a new table takes the name
-- `events` in one RENAME (an insert lands in the old or the new one, never nowhere), the old
-- rows are copied, the views come back as 0002/0003 made them. Run it from one sink: another
-- sink's insert made while the views are gone reaches `events` but not the aggregates.
DROP TABLE IF EXISTS daily_rollup_mv;
DROP TABLE IF EXISTS sessions_mv;
DROP TABLE IF EXISTS identities_mv;

CREATE TABLE IF NOT EXISTS events_versioned (
    project $LC_STRING,
    event_id String,
    type $LC_STRING,
    event $LC_STRING,
    timestamp $TIME,
    received_at $TIME,
    anonymous_id String,
    user_id String,
    session_id String,
    url String$ZSTD,
    path String,
    referrer String$ZSTD,
    properties String$ZSTD,
    source $LC_STRING,
    medium $LC_STRING,
    campaign String,
    channel $LC_STRING,
    source_confidence Float32,
    source_rule_id $LC_STRING,
    click_id String,
    click_id_network $LC_STRING,
    classifier_version $LC_STRING,
    country $LC_STRING,
    device_type $LC_STRING,
    browser $LC_STRING,
    os $LC_STRING,
    is_bot UInt8,
    ip_hash String$TIME_MS_COLUMNS,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(timestamp)
ORDER BY (project, toDate(timestamp), event, event_id);

-- Skipped by the runner when `events` has its version column already (sinks/migrate.py).
RENAME TABLE events TO events_unversioned, events_versioned TO events;

INSERT INTO events SELECT *, toUInt64(0) FROM events_unversioned;

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
GROUP BY project, session_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS identities_mv TO identities AS
SELECT
    project,
    user_id,
    anonymous_id,
    minState(timestamp) AS first_seen,
    maxState(timestamp) AS last_seen,
    argMaxState(properties, timestamp) AS traits
FROM events
WHERE type = 'identify'
GROUP BY project, user_id, anonymous_id;

DROP TABLE IF EXISTS events_unversioned;
DROP TABLE IF EXISTS events_versioned
