-- Registration entries. Selectors and DNS names are JSON arrays (sorted), since every
-- server keeps all entries in memory and matches there.
CREATE TABLE entries (
    id              TEXT PRIMARY KEY NOT NULL,
    spiffe_id       TEXT NOT NULL,
    parent_id       TEXT NOT NULL,
    selectors       TEXT NOT NULL,
    x509_svid_ttl   INTEGER NOT NULL DEFAULT 0,
    dns_names       TEXT NOT NULL DEFAULT '[]',
    hint            TEXT NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    revision_number INTEGER NOT NULL DEFAULT 0,
    UNIQUE (spiffe_id, parent_id, selectors)
);
CREATE INDEX entries_parent_id ON entries (parent_id);

-- Join tokens are single-use: a used token keeps its row (used_at set) so a second
-- attempt gets "already used" rather than "unknown".
CREATE TABLE join_tokens (
    token       TEXT PRIMARY KEY NOT NULL,
    expires_at  INTEGER NOT NULL,
    alias_id    TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     TEXT
);

-- Attested agents. `previous_serial` stays valid after a renewal until the old SVID
-- expires, so in-flight connections are not cut.
CREATE TABLE agents (
    spiffe_id        TEXT PRIMARY KEY NOT NULL,
    attestation_type TEXT NOT NULL,
    selectors        TEXT NOT NULL,
    serial           TEXT NOT NULL,
    previous_serial  TEXT NOT NULL DEFAULT '',
    expires_at       INTEGER NOT NULL,
    attested_at      INTEGER NOT NULL
);

-- The trust domain's X.509 roots: concatenated DER and a sequence that grows on change.
CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    x509_der     BLOB NOT NULL,
    sequence     INTEGER NOT NULL
);
