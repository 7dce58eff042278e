//! The embedded SQLite datastore: one file in `data_dir`, WAL journal, full fsync.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use lanyard_proto::{Selector, SpiffeId};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use super::{
    AgentRecord, AttestRefusal, Ban, Banned, DataStore, Entry, StoreError, StoreResult,
    StoredBundle, StoredToken,
};

/// The SQLite implementation of [`DataStore`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A CA must not forget a used join token after a power cut.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    /// A transaction that takes the write lock at once (`BEGIN IMMEDIATE`). A deferred
    /// one that reads first and writes later fails with SQLITE_BUSY, without waiting,
    /// when another connection wrote in between; this one waits its turn instead.
    async fn write_tx(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn to_json(items: impl IntoIterator<Item = String>) -> String {
    serde_json::to_string(&items.into_iter().collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into())
}

fn selectors_json(selectors: &[Selector]) -> String {
    to_json(selectors.iter().map(|s| s.to_string()))
}

fn parse_json_list(raw: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("list {raw:?}: {e}")))
}

fn parse_selectors(raw: &str) -> StoreResult<Vec<Selector>> {
    parse_json_list(raw)?
        .iter()
        .map(|s| Selector::parse(s).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect()
}

fn parse_id(raw: &str) -> StoreResult<SpiffeId> {
    SpiffeId::parse(raw).map_err(|e| StoreError::Corrupt(format!("{raw:?}: {e}")))
}

fn entry_from_row(row: &SqliteRow) -> StoreResult<Entry> {
    Ok(Entry {
        id: row.try_get("id")?,
        spiffe_id: parse_id(row.try_get("spiffe_id")?)?,
        parent_id: parse_id(row.try_get("parent_id")?)?,
        selectors: parse_selectors(row.try_get("selectors")?)?,
        x509_svid_ttl: u32::try_from(row.try_get::<i64, _>("x509_svid_ttl")?)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        dns_names: parse_json_list(row.try_get("dns_names")?)?,
        hint: row.try_get("hint")?,
        created_at: row.try_get("created_at")?,
        revision_number: row.try_get("revision_number")?,
    })
}

fn agent_from_row(row: &SqliteRow) -> StoreResult<AgentRecord> {
    Ok(AgentRecord {
        spiffe_id: parse_id(row.try_get("spiffe_id")?)?,
        attestation_type: row.try_get("attestation_type")?,
        selectors: parse_selectors(row.try_get("selectors")?)?,
        serial: row.try_get("serial")?,
        previous_serial: row.try_get("previous_serial")?,
        expires_at: row.try_get("expires_at")?,
        attested_at: row.try_get("attested_at")?,
    })
}

fn ban_from_row(row: &SqliteRow) -> StoreResult<Ban> {
    Ok(Ban {
        spiffe_id: parse_id(row.try_get("spiffe_id")?)?,
        banned_at: row.try_get("banned_at")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

async fn insert_entry<'c, E>(exec: E, e: &Entry) -> StoreResult<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let result = sqlx::query(
        "INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_svid_ttl, dns_names, hint, created_at, revision_number)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&e.id)
    .bind(e.spiffe_id.as_str())
    .bind(e.parent_id.as_str())
    .bind(selectors_json(&e.selectors))
    .bind(i64::from(e.x509_svid_ttl))
    .bind(to_json(e.dns_names.iter().cloned()))
    .bind(&e.hint)
    .bind(e.created_at)
    .bind(e.revision_number)
    .execute(exec)
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(err) if is_unique_violation(&err) => Err(StoreError::DuplicateEntry {
            spiffe_id: e.spiffe_id.to_string(),
        }),
        Err(err) => Err(err.into()),
    }
}

/// `?, ?, ...` for `n` parameters.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// At most this many ids in one `IN (...)` (SQLite allows 32766 parameters; smaller
/// statements are cheaper to prepare).
const IN_CHUNK: usize = 500;

async fn delete_alias_entries<'c>(
    tx: &mut sqlx::Transaction<'c, sqlx::Sqlite>,
    where_token: &str,
    bind: &str,
) -> StoreResult<Vec<Entry>> {
    let rows = sqlx::query(&format!(
        "DELETE FROM entries WHERE id IN (SELECT alias_entry_id FROM join_tokens WHERE {where_token}) RETURNING *"
    ))
    .bind(bind)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter().map(entry_from_row).collect()
}

#[async_trait]
impl DataStore for SqliteStore {
    async fn create_entries(&self, entries: &[Entry]) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        for entry in entries {
            insert_entry(&mut *tx, entry).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn update_entry(&self, e: &Entry) -> StoreResult<Entry> {
        let result = sqlx::query(
            "UPDATE entries SET spiffe_id = ?, parent_id = ?, selectors = ?, x509_svid_ttl = ?, dns_names = ?,
                 hint = ?, revision_number = revision_number + 1
             WHERE id = ? RETURNING *",
        )
        .bind(e.spiffe_id.as_str())
        .bind(e.parent_id.as_str())
        .bind(selectors_json(&e.selectors))
        .bind(i64::from(e.x509_svid_ttl))
        .bind(to_json(e.dns_names.iter().cloned()))
        .bind(&e.hint)
        .bind(&e.id)
        .fetch_optional(&self.pool)
        .await;
        match result {
            Ok(Some(row)) => entry_from_row(&row),
            Ok(None) => Err(StoreError::EntryNotFound(e.id.clone())),
            Err(err) if is_unique_violation(&err) => Err(StoreError::DuplicateEntry {
                spiffe_id: e.spiffe_id.to_string(),
            }),
            Err(err) => Err(err.into()),
        }
    }

    async fn delete_entries(&self, ids: &[String]) -> StoreResult<Vec<Entry>> {
        let mut tx = self.write_tx().await?;
        let mut gone = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query("DELETE FROM entries WHERE id = ? RETURNING *")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            match row {
                Some(row) => gone.push(entry_from_row(&row)?),
                // Dropping the transaction rolls back the deletions made so far.
                None => return Err(StoreError::EntryNotFound(id.clone())),
            }
        }
        tx.commit().await?;
        Ok(gone)
    }

    async fn list_entries(&self) -> StoreResult<Vec<Entry>> {
        let rows = sqlx::query("SELECT * FROM entries ORDER BY created_at, rowid")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn entry_revisions(&self) -> StoreResult<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT id, revision_number FROM entries")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("revision_number")?)))
            .collect()
    }

    async fn get_entries(&self, ids: &[String]) -> StoreResult<Vec<Entry>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IN_CHUNK) {
            let sql = format!(
                "SELECT * FROM entries WHERE id IN ({}) ORDER BY created_at, rowid",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.pool).await? {
                out.push(entry_from_row(&row)?);
            }
        }
        Ok(out)
    }

    async fn create_join_token(
        &self,
        token: &StoredToken,
        alias_entry: Option<&Entry>,
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        if let Some(entry) = alias_entry {
            insert_entry(&mut *tx, entry).await?;
        }
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, token_id, expires_at, alias_entry_id, created_at)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&token.hash)
        .bind(&token.id)
        .bind(token.expires_at)
        .bind(alias_entry.map(|e| e.id.as_str()))
        .bind(token.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_attestation(
        &self,
        a: &AgentRecord,
        token_hash: Option<&str>,
        now: i64,
    ) -> StoreResult<Result<(), AttestRefusal>> {
        let mut tx = self.write_tx().await?;
        let ban = sqlx::query("SELECT banned_at FROM banned_agents WHERE spiffe_id = ?")
            .bind(a.spiffe_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = ban {
            return Ok(Err(AttestRefusal::Banned {
                since: row.try_get("banned_at")?,
            }));
        }
        if let Some(hash) = token_hash {
            // One UPDATE decides, so two agents racing with the same token cannot both win.
            let claimed = sqlx::query(
                "UPDATE join_tokens SET used_at = ?, used_by = ?
                 WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
            )
            .bind(now)
            .bind(a.spiffe_id.as_str())
            .bind(hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if claimed.rows_affected() != 1 {
                let row = sqlx::query("SELECT used_at FROM join_tokens WHERE token_hash = ?")
                    .bind(hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                return Ok(Err(match row {
                    None => AttestRefusal::TokenUnknown,
                    Some(row) if row.try_get::<Option<i64>, _>("used_at")?.is_some() => {
                        AttestRefusal::TokenUsed
                    }
                    Some(_) => AttestRefusal::TokenExpired,
                }));
            }
        }
        sqlx::query(
            "INSERT INTO agents (spiffe_id, attestation_type, selectors, serial, previous_serial, expires_at, attested_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (spiffe_id) DO UPDATE SET attestation_type = excluded.attestation_type,
                 selectors = excluded.selectors, serial = excluded.serial,
                 previous_serial = excluded.previous_serial, expires_at = excluded.expires_at,
                 attested_at = excluded.attested_at",
        )
        .bind(a.spiffe_id.as_str())
        .bind(&a.attestation_type)
        .bind(selectors_json(&a.selectors))
        .bind(&a.serial)
        .bind(&a.previous_serial)
        .bind(a.expires_at)
        .bind(a.attested_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn prune_join_tokens(
        &self,
        now: i64,
        forget_before: i64,
        limit: u32,
    ) -> StoreResult<Vec<Entry>> {
        let mut tx = self.write_tx().await?;
        // The alias entries of tokens that expired unused go at once (ON DELETE SET NULL
        // unlinks them from their token).
        let rows = sqlx::query(
            "DELETE FROM entries WHERE id IN (
                 SELECT alias_entry_id FROM join_tokens
                 WHERE expires_at <= ? AND used_at IS NULL AND alias_entry_id IS NOT NULL
                 LIMIT ?)
             RETURNING *",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let removed = rows
            .iter()
            .map(entry_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        // The tokens themselves are forgotten later: unused ones, and used ones whose
        // agent is gone (a used token's row only links its agent's alias entry).
        sqlx::query(
            "DELETE FROM join_tokens WHERE rowid IN (
                 SELECT rowid FROM join_tokens
                 WHERE expires_at <= ?
                   AND (used_at IS NULL OR used_by NOT IN (SELECT spiffe_id FROM agents))
                 LIMIT ?)",
        )
        .bind(forget_before)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn renew_agent(
        &self,
        id: &SpiffeId,
        presented: &str,
        serial: &str,
        expires_at: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE agents SET previous_serial = ?, serial = ?, expires_at = ?
             WHERE spiffe_id = ? AND (serial = ? OR (previous_serial = ? AND previous_serial != ''))",
        )
        .bind(presented)
        .bind(serial)
        .bind(expires_at)
        .bind(id.as_str())
        .bind(presented)
        .bind(presented)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn drop_previous_serial(&self, id: &SpiffeId, current: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE agents SET previous_serial = ''
             WHERE spiffe_id = ? AND serial = ? AND previous_serial != ''",
        )
        .bind(id.as_str())
        .bind(current)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_agent(&self, id: &SpiffeId) -> StoreResult<Option<AgentRecord>> {
        let row = sqlx::query("SELECT * FROM agents WHERE spiffe_id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let rows = sqlx::query("SELECT * FROM agents ORDER BY attested_at, spiffe_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn evict_agent(&self, id: &SpiffeId) -> StoreResult<Option<Vec<Entry>>> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query("DELETE FROM agents WHERE spiffe_id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let removed = delete_alias_entries(&mut tx, "used_by = ?", id.as_str()).await?;
        tx.commit().await?;
        Ok(Some(removed))
    }

    async fn ban_agent(&self, id: &SpiffeId, now: i64) -> StoreResult<Banned> {
        let mut tx = self.write_tx().await?;
        let inserted = sqlx::query(
            "INSERT INTO banned_agents (spiffe_id, banned_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query("DELETE FROM agents WHERE spiffe_id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        let removed = delete_alias_entries(&mut tx, "used_by = ?", id.as_str()).await?;
        tx.commit().await?;
        Ok(Banned {
            was_attested: deleted.rows_affected() > 0,
            already: inserted.rows_affected() == 0,
            removed,
        })
    }

    async fn unban_agent(&self, id: &SpiffeId) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM banned_agents WHERE spiffe_id = ?")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_ban(&self, id: &SpiffeId) -> StoreResult<Option<Ban>> {
        let row = sqlx::query("SELECT spiffe_id, banned_at FROM banned_agents WHERE spiffe_id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(ban_from_row).transpose()
    }

    async fn list_bans(&self) -> StoreResult<Vec<Ban>> {
        let rows = sqlx::query(
            "SELECT spiffe_id, banned_at FROM banned_agents ORDER BY banned_at, spiffe_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ban_from_row).collect()
    }

    async fn load_bundle(&self, trust_domain: &str) -> StoreResult<Option<StoredBundle>> {
        let row = sqlx::query("SELECT x509_der, sequence FROM bundles WHERE trust_domain = ?")
            .bind(trust_domain)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let der: Vec<u8> = row.try_get("x509_der")?;
        let certs = lanyard_proto::svid::split_der_chain(&der)
            .map_err(|e| StoreError::Corrupt(format!("bundle: {e}")))?
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        let sequence: i64 = row.try_get("sequence")?;
        Ok(Some(StoredBundle {
            x509_authorities: certs,
            sequence: u64::try_from(sequence).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        }))
    }

    async fn store_bundle(&self, trust_domain: &str, bundle: &StoredBundle) -> StoreResult<()> {
        let sequence =
            i64::try_from(bundle.sequence).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO bundles (trust_domain, x509_der, sequence) VALUES (?, ?, ?)
             ON CONFLICT (trust_domain) DO UPDATE SET x509_der = excluded.x509_der, sequence = excluded.sequence",
        )
        .bind(trust_domain)
        .bind(bundle.x509_authorities.concat())
        .bind(sequence)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn probe_write(&self, now: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO health_probe (id, written_at) VALUES (1, ?)
             ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("valid id")
    }

    fn entry(n: u32) -> Entry {
        Entry {
            id: format!("e{n}"),
            spiffe_id: id(&format!("spiffe://example.org/w{n}")),
            parent_id: id("spiffe://example.org/agent"),
            selectors: vec![Selector::parse("unix:uid:1000").expect("selector")],
            x509_svid_ttl: 0,
            dns_names: vec!["w.example.org".into()],
            hint: String::new(),
            created_at: i64::from(n),
            revision_number: 0,
        }
    }

    fn agent(name: &str, serial: &str) -> AgentRecord {
        AgentRecord {
            spiffe_id: id(&format!(
                "spiffe://example.org/lanyard/agent/join_token/{name}"
            )),
            attestation_type: "join_token".into(),
            selectors: vec![],
            serial: serial.into(),
            previous_serial: String::new(),
            expires_at: 10,
            attested_at: 1,
        }
    }

    fn token(hash: &str, expires_at: i64) -> StoredToken {
        StoredToken {
            hash: hash.into(),
            id: hash[..2].into(),
            expires_at,
            created_at: 0,
        }
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("ds.sqlite3"))
            .await
            .expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn entries_round_trip_and_survive_reopen() {
        let (dir, s) = store().await;
        s.create_entries(&[entry(1)]).await.expect("create");
        assert!(matches!(
            s.create_entries(&[Entry {
                id: "other".into(),
                ..entry(1)
            }])
            .await,
            Err(StoreError::DuplicateEntry { .. })
        ));
        let mut changed = entry(1);
        changed.hint = "web".into();
        let updated = s.update_entry(&changed).await.expect("update");
        assert_eq!(updated.revision_number, 1);
        assert_eq!(updated.hint, "web");
        assert_eq!(
            s.entry_revisions().await.expect("revisions"),
            vec![("e1".to_string(), 1)]
        );
        drop(s);
        let s = SqliteStore::open(&dir.path().join("ds.sqlite3"))
            .await
            .expect("reopen");
        assert_eq!(s.list_entries().await.expect("list"), vec![updated.clone()]);
        assert_eq!(
            s.get_entries(&["e1".into(), "nope".into()])
                .await
                .expect("get"),
            vec![updated.clone()]
        );
        assert_eq!(
            s.delete_entries(&["e1".into()]).await.expect("delete"),
            vec![updated]
        );
        assert!(matches!(
            s.delete_entries(&["e1".into()]).await,
            Err(StoreError::EntryNotFound(_))
        ));
    }

    #[tokio::test]
    async fn batches_are_all_or_nothing() {
        let (_dir, s) = store().await;
        s.create_entries(&[entry(1)]).await.expect("create");
        // The third entry duplicates the first: nothing of the batch is stored.
        let err = s
            .create_entries(&[
                entry(2),
                entry(3),
                Entry {
                    id: "dup".into(),
                    ..entry(1)
                },
            ])
            .await
            .expect_err("duplicate in batch");
        assert!(
            err.to_string().contains("spiffe://example.org/w1"),
            "names the entry: {err}"
        );
        assert_eq!(s.list_entries().await.expect("list").len(), 1);
        s.create_entries(&[entry(2), entry(3)])
            .await
            .expect("batch");
        // Deleting a missing id among present ones deletes none of them.
        let err = s
            .delete_entries(&["e2".into(), "missing".into(), "e3".into()])
            .await
            .expect_err("missing id");
        assert!(matches!(err, StoreError::EntryNotFound(ref id) if id == "missing"));
        assert_eq!(s.list_entries().await.expect("list").len(), 3);
        assert_eq!(
            s.delete_entries(&["e2".into(), "e3".into()])
                .await
                .expect("delete")
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn join_token_is_single_use_and_expires() {
        let (_dir, s) = store().await;
        let a = agent("t1", "ab");
        let alias = entry(2);
        s.create_join_token(&token("aa11", 100), Some(&alias))
            .await
            .expect("create");
        assert_eq!(
            s.list_entries().await.expect("list"),
            vec![alias.clone()],
            "alias entry stored with the token"
        );
        assert_eq!(
            s.record_attestation(&a, Some("aa11"), 50)
                .await
                .expect("use"),
            Ok(())
        );
        assert_eq!(
            s.get_agent(&a.spiffe_id).await.expect("get"),
            Some(a.clone())
        );
        assert_eq!(
            s.record_attestation(&agent("t2", "cd"), Some("aa11"), 51)
                .await
                .expect("use"),
            Err(AttestRefusal::TokenUsed)
        );
        assert_eq!(
            s.record_attestation(&agent("t3", "cd"), Some("ffff"), 51)
                .await
                .expect("use"),
            Err(AttestRefusal::TokenUnknown)
        );
        s.create_join_token(&token("bb22", 100), None)
            .await
            .expect("create");
        assert_eq!(
            s.record_attestation(&agent("t4", "cd"), Some("bb22"), 100)
                .await
                .expect("use"),
            Err(AttestRefusal::TokenExpired)
        );
        assert_eq!(
            s.list_agents().await.expect("list").len(),
            1,
            "refusals store nothing"
        );
    }

    #[tokio::test]
    async fn pruning_removes_expired_unused_tokens_with_their_alias_entries() {
        let (_dir, s) = store().await;
        for n in 0..5u32 {
            s.create_join_token(&token(&format!("{n:02}aa"), 100), Some(&entry(n)))
                .await
                .expect("create");
        }
        // One token is used: its alias stays with its agent.
        let used_by = agent("used", "01");
        s.record_attestation(&used_by, Some("00aa"), 50)
            .await
            .expect("attest")
            .expect("accepted");
        assert!(
            s.prune_join_tokens(99, 0, 10)
                .await
                .expect("prune")
                .is_empty()
        );
        // Small batches: two at a time.
        assert_eq!(
            s.prune_join_tokens(100, 0, 2).await.expect("prune").len(),
            2
        );
        assert_eq!(
            s.prune_join_tokens(100, 0, 2).await.expect("prune").len(),
            2
        );
        assert!(
            s.prune_join_tokens(100, 0, 2)
                .await
                .expect("prune")
                .is_empty()
        );
        // Until they are forgotten, expired tokens still say so.
        assert_eq!(
            s.record_attestation(&agent("late", "03"), Some("01aa"), 150)
                .await
                .expect("attest"),
            Err(AttestRefusal::TokenExpired)
        );
        let left = s.list_entries().await.expect("list");
        assert_eq!(
            left.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["e0"]
        );
        // Evicting the agent removes its alias entry; the expired used token goes next.
        let removed = s.evict_agent(&used_by.spiffe_id).await.expect("evict");
        assert_eq!(removed.map(|r| r.len()), Some(1));
        assert!(s.list_entries().await.expect("list").is_empty());
        s.prune_join_tokens(200, 101, 10).await.expect("prune");
        assert_eq!(
            s.record_attestation(&agent("late", "03"), Some("01aa"), 250)
                .await
                .expect("attest"),
            Err(AttestRefusal::TokenUnknown),
            "forgotten"
        );
        assert_eq!(
            s.record_attestation(&agent("again", "02"), Some("00aa"), 50)
                .await
                .expect("attest"),
            Err(AttestRefusal::TokenUnknown),
            "the pruned used token is gone"
        );
    }

    #[tokio::test]
    async fn renewal_accepts_the_previous_serial_only_until_the_current_one_is_used() {
        let (_dir, s) = store().await;
        let a = agent("x", "ab");
        s.record_attestation(&a, None, 1)
            .await
            .expect("attest")
            .expect("ok");
        assert!(
            s.renew_agent(&a.spiffe_id, "ab", "cd", 20)
                .await
                .expect("renew")
        );
        // The reply may have been lost: the old SVID renews again while "cd" is unused.
        assert!(
            s.renew_agent(&a.spiffe_id, "ab", "ef", 30)
                .await
                .expect("renew")
        );
        let now = s
            .get_agent(&a.spiffe_id)
            .await
            .expect("get")
            .expect("agent");
        assert_eq!(
            (now.serial.as_str(), now.previous_serial.as_str()),
            ("ef", "ab")
        );
        // "cd" was superseded before it was ever used.
        assert!(
            !s.renew_agent(&a.spiffe_id, "cd", "zz", 30)
                .await
                .expect("renew")
        );
        // Once "ef" is used, "ab" is dropped and cannot renew (and lock "ef" out).
        s.drop_previous_serial(&a.spiffe_id, "ef")
            .await
            .expect("drop");
        assert!(
            !s.renew_agent(&a.spiffe_id, "ab", "gh", 40)
                .await
                .expect("renew")
        );
        assert!(
            !s.renew_agent(&a.spiffe_id, "99", "aa", 40)
                .await
                .expect("renew")
        );
        assert!(
            s.renew_agent(&a.spiffe_id, "ef", "ij", 50)
                .await
                .expect("renew")
        );
        assert!(s.evict_agent(&a.spiffe_id).await.expect("evict").is_some());
        assert!(
            !s.renew_agent(&a.spiffe_id, "ij", "bb", 50)
                .await
                .expect("renew"),
            "an evicted agent stays evicted"
        );
        assert_eq!(s.evict_agent(&a.spiffe_id).await.expect("evict"), None);
        assert_eq!(s.list_agents().await.expect("list"), vec![]);
        assert_eq!(s.load_bundle("example.org").await.expect("load"), None);
        s.probe_write(5).await.expect("probe");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_wait_for_each_other_instead_of_failing() {
        // Each attestation reads (bans) before it writes; a write of another connection
        // in between must make it wait, never fail with "database is locked".
        let (_dir, s) = store().await;
        let s = std::sync::Arc::new(s);
        for n in 0..40u32 {
            let t = StoredToken {
                hash: format!("hash{n}"),
                id: format!("id{n}"),
                expires_at: 1000,
                created_at: 0,
            };
            s.create_join_token(&t, None).await.expect("token");
        }
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..40u32 {
            let (a, b, c) = (s.clone(), s.clone(), s.clone());
            tasks.spawn(async move {
                a.record_attestation(
                    &agent(&format!("a{n}"), "01"),
                    Some(&format!("hash{n}")),
                    10,
                )
                .await
                .map(|r| r.expect("accepted"))
            });
            tasks.spawn(async move { b.probe_write(i64::from(n)).await });
            tasks.spawn(async move { c.prune_join_tokens(10, 0, 10).await.map(|_| ()) });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("task").expect("no writer fails");
        }
        assert_eq!(s.list_agents().await.expect("agents").len(), 40);
    }

    #[tokio::test]
    async fn bans_evict_and_refuse_attestation_until_lifted() {
        let (_dir, s) = store().await;
        let a = agent("b", "01");
        s.create_join_token(&token("cc33", 100), Some(&entry(7)))
            .await
            .expect("token");
        s.record_attestation(&a, Some("cc33"), 10)
            .await
            .expect("attest")
            .expect("ok");
        let banned = s.ban_agent(&a.spiffe_id, 20).await.expect("ban");
        assert!(banned.was_attested && !banned.already);
        assert_eq!(banned.removed.len(), 1, "the token's alias entry goes too");
        assert_eq!(s.get_agent(&a.spiffe_id).await.expect("get"), None);
        assert_eq!(
            s.get_ban(&a.spiffe_id)
                .await
                .expect("ban")
                .map(|b| b.banned_at),
            Some(20)
        );
        assert_eq!(
            s.record_attestation(&a, None, 30).await.expect("attest"),
            Err(AttestRefusal::Banned { since: 20 })
        );
        let again = s.ban_agent(&a.spiffe_id, 40).await.expect("ban");
        assert!(again.already && !again.was_attested);
        assert_eq!(s.list_bans().await.expect("bans").len(), 1);
        assert!(s.unban_agent(&a.spiffe_id).await.expect("unban"));
        assert!(!s.unban_agent(&a.spiffe_id).await.expect("unban"));
        assert_eq!(
            s.record_attestation(&a, None, 50).await.expect("attest"),
            Ok(())
        );
    }
}
