//! The PostgreSQL backend: one database shared by several control-plane replicas.
//!
//! - **Sync over async.** The store's API is synchronous (callers use the blocking pool, as
//!   with SQLite). `tokio-postgres` runs on a small runtime of its own, on its own thread; a
//!   call spawns its query there and waits on a channel. Blocking a caller's thread this way
//!   never nests runtimes, so a call is safe from any thread, as SQLite's are.
//! - **Pool.** At most [`POOL_SIZE`] connections, reused while they stay open. A connection
//!   dropped in the middle of a transaction (an error, a panic) is closed, never reused: the
//!   server rolls the transaction back.
//! - **Migrations** run at open under `pg_advisory_xact_lock`, so replicas starting at once on
//!   an empty database apply each version exactly once (`schema_migrations`).
//! - **Change propagation.** Every commit that changes the CA, the revocations or the endpoint
//!   registrations sends `NOTIFY palisade_changes, '<replica>:<kind>'` in its transaction (so
//!   it is heard only if it commits). [`PgStore::watch`] keeps one `LISTEN` connection,
//!   reconnecting with backoff; after each (re)connect everything counts as changed, since
//!   notifications sent while it was away are lost.
//! - **Secrets.** The password never appears in an error or a log: the URL is redacted and
//!   driver messages are scrubbed of it.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row};

use super::{
    CaGeneration, CaStateChange, CredentialKind, EndpointRow, LedgerCursor, LedgerEntry, LedgerQuery, ReplicaStatusRow,
    SCHEMA_VERSION, StoreError, TokenRefusal, redact_url,
};
use crate::clock::now_unix;
use crate::identity::ca::{CaMaterial, IssuedCertificate};
use crate::identity::{SpiffeId, token};

/// Most connections one process holds (the `LISTEN` connection aside). Two replicas with the
/// CLI stay well under PostgreSQL's default `max_connections` of 100.
const POOL_SIZE: usize = 16;

/// The channel every change is announced on.
const CHANNEL: &str = "palisade_changes";

/// The advisory lock migrations take (any constant; "palisade" in ASCII).
const MIGRATION_LOCK: i64 = 0x7061_6c69_7361_6465;

/// How long a connection attempt may take when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema versions, applied in order. Never edit one that has shipped: add the next.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "
CREATE TABLE ca (
    generation BIGINT PRIMARY KEY,
    root_cert_pem TEXT NOT NULL,
    root_key_pem TEXT NOT NULL,
    intermediate_cert_pem TEXT NOT NULL,
    intermediate_key_pem TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    retire_after BIGINT
);
CREATE TABLE join_tokens (
    hash TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE TABLE join_token_addresses (
    hash TEXT NOT NULL,
    address TEXT NOT NULL
);
CREATE INDEX join_token_addresses_by_hash ON join_token_addresses (hash);
CREATE TABLE identity_addresses (
    spiffe_id TEXT NOT NULL,
    address TEXT NOT NULL,
    PRIMARY KEY (spiffe_id, address)
);
CREATE TABLE certificates (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    credential TEXT NOT NULL,
    issued_at BIGINT NOT NULL
);
CREATE INDEX certificates_by_identity ON certificates (spiffe_id, issued_at);
CREATE INDEX certificates_by_time ON certificates (issued_at, seq);
CREATE TABLE endpoints (
    spiffe_id TEXT NOT NULL,
    addresses TEXT NOT NULL,
    labels TEXT NOT NULL,
    last_seen BIGINT NOT NULL,
    PRIMARY KEY (spiffe_id, addresses)
);
CREATE TABLE revocations (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    spiffe_id TEXT,
    serial TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX revocations_by_identity ON revocations (spiffe_id);
CREATE INDEX revocations_by_serial ON revocations (serial);
",
    ),
    (
        2,
        "
CREATE TABLE replica_status (
    replica TEXT PRIMARY KEY,
    updated BIGINT NOT NULL,
    sidecars TEXT NOT NULL,
    edges TEXT NOT NULL
);
",
    ),
];

/// What is shared by the store's calls and its listener.
struct Shared {
    config: Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// The URL, password redacted.
    url: String,
    /// Scrubbed from every driver message.
    password: Option<String>,
    idle: Mutex<Vec<Arc<Client>>>,
    slots: Arc<Semaphore>,
    /// This process among the replicas: notifications it sent itself are not news.
    replica: String,
    /// Set by a notification from elsewhere (or a reconnect); read by `changed_elsewhere`.
    foreign: AtomicBool,
    endpoints_changed: Arc<Notify>,
}

