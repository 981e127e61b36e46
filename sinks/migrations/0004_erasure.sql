-- Suppressions (`suppress: true` forgets) kept where they never expire: every sink loads them at
-- start, so they outlive the erasures topic's retention. One row per (project, user|device, id).
CREATE TABLE IF NOT EXISTS suppressions (
    project String,
    kind String,
    id String,
    forget_id String,
    since_ms UInt64
) ENGINE = ReplacingMergeTree
ORDER BY (project, kind, id);

-- The subject is kept as a keyed HMAC (MILLIMETRIC_FORGET_AUDIT_KEY): a plain SHA-256 of an
-- e-mail-like id is reversed by hashing guesses. The old column goes, with its hashes. One
-- statement (18.16 has no ADD COLUMN IF NOT EXISTS), so it applies whole or not at all.
ALTER TABLE forget_audit
    ADD COLUMN subject_hmac String,
    ADD COLUMN reason String,
    ADD COLUMN attempts UInt32,
    DROP COLUMN subject_sha256
