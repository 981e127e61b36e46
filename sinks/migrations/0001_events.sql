-- Every event as it landed: the spec's fields plus what the server adds.
-- ReplacingMergeTree collapses a redelivered or replayed row (same sort key) at merge time;
-- queries that must be exact before a merge use FINAL or count distinct event_id.
-- Ordered by project and day first: every dashboard query filters on both.
CREATE TABLE IF NOT EXISTS events (
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
    ip_hash String$TIME_MS_COLUMNS
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (project, toDate(timestamp), event, event_id)
