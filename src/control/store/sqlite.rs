//! The embedded backend: one SQLite file in the state directory (WAL mode).
//!
//! SQLite gives what one control plane needs without a server: ACID transactions (a token is
//! redeemed and the certificate recorded in one commit), safe concurrent use by the CLI while
//! the control plane runs, and a file an operator can open with `sqlite3`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    CaGeneration, CaStateChange, CredentialKind, EndpointRow, LedgerCursor, LedgerEntry, LedgerQuery, StoreError,
    TokenRefusal,
};
use crate::clock::now_unix;
use crate::identity::ca::{CaMaterial, IssuedCertificate};
use crate::identity::{SpiffeId, token};

/// Written after every committed CA or revocation change; what [`Store::watch`] watches.
const ANNOUNCE_FILE: &str = ".changed";

/// The SQLite backend of [`super::Store`].
pub(super) struct SqliteStore {
    conn: Mutex<Connection>,
    /// The `data_version` last seen by [`Self::changed_elsewhere`].
    data_version: Mutex<Option<i64>>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ca (
    generation INTEGER PRIMARY KEY,
    root_cert_pem TEXT NOT NULL,
    root_key_pem TEXT NOT NULL,
    intermediate_cert_pem TEXT NOT NULL,
    intermediate_key_pem TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    retire_after INTEGER
);
CREATE TABLE IF NOT EXISTS join_tokens (
    hash TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
-- Addresses an operator bound to a join token (`token create --address`): an IP (any port) or
-- IP:PORT. Redeeming the token binds them to its identity in `identity_addresses`, so they
-- stay proven for every renewal of that identity.
CREATE TABLE IF NOT EXISTS join_token_addresses (
    hash TEXT NOT NULL,
    address TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identity_addresses (
    spiffe_id TEXT NOT NULL,
    address TEXT NOT NULL,
    PRIMARY KEY (spiffe_id, address)
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    credential TEXT NOT NULL,
    issued_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_by_identity ON certificates (spiffe_id, issued_at);
CREATE TABLE IF NOT EXISTS endpoints (
    spiffe_id TEXT NOT NULL,
    addresses TEXT NOT NULL,
    labels TEXT NOT NULL,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (spiffe_id, addresses)
);
CREATE TABLE IF NOT EXISTS revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spiffe_id TEXT,
    serial TEXT,
    created_at INTEGER NOT NULL
);
";

impl SqliteStore {
    /// Opens (creating if needed) `DIR/state.db`. The directory is made private to the owner:
    /// it holds CA private keys.
    pub(super) fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let io = |cause| StoreError::Io { path: state_dir.to_path_buf(), cause };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
                // The CA's keys live here: a directory this user cannot keep private is refused.
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    io(std::io::Error::new(
                        e.kind(),
                        format!(
                            "{e}: it must be private (0700) and this user does not own it; point --state-dir at a \
                             directory this user owns or may create, such as a subdirectory of the volume"
                        ),
                    ))
                } else {
                    io(e)
                }
            })?;
        }
        let path = state_dir.join("state.db");
        let sql = |cause| StoreError::Sqlite { path: path.clone(), cause };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
        // WAL lets the CLI write while the control plane reads; synchronous=FULL makes every
        // acknowledged commit durable even across power loss, not only kill -9.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        // Versioned like the PostgreSQL schema: version 1 is SCHEMA. A file written by a newer
        // palisade is refused rather than half-understood.
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql)?;
        if version > super::SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found: version, known: super::SCHEMA_VERSION });
        }
        if version < super::SCHEMA_VERSION {
            conn.pragma_update(None, "user_version", super::SCHEMA_VERSION).map_err(sql)?;
        }
        Ok(SqliteStore { conn: Mutex::new(conn), path, data_version: Mutex::new(None) })
    }

    /// Wakes `on_change` after every committed change of the CA or the revocations, by this
    /// process or another (the CLI revoking or starting a rotation): each such commit is
    /// followed by a write of `STATE_DIR/.changed`, which this watches (inotify), so a wake never
    /// comes before the commit it announces. [`Self::changed_elsewhere`] tells whose it was.
    /// The returned watcher must be kept alive.
    pub(super) fn watch(
        &self,
        on_change: std::sync::Arc<tokio::sync::Notify>,
    ) -> Result<notify::RecommendedWatcher, StoreError> {
        use notify::Watcher;
        let dir = self.announce_path().parent().unwrap_or(Path::new(".")).to_path_buf();
        let watch_err = |e: notify::Error| StoreError::Io { path: dir.clone(), cause: std::io::Error::other(e) };
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let announced = event.is_ok_and(|e| {
                (e.kind.is_modify() || e.kind.is_create())
                    && e.paths.iter().any(|p| p.file_name().is_some_and(|n| n == ANNOUNCE_FILE))
            });
            if announced {
                on_change.notify_one();
            }
        })
        .map_err(watch_err)?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive).map_err(watch_err)?;
        Ok(watcher)
    }

    fn announce_path(&self) -> PathBuf {
        self.path.with_file_name(ANNOUNCE_FILE)
    }

    /// Tells watchers that a change was committed. Best effort: a watcher that misses it still
    /// sees the change at its next step.
    fn announce(&self) {
        if let Err(e) = std::fs::write(self.announce_path(), now_unix().to_string()) {
            tracing::warn!(error = %e, "cannot announce a store change to the running control plane");
        }
    }

    /// Whether another connection (another process) committed since the last call: SQLite's
    /// `data_version` moves only for commits made elsewhere, so this process's own writes (the
    /// ledger of every certificate it issues) do not count.
    pub(super) fn changed_elsewhere(&self) -> Result<bool, StoreError> {
        let conn = self.conn.lock();
        let version: i64 = conn.pragma_query_value(None, "data_version", |r| r.get(0)).map_err(|e| self.err(e))?;
        let mut last = self.data_version.lock();
        let changed = *last != Some(version);
        *last = Some(version);
        Ok(changed)
    }

    /// The database file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite { path: self.path.clone(), cause: source }
    }

    /// Every stored CA generation, oldest first.
    pub(super) fn ca_generations(&self) -> Result<Vec<CaGeneration>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare(
                "SELECT generation, root_cert_pem, root_key_pem, intermediate_cert_pem, intermediate_key_pem, state, retire_after, created_at
                 FROM ca ORDER BY generation",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(CaGeneration {
                    generation: r.get(0)?,
                    material: CaMaterial {
                        root_cert_pem: r.get(1)?,
                        root_key_pem: r.get(2)?,
                        intermediate_cert_pem: r.get(3)?,
                        intermediate_key_pem: r.get(4)?,
                    },
                    state: r.get(5)?,
                    retire_after: r.get(6)?,
                    created_at: r.get(7)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Stores a CA generation.
    pub(super) fn insert_ca(&self, generation: u32, material: &CaMaterial, state: &str) -> Result<(), StoreError> {
        self.conn
            .lock()
            .execute(
                "INSERT INTO ca (generation, root_cert_pem, root_key_pem, intermediate_cert_pem, intermediate_key_pem, state, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    generation,
                    material.root_cert_pem,
                    material.root_key_pem,
                    material.intermediate_cert_pem,
                    material.intermediate_key_pem,
                    state,
                    now_unix()
                ],
            )
            .map_err(|e| self.err(e))?;
        self.announce();
        Ok(())
    }

    /// Replaces the keys of CA generations (sealing them in place), all in one transaction:
    /// either every row is rewritten or none is. Rows are `(generation, root key, intermediate key)`.
    ///
    /// The old values must not survive anywhere in the files: `secure_delete` zeroes the space
    /// they leave in the database, and a truncating checkpoint empties the WAL that held them.
    pub(super) fn replace_ca_keys(&self, rows: &[(u32, String, String)]) -> Result<(), StoreError> {
        {
            let mut conn = self.conn.lock();
            conn.pragma_update(None, "secure_delete", "ON").map_err(|e| self.err(e))?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.err(e))?;
            for (generation, root_key, intermediate_key) in rows {
                tx.execute(
                    "UPDATE ca SET root_key_pem = ?2, intermediate_key_pem = ?3 WHERE generation = ?1",
                    params![generation, root_key, intermediate_key],
                )
                .map_err(|e| self.err(e))?;
            }
            tx.commit().map_err(|e| self.err(e))?;
            conn.pragma_update(None, "secure_delete", "OFF").map_err(|e| self.err(e))?;
            // Busy readers can keep old frames; say so rather than claim a clean file.
            let (busy, _, _): (i64, i64, i64) = conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(|e| self.err(e))?;
            if busy != 0 {
                tracing::warn!(path = %self.path.display(), "the WAL could not be emptied after sealing the CA keys (another process reads the store); it is on the next checkpoint");
            }
        }
        self.announce();
        Ok(())
    }

    pub(super) fn change_ca_states(&self, changes: &[CaStateChange]) -> Result<bool, StoreError> {
        {
            let mut conn = self.conn.lock();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.err(e))?;
            for change in changes {
                let state: Option<String> = tx
                    .query_row("SELECT state FROM ca WHERE generation = ?1", [change.generation], |r| r.get(0))
                    .optional()
                    .map_err(|e| self.err(e))?;
                if state.as_deref() != Some(change.from.as_str()) {
                    return Ok(false); // dropping the transaction rolls it back
                }
                tx.execute(
                    "UPDATE ca SET state = ?2, retire_after = ?3 WHERE generation = ?1",
                    params![change.generation, change.to, change.retire_after],
                )
                .map_err(|e| self.err(e))?;
            }
            tx.commit().map_err(|e| self.err(e))?;
        }
        self.announce();
        Ok(true)
    }

    /// Moves a CA generation to another rotation state.
    pub(super) fn set_ca_state(
        &self,
        generation: u32,
        state: &str,
        retire_after: Option<i64>,
    ) -> Result<(), StoreError> {
        self.conn
            .lock()
            .execute(
                "UPDATE ca SET state = ?2, retire_after = ?3 WHERE generation = ?1",
                params![generation, state, retire_after],
            )
            .map_err(|e| self.err(e))?;
        self.announce();
        Ok(())
    }

    /// Creates a join token for `id` that also proves `addresses` (each an IP, any port, or
    /// IP:PORT, as [`crate::control::address_proof::AddressBinding`] spells it): once redeemed,
    /// the identity may register them in discovery.
    pub(super) fn create_bound_join_token(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        addresses: &[String],
    ) -> Result<String, StoreError> {
        let minted = token::mint();
        let now = now_unix();
        let mut conn = self.conn.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO join_tokens (hash, spiffe_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![minted.hash, id.as_str(), now, now + ttl.as_secs() as i64],
        )
        .map_err(|e| self.err(e))?;
        for address in addresses {
            tx.execute(
                "INSERT INTO join_token_addresses (hash, address) VALUES (?1, ?2)",
                params![minted.hash, address],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(minted.token)
    }

    /// The addresses bound to `spiffe_id` by the join tokens it redeemed.
    pub(super) fn bound_addresses(&self, spiffe_id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare("SELECT address FROM identity_addresses WHERE spiffe_id = ?1 ORDER BY address")
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map([spiffe_id], |r| r.get(0)).map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Redeems a join token and records the certificate `issue` produces, in one transaction:
    /// either the token is spent and the certificate is in the ledger, or neither.
    ///
    /// `issue` runs with the identity the token is bound to, which is the only identity it can
    /// ever yield.
    pub(super) fn redeem_join_token<E: From<StoreError> + From<TokenRefusal>>(
        &self,
        token: &str,
        issue: impl FnOnce(&SpiffeId) -> Result<IssuedCertificate, E>,
    ) -> Result<IssuedCertificate, E> {
        let hash = token::hash(token);
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.err(e))?;
        let row: Option<(String, i64, Option<i64>)> = tx
            .query_row("SELECT spiffe_id, expires_at, used_at FROM join_tokens WHERE hash = ?1", [&hash], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let now = now_unix();
        let id: SpiffeId = super::redeemable::<E>(row, now)?;
        let issued = issue(&id)?;
        tx.execute("UPDATE join_tokens SET used_at = ?2 WHERE hash = ?1", params![hash, now])
            .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR IGNORE INTO identity_addresses (spiffe_id, address)
             SELECT ?2, address FROM join_token_addresses WHERE hash = ?1",
            params![hash, id.as_str()],
        )
        .map_err(|e| self.err(e))?;
        insert_ledger(&tx, &issued, CredentialKind::JoinToken).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(issued)
    }

    /// Records certificates in the ledger, all in one transaction (one sync of the disk).
    pub(super) fn record_certificates(&self, rows: &[(&IssuedCertificate, CredentialKind)]) -> Result<(), StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        for (issued, kind) in rows {
            insert_ledger(&tx, issued, *kind).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// One page of the ledger, newest first, each row with its cursor (pass the last one as
    /// [`LedgerQuery::after`] for the next page).
    pub(super) fn ledger_page(&self, q: &LedgerQuery) -> Result<Vec<(LedgerEntry, LedgerCursor)>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare(
                "SELECT c.serial, c.spiffe_id, c.not_before, c.not_after, c.credential,
                        EXISTS (SELECT 1 FROM revocations r WHERE r.serial = c.serial OR r.spiffe_id = c.spiffe_id),
                        c.issued_at, c.rowid
                 FROM certificates c
                 WHERE (?1 IS NULL OR c.spiffe_id = ?1)
                   AND (?2 IS NULL OR c.issued_at >= ?2)
                   AND (?3 IS NULL OR c.issued_at < ?3)
                   AND (?4 IS NULL OR c.issued_at < ?4 OR (c.issued_at = ?4 AND c.rowid < ?5))
                 ORDER BY c.issued_at DESC, c.rowid DESC LIMIT ?6",
            )
            .map_err(|e| self.err(e))?;
        let (after_at, after_row) = q.after.unzip();
        let rows = stmt
            .query_map(params![q.identity, q.issued_after, q.issued_before, after_at, after_row, q.limit], |r| {
                Ok((
                    LedgerEntry {
                        serial: r.get(0)?,
                        spiffe_id: r.get(1)?,
                        not_before: r.get(2)?,
                        not_after: r.get(3)?,
                        credential: r.get(4)?,
                        revoked: r.get(5)?,
                        issued_at: r.get(6)?,
                    },
                    (r.get(6)?, r.get(7)?),
                ))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Whether `serial` or `identity` has been revoked.
    pub(super) fn is_revoked(&self, identity: &str, serial: &str) -> Result<bool, StoreError> {
        self.conn
            .lock()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM revocations WHERE spiffe_id = ?1 OR serial = ?2)",
                params![identity, serial],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// Records that a sidecar serves `addresses` (JSON array) now, so a restarted control plane
    /// keeps it in the endpoint table until its grace period ends.
    pub(super) fn touch_endpoint(&self, spiffe_id: &str, addresses: &str, labels: &str) -> Result<(), StoreError> {
        self.conn
            .lock()
            .execute(
                "INSERT INTO endpoints (spiffe_id, addresses, labels, last_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (spiffe_id, addresses) DO UPDATE SET labels = ?3, last_seen = ?4",
                params![spiffe_id, addresses, labels, now_unix()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Refreshes many registrations in one transaction: (identity, addresses JSON, labels JSON).
    pub(super) fn touch_endpoints(&self, rows: &[(String, String, String)]) -> Result<(), StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        let now = now_unix();
        for (id, addresses, labels) in rows {
            tx.execute(
                "INSERT INTO endpoints (spiffe_id, addresses, labels, last_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (spiffe_id, addresses) DO UPDATE SET labels = ?3, last_seen = ?4",
                params![id, addresses, labels, now],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Endpoints seen since `since` (Unix seconds): (identity, addresses JSON, labels JSON).
    /// Older rows are deleted.
    pub(super) fn recent_endpoints(&self, since: i64) -> Result<Vec<(String, String, String)>, StoreError> {
        let conn = self.conn.lock();
        conn.execute("DELETE FROM endpoints WHERE last_seen < ?1", [since]).map_err(|e| self.err(e))?;
        let mut stmt = conn.prepare("SELECT spiffe_id, addresses, labels FROM endpoints").map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Registrations seen since `since` (Unix seconds), with when each was last seen.
    pub(super) fn shared_endpoints(&self, since: i64) -> Result<Vec<EndpointRow>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare("SELECT spiffe_id, addresses, labels, last_seen FROM endpoints WHERE last_seen >= ?1")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([since], |r| {
                Ok(EndpointRow { spiffe_id: r.get(0)?, addresses: r.get(1)?, labels: r.get(2)?, last_seen: r.get(3)? })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// SQLite's own check of the whole database file: `ok`, or what is damaged.
    pub(super) fn integrity_check(&self) -> Result<String, StoreError> {
        let conn = self.conn.lock();
        let found: Vec<String> = conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        Ok(found.join("; "))
    }

    /// Every revoked identity and serial.
    pub(super) fn revocations(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let conn = self.conn.lock();
        let mut stmt =
            conn.prepare("SELECT spiffe_id, serial FROM revocations ORDER BY id").map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?)))
            .map_err(|e| self.err(e))?;
        let (mut ids, mut serials) = (Vec::new(), Vec::new());
        for row in rows {
            let (id, serial) = row.map_err(|e| self.err(e))?;
            ids.extend(id);
            serials.extend(serial);
        }
        Ok(crate::identity::revocation::lists(ids, serials))
    }

    /// Records a revocation of an identity or a serial.
    pub(super) fn revoke(&self, identity: Option<&str>, serial: Option<&str>) -> Result<(), StoreError> {
        self.conn
            .lock()
            .execute(
                "INSERT INTO revocations (spiffe_id, serial, created_at) VALUES (?1, ?2, ?3)",
                params![identity, serial, now_unix()],
            )
            .map_err(|e| self.err(e))?;
        self.announce();
        Ok(())
    }
}

fn insert_ledger(conn: &Connection, issued: &IssuedCertificate, kind: CredentialKind) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO certificates (serial, spiffe_id, not_before, not_after, credential, issued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            issued.serial,
            issued.spiffe_id.as_str(),
            issued.not_before,
            issued.not_after,
            kind.as_str(),
            now_unix()
        ],
    )?;
    Ok(())
}