/// The PostgreSQL backend of [`super::Store`].
pub(super) struct PgStore {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
    /// Ends the runtime's thread when the store is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A pooled connection. Back to the pool only when marked clean (its transaction, if any,
/// ended); otherwise closed.
struct Conn {
    client: Arc<Client>,
    clean: bool,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.clean && !self.client.is_closed() {
            self.shared.idle.lock().push(self.client.clone());
        }
    }
}

/// The running `LISTEN` connection; dropping it stops it.
pub struct ListenTask(tokio::task::AbortHandle);

impl Drop for ListenTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Shared {
    fn err(&self, e: &tokio_postgres::Error) -> StoreError {
        let mut message = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => e.to_string(),
        };
        if e.as_db_error().is_none() {
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                message = format!("{message}: {s}");
                source = s.source();
            }
        }
        self.fail(message)
    }

    fn fail(&self, message: String) -> StoreError {
        let message = match &self.password {
            Some(p) if !p.is_empty() => message.replace(p.as_str(), crate::redact::REDACTED),
            _ => message,
        };
        StoreError::Postgres { url: self.url.clone(), message }
    }

    /// A new connection, its driver task spawned; notifications go to `notes` if given.
    async fn connect(
        &self,
        notes: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    ) -> Result<Client, StoreError> {
        match &self.tls {
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await.map_err(|e| self.err(&e))?;
                tokio::spawn(drive(conn, notes));
                Ok(client)
            }
            None => {
                let (client, conn) = self.config.connect(NoTls).await.map_err(|e| self.err(&e))?;
                tokio::spawn(drive(conn, notes));
                Ok(client)
            }
        }
    }

    async fn checkout(self: &Arc<Self>) -> Result<Conn, StoreError> {
        let slot = self.slots.clone().acquire_owned().await.map_err(|_| self.fail("the pool is closed".into()))?;
        let reused = loop {
            let Some(c) = self.idle.lock().pop() else { break None };
            if !c.is_closed() {
                break Some(c);
            }
        };
        let client = match reused {
            Some(c) => c,
            None => Arc::new(self.connect(None).await?),
        };
        Ok(Conn { client, clean: false, shared: self.clone(), _slot: slot })
    }

    fn notification(&self, payload: &str, on_change: &Notify) {
        let (replica, kind) = payload.split_once(':').unwrap_or(("", payload));
        if replica == self.replica {
            return;
        }
        tracing::debug!(replica, kind, "store change announced by another process");
        if kind == "endpoints" {
            self.endpoints_changed.notify_one();
        } else {
            self.foreign.store(true, Ordering::SeqCst);
            on_change.notify_one();
        }
    }
}

/// Runs a connection's I/O until it closes, handing notifications to `notes`.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notes: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Some(tx) = &notes {
                    let _ = tx.send(n);
                }
            }
            Some(Ok(AsyncMessage::Notice(n))) => tracing::debug!(notice = %n.message(), "PostgreSQL notice"),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
                return;
            }
            None => return,
        }
    }
}

