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
    AgentRecord, DataStore, Entry, JoinToken, StoreError, StoreResult, StoredBundle, TokenUse,
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
        Err(err) if is_unique_violation(&err) => Err(StoreError::DuplicateEntry),
        Err(err) => Err(err.into()),
    }
}

#[async_trait]
impl DataStore for SqliteStore {
    async fn create_entry(&self, entry: &Entry) -> StoreResult<()> {
        insert_entry(&self.pool, entry).await
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
            Err(err) if is_unique_violation(&err) => Err(StoreError::DuplicateEntry),
            Err(err) => Err(err.into()),
        }
    }

    async fn delete_entry(&self, id: &str) -> StoreResult<Entry> {
        let row = sqlx::query("DELETE FROM entries WHERE id = ? RETURNING *")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => entry_from_row(&row),
            None => Err(StoreError::EntryNotFound(id.to_string())),
        }
    }

    async fn list_entries(&self) -> StoreResult<Vec<Entry>> {
        let rows = sqlx::query("SELECT * FROM entries ORDER BY created_at, rowid")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn create_join_token(
        &self,
        token: &JoinToken,
        alias_entry: Option<&Entry>,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO join_tokens (token, expires_at, alias_id, created_at) VALUES (?, ?, ?, strftime('%s','now'))")
            .bind(&token.token)
            .bind(token.expires_at)
            .bind(token.alias.as_ref().map(|a| a.as_str()).unwrap_or(""))
            .execute(&mut *tx)
            .await?;
        if let Some(entry) = alias_entry {
            insert_entry(&mut *tx, entry).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn use_join_token(
        &self,
        token: &str,
        agent_id: &SpiffeId,
        now: i64,
    ) -> StoreResult<TokenUse> {
        // One UPDATE decides, so two agents racing with the same token cannot both win.
        let claimed = sqlx::query(
            "UPDATE join_tokens SET used_at = ?, used_by = ?
             WHERE token = ? AND used_at IS NULL AND expires_at > ?
             RETURNING token, expires_at, alias_id",
        )
        .bind(now)
        .bind(agent_id.as_str())
        .bind(token)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = claimed {
            let alias: String = row.try_get("alias_id")?;
            return Ok(TokenUse::Accepted(JoinToken {
                token: row.try_get("token")?,
                expires_at: row.try_get("expires_at")?,
                alias: if alias.is_empty() {
                    None
                } else {
                    Some(parse_id(&alias)?)
                },
            }));
        }
        let row = sqlx::query("SELECT used_at FROM join_tokens WHERE token = ?")
            .bind(token)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => TokenUse::Unknown,
            Some(row) if row.try_get::<Option<i64>, _>("used_at")?.is_some() => {
                TokenUse::AlreadyUsed
            }
            Some(_) => TokenUse::Expired,
        })
    }

    async fn upsert_agent(&self, a: &AgentRecord) -> StoreResult<()> {
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
        .execute(&self.pool)
        .await?;
        Ok(())
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
             WHERE spiffe_id = ? AND (serial = ? OR previous_serial = ?)",
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

    async fn delete_agent(&self, id: &SpiffeId) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM agents WHERE spiffe_id = ?")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
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
        s.create_entry(&entry(1)).await.expect("create");
        assert!(matches!(
            s.create_entry(&Entry {
                id: "other".into(),
                ..entry(1)
            })
            .await,
            Err(StoreError::DuplicateEntry)
        ));
        let mut changed = entry(1);
        changed.hint = "web".into();
        let updated = s.update_entry(&changed).await.expect("update");
        assert_eq!(updated.revision_number, 1);
        assert_eq!(updated.hint, "web");
        drop(s);
        let s = SqliteStore::open(&dir.path().join("ds.sqlite3"))
            .await
            .expect("reopen");
        assert_eq!(s.list_entries().await.expect("list"), vec![updated.clone()]);
        assert_eq!(s.delete_entry("e1").await.expect("delete"), updated);
        assert!(matches!(
            s.delete_entry("e1").await,
            Err(StoreError::EntryNotFound(_))
        ));
    }

    #[tokio::test]
    async fn join_token_is_single_use_and_expires() {
        let (_dir, s) = store().await;
        let agent = id("spiffe://example.org/lanyard/agent/join_token/t1");
        let alias = entry(2);
        let tok = JoinToken {
            token: "t1".into(),
            expires_at: 100,
            alias: Some(alias.spiffe_id.clone()),
        };
        s.create_join_token(&tok, Some(&alias))
            .await
            .expect("create");
        assert_eq!(
            s.list_entries().await.expect("list").len(),
            1,
            "alias entry stored with the token"
        );
        assert_eq!(
            s.use_join_token("t1", &agent, 50).await.expect("use"),
            TokenUse::Accepted(tok)
        );
        assert_eq!(
            s.use_join_token("t1", &agent, 51).await.expect("use"),
            TokenUse::AlreadyUsed
        );
        assert_eq!(
            s.use_join_token("nope", &agent, 51).await.expect("use"),
            TokenUse::Unknown
        );
        let old = JoinToken {
            token: "t2".into(),
            expires_at: 100,
            alias: None,
        };
        s.create_join_token(&old, None).await.expect("create");
        assert_eq!(
            s.use_join_token("t2", &agent, 100).await.expect("use"),
            TokenUse::Expired
        );
    }

    #[tokio::test]
    async fn agents_and_bundle() {
        let (_dir, s) = store().await;
        let a = AgentRecord {
            spiffe_id: id("spiffe://example.org/lanyard/agent/join_token/x"),
            attestation_type: "join_token".into(),
            selectors: vec![],
            serial: "ab".into(),
            previous_serial: String::new(),
            expires_at: 10,
            attested_at: 1,
        };
        s.upsert_agent(&a).await.expect("upsert");
        assert_eq!(
            s.get_agent(&a.spiffe_id).await.expect("get"),
            Some(a.clone())
        );
        assert!(
            s.renew_agent(&a.spiffe_id, "ab", "cd", 20)
                .await
                .expect("renew")
        );
        // The SVID before the renewal still renews (its reply may have been lost) ...
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
        // ... but an unknown serial does not.
        assert!(
            !s.renew_agent(&a.spiffe_id, "99", "aa", 40)
                .await
                .expect("renew")
        );
        assert!(s.delete_agent(&a.spiffe_id).await.expect("delete"));
        assert!(
            !s.renew_agent(&a.spiffe_id, "ef", "bb", 50)
                .await
                .expect("renew"),
            "an evicted agent stays evicted"
        );
        assert_eq!(s.list_agents().await.expect("list"), vec![]);
        assert_eq!(s.load_bundle("example.org").await.expect("load"), None);
    }
}
