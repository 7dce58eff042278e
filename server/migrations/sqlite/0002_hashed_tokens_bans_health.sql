-- Join tokens are stored as their SHA-256 digest, never in plaintext: an unused token is
-- a secret, and the datastore file must not give it to whoever can read it. Tokens an
-- earlier version stored in plaintext cannot be hashed in SQL and are dropped: unused
-- ones are short-lived and are issued again; used ones only served to answer "already
-- used" (they are refused as unknown now). Their alias entries stay, as plain entries.
DROP TABLE join_tokens;
CREATE TABLE join_tokens (
    token_hash     TEXT PRIMARY KEY NOT NULL,
    -- The first 32 hex digits of token_hash: names the agent and its node selector.
    token_id       TEXT NOT NULL UNIQUE,
    expires_at     INTEGER NOT NULL,
    -- The node alias entry the token grants; it goes when the token expires unused or
    -- when the agent that used it is evicted or banned.
    alias_entry_id TEXT REFERENCES entries (id) ON DELETE SET NULL,
    created_at     INTEGER NOT NULL,
    used_at        INTEGER,
    used_by        TEXT
);
CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at);
CREATE INDEX join_tokens_used_by ON join_tokens (used_by);

-- Agent IDs that may not attest again (until unbanned).
CREATE TABLE banned_agents (
    spiffe_id TEXT PRIMARY KEY NOT NULL,
    banned_at INTEGER NOT NULL
);

-- One row the readiness probe rewrites every few seconds, to prove writes still work.
CREATE TABLE health_probe (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    written_at INTEGER NOT NULL
);