fn rustls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            let fail = |e: String| StoreError::Config(format!("--store-ca-file {}: {e}", file.display()));
            let pem = std::fs::read_to_string(file).map_err(|e| fail(e.to_string()))?;
            for cert in crate::tls::certs_from_pem(&pem).map_err(|e| fail(e.to_string()))? {
                roots.add(cert).map_err(|e| fail(e.to_string()))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err(StoreError::Config(
            "TLS to PostgreSQL needs trusted roots: pass --store-ca-file (no system roots were found)".into(),
        ));
    }
    Ok(rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl PgStore {
    /// Connects to `url`, runs the schema migrations, and returns the store.
    pub(super) fn open(url: &str, ca_file: Option<&Path>) -> Result<Self, StoreError> {
        let redacted = redact_url(url);
        // The parser's message could quote the password: only the redacted URL is shown.
        let mut config: Config = url.parse().map_err(|_: tokio_postgres::Error| {
            StoreError::Config(format!("{redacted} is not a valid PostgreSQL URL"))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("palisade");
        }
        // libpq's sslmode: disable and the default (prefer) connect in clear unless a CA file
        // was given; require (and a CA file) verify the server against the roots.
        let tls = match (config.get_ssl_mode(), ca_file) {
            (SslMode::Disable, _) => None,
            (SslMode::Require, _) | (_, Some(_)) => {
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(rustls_config(ca_file)?))
            }
            _ => None,
        };
        let password = config.get_password().map(|p| String::from_utf8_lossy(p).into_owned());
        let shared = Arc::new(Shared {
            config,
            tls,
            url: redacted,
            password,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(POOL_SIZE)),
            replica: format!("{:016x}", rand::random::<u64>()),
            foreign: AtomicBool::new(true),
            endpoints_changed: Arc::new(Notify::new()),
        });
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("palisade-postgres".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| shared.fail(format!("cannot start the PostgreSQL client thread: {e}")))?;
        let rt = handle_rx
            .recv()
            .map_err(|_| shared.fail("the PostgreSQL client thread died".into()))?
            .map_err(|e| shared.fail(format!("cannot start the PostgreSQL client runtime: {e}")))?;
        let store = PgStore { shared, rt, _stop: stop };
        store.migrate()?;
        Ok(store)
    }

    /// The URL, password redacted.
    pub(super) fn url(&self) -> &str {
        &self.shared.url
    }

    /// Runs `fut` on the client runtime and waits for it.
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| self.shared.fail("the PostgreSQL client runtime stopped".into()))?
    }

    /// One pooled connection for `f`'s statements; it goes back to the pool only if `f`
    /// succeeded (a failed transaction's connection is closed, which rolls it back).
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static,
    {
        let shared = self.shared.clone();
        self.block(async move {
            let mut conn = shared.checkout().await?;
            let out = f(conn.client.clone()).await.map_err(|e| shared.err(&e))?;
            conn.clean = true;
            Ok(out)
        })
    }

    /// `NOTIFY`'s payload for a change of `kind` made here.
    fn announcement(&self, kind: &str) -> String {
        format!("{}:{kind}", self.shared.replica)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let applied = self.run(|c| async move {
            c.batch_execute("BEGIN").await?;
            // Serializes replicas starting at once; released at COMMIT (or when the connection
            // closes).
            c.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .await?;
            let current: i64 =
                c.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await?.get(0);
            if current > SCHEMA_VERSION {
                c.batch_execute("ROLLBACK").await?;
                return Ok(Err(current));
            }
            let mut applied = Vec::new();
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
                c.batch_execute(sql).await?;
                c.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    &[version, &now_unix()],
                )
                .await?;
                applied.push(*version);
            }
            c.batch_execute("COMMIT").await?;
            Ok(Ok(applied))
        })?;
        match applied {
            Err(found) => Err(StoreError::SchemaTooNew { found, known: SCHEMA_VERSION }),
            Ok(applied) => {
                if !applied.is_empty() {
                    tracing::info!(store = %self.shared.url, versions = ?applied, "applied schema migrations");
                }
                Ok(())
            }
        }
    }

    /// Starts the `LISTEN` connection that wakes `on_change` (and the endpoint notify).
    pub(super) fn watch(&self, on_change: Arc<Notify>) -> ListenTask {
        let shared = self.shared.clone();
        ListenTask(self.rt.spawn(listen(shared, on_change)).abort_handle())
    }

    pub(super) fn endpoint_changes(&self) -> Arc<Notify> {
        self.shared.endpoints_changed.clone()
    }

    /// Whether a notification from another process (or a reconnect) came since the last call.
    pub(super) fn changed_elsewhere(&self) -> Result<bool, StoreError> {
        Ok(self.shared.foreign.swap(false, Ordering::SeqCst))
    }

    pub(super) fn ca_generations(&self) -> Result<Vec<CaGeneration>, StoreError> {
        let rows = self.run(|c| async move {
            c.query(
                "SELECT generation, root_cert_pem, root_key_pem, intermediate_cert_pem, intermediate_key_pem, state, retire_after, created_at
                 FROM ca ORDER BY generation",
                &[],
            )
            .await
        })?;
        rows.iter()
            .map(|r| {
                let generation: i64 = r.get(0);
                Ok(CaGeneration {
                    generation: u32::try_from(generation)
                        .map_err(|_| StoreError::Corrupt(format!("CA generation {generation}")))?,
                    material: CaMaterial {
                        root_cert_pem: r.get(1),
                        root_key_pem: r.get(2),
                        intermediate_cert_pem: r.get(3),
                        intermediate_key_pem: r.get(4),
                    },
                    state: r.get(5),
                    retire_after: r.get(6),
                    created_at: r.get(7),
                })
            })
            .collect()
    }

    pub(super) fn insert_ca(&self, generation: u32, material: &CaMaterial, state: &str) -> Result<(), StoreError> {
        let (m, state, note) = (material.clone(), state.to_string(), self.announcement("ca"));
        self.run(move |c| async move {
            c.batch_execute("BEGIN").await?;
            c.execute(
                "INSERT INTO ca (generation, root_cert_pem, root_key_pem, intermediate_cert_pem, intermediate_key_pem, state, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &i64::from(generation),
                    &m.root_cert_pem,
                    &m.root_key_pem,
                    &m.intermediate_cert_pem,
                    &m.intermediate_key_pem,
                    &state,
                    &now_unix(),
                ],
            )
            .await?;
            notify(&c, &note).await?;
            c.batch_execute("COMMIT").await
        })
    }

    pub(super) fn replace_ca_keys(&self, rows: &[(u32, String, String)]) -> Result<(), StoreError> {
        let (rows, note) = (rows.to_vec(), self.announcement("ca"));
        self.run(move |c| async move {
            c.batch_execute("BEGIN").await?;
            for (generation, root_key, intermediate_key) in &rows {
                c.execute(
                    "UPDATE ca SET root_key_pem = $2, intermediate_key_pem = $3 WHERE generation = $1",
                    &[&i64::from(*generation), root_key, intermediate_key],
                )
                .await?;
            }
            notify(&c, &note).await?;
            c.batch_execute("COMMIT").await
        })
    }

    pub(super) fn set_ca_state(
        &self,
        generation: u32,
        state: &str,
        retire_after: Option<i64>,
    ) -> Result<(), StoreError> {
        let (state, note) = (state.to_string(), self.announcement("ca"));
        self.run(move |c| async move {
            c.batch_execute("BEGIN").await?;
            c.execute(
                "UPDATE ca SET state = $2, retire_after = $3 WHERE generation = $1",
                &[&i64::from(generation), &state, &retire_after],
            )
            .await?;
            notify(&c, &note).await?;
            c.batch_execute("COMMIT").await
        })
    }

    pub(super) fn change_ca_states(&self, changes: &[CaStateChange]) -> Result<bool, StoreError> {
        let (changes, note) = (changes.to_vec(), self.announcement("ca"));
        self.run(move |c| async move {
            c.batch_execute("BEGIN").await?;
            for change in &changes {
                // The row lock holds a concurrent step back until this one commits; it then
                // reads the new state and gives up.
                let state: Option<String> = c
                    .query_opt(
                        "SELECT state FROM ca WHERE generation = $1 FOR UPDATE",
                        &[&i64::from(change.generation)],
                    )
                    .await?
                    .map(|r| r.get(0));
                if state.as_deref() != Some(change.from.as_str()) {
                    c.batch_execute("ROLLBACK").await?;
                    return Ok(false);
                }
                c.execute(
                    "UPDATE ca SET state = $2, retire_after = $3 WHERE generation = $1",
                    &[&i64::from(change.generation), &change.to, &change.retire_after],
                )
                .await?;
            }
            notify(&c, &note).await?;
            c.batch_execute("COMMIT").await?;
            Ok(true)
        })
    }

    pub(super) fn create_bound_join_token(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        addresses: &[String],
    ) -> Result<String, StoreError> {
        let minted = token::mint();
        let now = now_unix();
        let (hash, id, addresses) = (minted.hash.clone(), id.as_str().to_string(), addresses.to_vec());
        let expires = now + ttl.as_secs() as i64;
        self.run(move |c| async move {
            c.batch_execute("BEGIN").await?;
            c.execute(
                "INSERT INTO join_tokens (hash, spiffe_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
                &[&hash, &id, &now, &expires],
            )
            .await?;
            for address in &addresses {
                c.execute("INSERT INTO join_token_addresses (hash, address) VALUES ($1, $2)", &[&hash, address])
                    .await?;
            }
            c.batch_execute("COMMIT").await
        })?;
        Ok(minted.token)
    }

    pub(super) fn bound_addresses(&self, spiffe_id: &str) -> Result<Vec<String>, StoreError> {
        let id = spiffe_id.to_string();
        let rows = self.run(move |c| async move {
            c.query("SELECT address FROM identity_addresses WHERE spiffe_id = $1 ORDER BY address", &[&id]).await
        })?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The token's row is locked (`SELECT … FOR UPDATE`) for the whole transaction, `issue`
    /// included: a concurrent redemption at another replica waits for this commit, then reads
    /// the token as used.
    pub(super) fn redeem_join_token<E: From<StoreError> + From<TokenRefusal>>(
        &self,
        token: &str,
        issue: impl FnOnce(&SpiffeId) -> Result<IssuedCertificate, E>,
    ) -> Result<IssuedCertificate, E> {
        let hash = token::hash(token);
        let shared = self.shared.clone();
        let mut conn = self.block(async move { shared.checkout().await })?;
        let (client, shared) = (conn.client.clone(), self.shared.clone());
        let lookup = hash.clone();
        let row: Option<(String, i64, Option<i64>)> = self.block(async move {
            client.batch_execute("BEGIN").await.map_err(|e| shared.err(&e))?;
            let row = client
                .query_opt(
                    "SELECT spiffe_id, expires_at, used_at FROM join_tokens WHERE hash = $1 FOR UPDATE",
                    &[&lookup],
                )
                .await
                .map_err(|e| shared.err(&e))?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
        })?;
        let now = now_unix();
        let outcome = super::redeemable::<E>(row, now).and_then(|id| issue(&id));
        let (client, shared) = (conn.client.clone(), self.shared.clone());
        let issued = match outcome {
            Ok(issued) => issued,
            Err(e) => {
                // Nothing spent: roll back (a connection that cannot is closed instead).
                if self.block(async move { client.batch_execute("ROLLBACK").await.map_err(|e| shared.err(&e)) }).is_ok()
                {
                    conn.clean = true;
                }
                return Err(e);
            }
        };
        let (ledger, id) = (issued.clone(), issued.spiffe_id.as_str().to_string());
        self.block(async move {
            let spent = client
                .execute("UPDATE join_tokens SET used_at = $2 WHERE hash = $1 AND used_at IS NULL", &[&hash, &now])
                .await
                .map_err(|e| shared.err(&e))?;
            if spent != 1 {
                // The row lock makes this impossible; refuse rather than issue twice.
                return Err(shared.fail("join token changed under its row lock".into()));
            }
            client
                .execute(
                    "INSERT INTO identity_addresses (spiffe_id, address)
                     SELECT $2, address FROM join_token_addresses WHERE hash = $1 ON CONFLICT DO NOTHING",
                    &[&hash, &id],
                )
                .await
                .map_err(|e| shared.err(&e))?;
            insert_ledger(&client, &ledger, CredentialKind::JoinToken).await.map_err(|e| shared.err(&e))?;
            client.batch_execute("COMMIT").await.map_err(|e| shared.err(&e))
        })?;
        conn.clean = true;
        Ok(issued)
    }

    /// Records certificates in the ledger, all in one transaction.
    pub(super) fn record_certificates(&self, rows: &[(&IssuedCertificate, CredentialKind)]) -> Result<(), StoreError> {
        let rows: Vec<(IssuedCertificate, CredentialKind)> = rows.iter().map(|(i, k)| ((*i).clone(), *k)).collect();
        self.run(move |c| async move {
            c.batch_execute("BEGIN").await?;
            for (issued, kind) in &rows {
                insert_ledger(&c, issued, *kind).await?;
            }
            c.batch_execute("COMMIT").await
        })
    }

    pub(super) fn ledger_page(&self, q: &LedgerQuery) -> Result<Vec<(LedgerEntry, LedgerCursor)>, StoreError> {
        let q = q.clone();
        let rows = self.run(move |c| async move {
            let (after_at, after_seq) = q.after.unzip();
            c.query(
                "SELECT c.serial, c.spiffe_id, c.not_before, c.not_after, c.credential,
                        EXISTS (SELECT 1 FROM revocations r WHERE r.serial = c.serial OR r.spiffe_id = c.spiffe_id),
                        c.issued_at, c.seq
                 FROM certificates c
                 WHERE ($1::TEXT IS NULL OR c.spiffe_id = $1)
                   AND ($2::BIGINT IS NULL OR c.issued_at >= $2)
                   AND ($3::BIGINT IS NULL OR c.issued_at < $3)
                   AND ($4::BIGINT IS NULL OR c.issued_at < $4 OR (c.issued_at = $4 AND c.seq < $5::BIGINT))
                 ORDER BY c.issued_at DESC, c.seq DESC LIMIT $6",
                &[&q.identity, &q.issued_after, &q.issued_before, &after_at, &after_seq, &i64::from(q.limit)],
            )
            .await
        })?;
        Ok(rows.iter().map(ledger_row).collect())
    }

    pub(super) fn is_revoked(&self, identity: &str, serial: &str) -> Result<bool, StoreError> {
        let (identity, serial) = (identity.to_string(), serial.to_string());
        self.run(move |c| async move {
            let row = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM revocations WHERE spiffe_id = $1 OR serial = $2)",
                    &[&identity, &serial],
                )
                .await?;
            Ok(row.get(0))
        })
    }

    pub(super) fn touch_endpoint(&self, spiffe_id: &str, addresses: &str, labels: &str) -> Result<(), StoreError> {
        self.touch_endpoints(&[(spiffe_id.to_string(), addresses.to_string(), labels.to_string())])
    }

    pub(super) fn touch_endpoints(&self, rows: &[(String, String, String)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (rows, note) = (rows.to_vec(), self.announcement("endpoints"));
        self.run(move |c| async move {
            let now = now_unix();
            c.batch_execute("BEGIN").await?;
            for (id, addresses, labels) in &rows {
                c.execute(
                    "INSERT INTO endpoints (spiffe_id, addresses, labels, last_seen) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (spiffe_id, addresses) DO UPDATE SET labels = $3, last_seen = $4",
                    &[id, addresses, labels, &now],
                )
                .await?;
            }
            notify(&c, &note).await?;
            c.batch_execute("COMMIT").await
        })
    }

    pub(super) fn recent_endpoints(&self, since: i64) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = self.run(move |c| async move {
            c.execute("DELETE FROM endpoints WHERE last_seen < $1", &[&since]).await?;
            c.query("SELECT spiffe_id, addresses, labels FROM endpoints", &[]).await
        })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    pub(super) fn shared_endpoints(&self, since: i64) -> Result<Vec<EndpointRow>, StoreError> {
        let rows = self.run(move |c| async move {
            c.query("SELECT spiffe_id, addresses, labels, last_seen FROM endpoints WHERE last_seen >= $1", &[&since])
                .await
        })?;
        Ok(rows
            .iter()
            .map(|r| EndpointRow { spiffe_id: r.get(0), addresses: r.get(1), labels: r.get(2), last_seen: r.get(3) })
            .collect())
    }

    pub(super) fn publish_replica_status(&self, replica: &str, sidecars: &str, edges: &str) -> Result<(), StoreError> {
        let (replica, sidecars, edges) = (replica.to_string(), sidecars.to_string(), edges.to_string());
        self.run(move |c| async move {
            c.execute(
                "INSERT INTO replica_status (replica, updated, sidecars, edges) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (replica) DO UPDATE SET updated = $2, sidecars = $3, edges = $4",
                &[&replica, &now_unix(), &sidecars, &edges],
            )
            .await
            .map(drop)
        })
    }

    pub(super) fn replica_statuses(&self, except: &str, since: i64) -> Result<Vec<ReplicaStatusRow>, StoreError> {
        let except = except.to_string();
        let rows = self.run(move |c| async move {
            c.query(
                "SELECT replica, updated, sidecars, edges FROM replica_status WHERE replica <> $1 AND updated >= $2
                 ORDER BY replica",
                &[&except, &since],
            )
            .await
        })?;
        Ok(rows
            .iter()
            .map(|r| ReplicaStatusRow { replica: r.get(0), updated: r.get(1), sidecars: r.get(2), edges: r.get(3) })
            .collect())
    }

    pub(super) fn revocations(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let rows =
            self.run(|c| async move { c.query("SELECT spiffe_id, serial FROM revocations ORDER BY id", &[]).await })?;
        let (mut ids, mut serials) = (Vec::new(), Vec::new());
        for row in rows {
            ids.extend(row.get::<_, Option<String>>(0));
            serials.extend(row.get::<_, Option<String>>(1));
        }
        Ok(crate::identity::revocation::lists(ids, serials))
    }

    pub(super) fn revoke(&self, identity: Option<&str>, serial: Option<&str>) -> Result<(), StoreError> {
        let (identity, serial) = (identity.map(str::to_string), serial.map(str::to_string));
        let note = self.announcement("revocations");
        self.run(move |c| async move {
            c.batch_execute("BEGIN").await?;
            c.execute(
                "INSERT INTO revocations (spiffe_id, serial, created_at) VALUES ($1, $2, $3)",
                &[&identity, &serial, &now_unix()],
            )
            .await?;
            notify(&c, &note).await?;
            c.batch_execute("COMMIT").await
        })
    }
}

