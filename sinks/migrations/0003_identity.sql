-- Identity links learned from $identify events, with first/last seen and the latest traits.
CREATE TABLE IF NOT EXISTS identities (
    project $LC_STRING,
    user_id String,
    anonymous_id String,
    first_seen AggregateFunction(min, $TIME),
    last_seen AggregateFunction(max, $TIME),
    traits AggregateFunction(argMax, String, $TIME)
) ENGINE = AggregatingMergeTree
ORDER BY (project, user_id, anonymous_id);

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

-- One row per forget and state; the latest version wins. It holds no personal data: the
-- subject is kept only as a SHA-256 of `project:subject`, enough to answer "was this person's
-- request carried out?" for someone who already knows the id, and nothing more.
CREATE TABLE IF NOT EXISTS forget_audit (
    forget_id String,
    project String,
    subject_sha256 String,
    status String,
    requested_at_ms UInt64,
    completed_at_ms UInt64,
    anonymous_ids UInt32,
    events_deleted UInt64,
    sessions_deleted UInt64,
    identities_deleted UInt64,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY forget_id