/// Announces a change; inside a transaction it is delivered at COMMIT, and only then.
async fn notify(c: &Client, payload: &str) -> Result<(), tokio_postgres::Error> {
    c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await.map(drop)
}

async fn insert_ledger(
    c: &Client,
    issued: &IssuedCertificate,
    kind: CredentialKind,
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO certificates (serial, spiffe_id, not_before, not_after, credential, issued_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &issued.serial,
            &issued.spiffe_id.as_str(),
            &issued.not_before,
            &issued.not_after,
            &kind.as_str(),
            &now_unix(),
        ],
    )
    .await
    .map(drop)
}

fn ledger_row(r: &Row) -> (LedgerEntry, LedgerCursor) {
    (
        LedgerEntry {
            serial: r.get(0),
            spiffe_id: r.get(1),
            not_before: r.get(2),
            not_after: r.get(3),
            credential: r.get(4),
            revoked: r.get(5),
            issued_at: r.get(6),
        },
        (r.get(6), r.get(7)),
    )
}

/// The `LISTEN` loop: one connection, reconnected with capped exponential backoff. Each time it
/// is (re)established, everything counts as changed: what was announced while it was away is
/// lost.
async fn listen(shared: Arc<Shared>, on_change: Arc<Notify>) {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);
    let mut backoff = FIRST;
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let listening = async {
            let client = shared.connect(Some(tx)).await?;
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| shared.err(&e))?;
            Ok::<_, StoreError>(client)
        };
        match listening.await {
            Ok(client) => {
                tracing::info!(store = %shared.url, "listening for changes made by other replicas");
                backoff = FIRST;
                shared.foreign.store(true, Ordering::SeqCst);
                on_change.notify_one();
                shared.endpoints_changed.notify_one();
                while let Some(n) = rx.recv().await {
                    shared.notification(n.payload(), &on_change);
                }
                drop(client);
                tracing::warn!(store = %shared.url, "lost the LISTEN connection; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for store changes"),
        }
        let jitter = backoff.mul_f64(rand::random::<f64>() * 0.2);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_from_elsewhere_counts_and_our_own_does_not() {
        let shared = Shared {
            config: Config::new(),
            tls: None,
            url: String::new(),
            password: None,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(1)),
            replica: "aa".into(),
            foreign: AtomicBool::new(false),
            endpoints_changed: Arc::new(Notify::new()),
        };
        let woken = Notify::new();
        shared.notification("aa:revocations", &woken);
        assert!(!shared.foreign.load(Ordering::SeqCst), "our own commit");
        shared.notification("bb:endpoints", &woken);
        assert!(!shared.foreign.load(Ordering::SeqCst), "endpoints wake the endpoint table only");
        shared.notification("bb:revocations", &woken);
        assert!(shared.foreign.load(Ordering::SeqCst));
    }

    #[test]
    fn driver_errors_never_show_the_password() {
        let shared = Shared {
            config: Config::new(),
            tls: None,
            url: redact_url("postgres://u:s3cret@h/db"),
            password: Some("s3cret".into()),
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(1)),
            replica: "aa".into(),
            foreign: AtomicBool::new(false),
            endpoints_changed: Arc::new(Notify::new()),
        };
        let shown = shared.fail("password authentication failed: s3cret".into()).to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("postgres://u:[redacted]@h/db"), "{shown}");
    }
}
