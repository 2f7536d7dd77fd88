//! The control plane's durable state behind one interface, with two backends:
//!
//! - **SQLite** (the default): one file in the state directory, WAL mode. ACID transactions (a
//!   token is redeemed and the certificate recorded in one commit), safe concurrent use by the
//!   CLI while the control plane runs, and a file an operator can open with `sqlite3`.
//! - **PostgreSQL** (`--store postgres://…`): one database shared by several control-plane
//!   replicas; changes reach the other replicas through `LISTEN/NOTIFY` (see [`postgres`]).
//!
//! Every method is synchronous and short; async callers run them on the blocking pool.

mod group_commit;
mod postgres;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::identity::SpiffeId;
use crate::identity::ca::{CaMaterial, IssuedCertificate};

/// The schema version this build writes and understands (SQLite `user_version`, PostgreSQL
/// `schema_migrations`).
const SCHEMA_VERSION: i64 = 2;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {cause}")]
    Sqlite { path: PathBuf, cause: rusqlite::Error },
    #[error("state directory {path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("stored identity {0:?} is invalid")]
    Corrupt(String),
    /// A PostgreSQL failure; `url` has its password redacted.
    #[error("state store {url}: {message}")]
    Postgres { url: String, message: String },
    /// `--store` or `--store-ca-file` cannot be used as given.
    #[error("--store: {0}")]
    Config(String),
    #[error("the state store's schema is version {found}, newer than this palisade knows ({known}): upgrade palisade")]
    SchemaTooNew { found: i64, known: i64 },
    /// The failure of a group commit, seen by every caller whose row it held.
    #[error(transparent)]
    Shared(Arc<StoreError>),
}

/// Where the state lives: the flags every store-using command takes.
#[derive(clap::Args, Clone, Default)]
pub struct StoreArgs {
    /// The state store: `postgres://USER:PASSWORD@HOST:PORT/DB` (or `postgresql://`; libpq's
    /// `sslmode` is read) for several replicas sharing one database; by default a SQLite file
    /// in the state directory.
    #[arg(long = "store", env = "PALISADE_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// PEM roots the PostgreSQL server's certificate is verified against (TLS is used with
    /// `sslmode=require`, or whenever this is given; without it the system's roots).
    #[arg(long, env = "PALISADE_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password: this struct is part of the control plane's logged arguments.
        f.debug_struct("StoreArgs")
            .field("store", &self.store.as_deref().map(redact_url))
            .field("store_ca_file", &self.store_ca_file)
            .finish()
    }
}

/// `url` with its password (user-info, or a secret query parameter such as `password=`)
/// replaced by [`crate::redact::REDACTED`]: what errors and logs show.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return crate::redact::query(url).into_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{}@{host}", crate::redact::REDACTED),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    format!("{scheme}://{authority}{}", crate::redact::query(tail))
}

/// Why a join token was not accepted. The caller sees which, so a failing bootstrap is debuggable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenRefusal {
    #[error("join token is unknown")]
    Unknown,
    #[error("join token was already used")]
    Used,
    #[error("join token has expired")]
    Expired,
}

/// The identity a join token's row (`spiffe_id`, `expires_at`, `used_at`; `None`: no such
/// token) may still yield at `now`, or why it may not: the one rule both backends apply inside
/// the transaction that spends the token.
pub(super) fn redeemable<E: From<StoreError> + From<TokenRefusal>>(
    row: Option<(String, i64, Option<i64>)>,
    now: i64,
) -> Result<SpiffeId, E> {
    let (id, expires_at, used_at) = row.ok_or(TokenRefusal::Unknown)?;
    if used_at.is_some() {
        return Err(TokenRefusal::Used.into());
    }
    if now >= expires_at {
        return Err(TokenRefusal::Expired.into());
    }
    id.parse().map_err(|_| StoreError::Corrupt(id).into())
}

/// How a certificate's identity was established; recorded in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    JoinToken,
    Renewal,
    Kubernetes,
    /// The control plane's own serving certificate.
    ControlPlane,
}

impl CredentialKind {
    /// The ledger's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::JoinToken => "join-token",
            CredentialKind::Renewal => "renewal",
            CredentialKind::Kubernetes => "kubernetes",
            CredentialKind::ControlPlane => "control-plane",
        }
    }
}

/// One ledger row.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LedgerEntry {
    pub serial: String,
    pub spiffe_id: String,
    pub not_before: i64,
    pub not_after: i64,
    pub credential: String,
    pub revoked: bool,
    /// When the control plane recorded it (Unix seconds).
    pub issued_at: i64,
}

/// Where a ledger row sits in the newest-first order: (`issued_at`, rowid).
pub type LedgerCursor = (i64, i64);

/// Which ledger rows [`Store::ledger_page`] returns.
#[derive(Clone, Debug, Default)]
pub struct LedgerQuery {
    pub identity: Option<String>,
    /// Issued at or after (Unix seconds).
    pub issued_after: Option<i64>,
    /// Issued before (Unix seconds).
    pub issued_before: Option<i64>,
    /// Rows after this cursor (the last row of the previous page: `issued_at`, rowid).
    pub after: Option<(i64, i64)>,
    pub limit: u32,
}

/// A CA generation as stored, with its place in a rotation.
#[derive(Clone, Debug)]
pub struct CaGeneration {
    pub generation: u32,
    pub material: CaMaterial,
    /// `active` signs; `next` is trusted but does not sign yet; `retiring` still trusted until
    /// `retire_after`, then dropped.
    pub state: String,
    pub retire_after: Option<i64>,
    pub created_at: i64,
}

/// A CA generation's move to another rotation state, made only if it is still in `from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaStateChange {
    pub generation: u32,
    /// The state the caller read.
    pub from: String,
    pub to: String,
    pub retire_after: Option<i64>,
}

/// One registration as stored: (identity, addresses JSON, labels JSON) and when it was last
/// seen by whichever replica holds its sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRow {
    pub spiffe_id: String,
    pub addresses: String,
    pub labels: String,
    pub last_seen: i64,
}

/// What one replica published for the others' management API.
#[derive(Clone, Debug)]
pub struct ReplicaStatusRow {
    pub replica: String,
    pub updated: i64,
    /// Its sidecars, as JSON.
    pub sidecars: String,
    /// Its traffic edges, as JSON.
    pub edges: String,
}

/// Keeps a store watch alive: the state-directory watcher (SQLite) or the `LISTEN` connection
/// (PostgreSQL). Dropping it stops the watch.
pub enum StoreWatch {
    Directory(notify::RecommendedWatcher),
    Listen(postgres::ListenTask),
}

/// Handle to the state store. Cheap to share; every call is one short transaction.
pub struct Store {
    backend: Arc<Backend>,
    /// Writes the ledger in group commits; started by the first certificate recorded.
    ledger: std::sync::OnceLock<group_commit::GroupCommit>,
}

enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// Runs the same call on whichever backend this store has.
macro_rules! on_backend {
    ($self:ident, $b:ident => $call:expr) => {
        match &*$self.backend {
            Backend::Sqlite($b) => $call,
            Backend::Postgres($b) => $call,
        }
    };
}

impl Store {
    /// Opens (creating if needed) `DIR/state.db`. The directory is made private to the owner:
    /// it holds CA private keys.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        Ok(Self::with_backend(Backend::Sqlite(sqlite::SqliteStore::open(state_dir)?)))
    }

    /// Opens the store `args` name: PostgreSQL for a `postgres://` URL (connecting and running
    /// the schema migrations), else SQLite in `state_dir`.
    pub fn open_with(state_dir: &Path, args: &StoreArgs) -> Result<Self, StoreError> {
        match args.store.as_deref() {
            None | Some("") => Self::open(state_dir),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Self::with_backend(Backend::Postgres(postgres::PgStore::open(url, args.store_ca_file.as_deref())?)))
            }
            Some(url) => Err(StoreError::Config(format!(
                "{} is not a PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DB); omit --store for SQLite in the state directory",
                redact_url(url)
            ))),
        }
    }

    fn with_backend(backend: Backend) -> Self {
        Store { backend: Arc::new(backend), ledger: std::sync::OnceLock::new() }
    }

    /// Which backend, for logs: `sqlite:PATH` or the redacted URL.
    pub fn describe(&self) -> String {
        match &*self.backend {
            Backend::Sqlite(s) => format!("sqlite:{}", s.path().display()),
            Backend::Postgres(p) => p.url().to_string(),
        }
    }

    /// Wakes `on_change` after every committed change of the CA or the revocations, by this
    /// process or another: SQLite commits are followed by a write of `STATE_DIR/.changed`,
    /// watched with inotify; PostgreSQL commits send a `NOTIFY`, heard on a `LISTEN`
    /// connection (after a lost connection, everything counts as changed). A wake never comes
    /// before the commit it announces. [`Self::changed_elsewhere`] tells whose it was. The
    /// returned watch must be kept alive.
    pub fn watch(&self, on_change: Arc<tokio::sync::Notify>) -> Result<StoreWatch, StoreError> {
        match &*self.backend {
            Backend::Sqlite(s) => Ok(StoreWatch::Directory(s.watch(on_change)?)),
            Backend::Postgres(p) => Ok(StoreWatch::Listen(p.watch(on_change))),
        }
    }

    /// Woken when another replica changed the endpoint registrations (read them with
    /// [`Self::shared_endpoints`]); `None` when no other replica can (SQLite). Heard only while
    /// a [`Self::watch`] runs.
    pub fn endpoint_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        match &*self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.endpoint_changes()),
        }
    }

    /// Whether another process (the CLI, another replica) committed a change since the last
    /// call; this process's own writes (the ledger of every certificate it issues) do not count.
    /// The first call counts as a change.
    pub fn changed_elsewhere(&self) -> Result<bool, StoreError> {
        on_backend!(self, b => b.changed_elsewhere())
    }

    /// Every stored CA generation, oldest first.
    pub fn ca_generations(&self) -> Result<Vec<CaGeneration>, StoreError> {
        on_backend!(self, b => b.ca_generations())
    }

    /// Stores a CA generation.
    pub fn insert_ca(&self, generation: u32, material: &CaMaterial, state: &str) -> Result<(), StoreError> {
        on_backend!(self, b => b.insert_ca(generation, material, state))
    }

    /// Replaces the keys of CA generations (sealing them in place), all in one transaction:
    /// either every row is rewritten or none is. Rows are `(generation, root key, intermediate key)`.
    /// SQLite also scrubs the old values from its files (`secure_delete`, WAL truncation).
    pub fn replace_ca_keys(&self, rows: &[(u32, String, String)]) -> Result<(), StoreError> {
        on_backend!(self, b => b.replace_ca_keys(rows))
    }

    /// Moves a CA generation to another rotation state.
    pub fn set_ca_state(&self, generation: u32, state: &str, retire_after: Option<i64>) -> Result<(), StoreError> {
        on_backend!(self, b => b.set_ca_state(generation, state, retire_after))
    }

    /// Makes every change in one transaction if each generation is still in its `from` state;
    /// otherwise writes nothing and returns `false`. Two replicas (or a replica and the CLI)
    /// that decide the same rotation step at once then take it once, and no reader ever sees
    /// a half-taken step (say, the old generation retiring and the new one not yet active).
    pub fn change_ca_states(&self, changes: &[CaStateChange]) -> Result<bool, StoreError> {
        on_backend!(self, b => b.change_ca_states(changes))
    }

    /// Creates a join token for `id`, valid for `ttl`. Returns the token (shown once).
    pub fn create_join_token(&self, id: &SpiffeId, ttl: Duration) -> Result<String, StoreError> {
        self.create_bound_join_token(id, ttl, &[])
    }

    /// Creates a join token for `id` that also proves `addresses` (each an IP, any port, or
    /// IP:PORT, as [`crate::control::address_proof::AddressBinding`] spells it): once redeemed,
    /// the identity may register them in discovery.
    pub fn create_bound_join_token(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        addresses: &[String],
    ) -> Result<String, StoreError> {
        on_backend!(self, b => b.create_bound_join_token(id, ttl, addresses))
    }

    /// The addresses bound to `spiffe_id` by the join tokens it redeemed.
    pub fn bound_addresses(&self, spiffe_id: &str) -> Result<Vec<String>, StoreError> {
        on_backend!(self, b => b.bound_addresses(spiffe_id))
    }

    /// Redeems a join token and records the certificate `issue` produces, in one transaction:
    /// either the token is spent and the certificate is in the ledger, or neither. Exactly once
    /// across every process sharing the store: a concurrent redemption waits for this one and
    /// is then refused as [`TokenRefusal::Used`]; a failed `issue` leaves the token unspent.
    ///
    /// `issue` runs with the identity the token is bound to, which is the only identity it can
    /// ever yield.
    pub fn redeem_join_token<E: From<StoreError> + From<TokenRefusal>>(
        &self,
        token: &str,
        issue: impl FnOnce(&SpiffeId) -> Result<IssuedCertificate, E>,
    ) -> Result<IssuedCertificate, E> {
        on_backend!(self, b => b.redeem_join_token(token, issue))
    }

    /// Records a certificate in the ledger, durably: returns once the commit that holds it is
    /// on disk. Called before the certificate is handed out. Concurrent calls share commits
    /// (see [`group_commit`]), so a renewal storm is not serialized behind one sync per
    /// certificate.
    pub fn record_certificate(&self, issued: &IssuedCertificate, kind: CredentialKind) -> Result<(), StoreError> {
        self.ledger.get_or_init(|| group_commit::GroupCommit::start(self.backend.clone())).record(issued.clone(), kind)
    }

    /// Ledger transactions committed by this process so far (each holds one or more rows).
    pub fn ledger_commits(&self) -> u64 {
        self.ledger.get().map_or(0, |g| g.commits.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The ledger, newest first, optionally for one identity.
    pub fn certificates(&self, identity: Option<&str>, limit: u32) -> Result<Vec<LedgerEntry>, StoreError> {
        let query = LedgerQuery { identity: identity.map(str::to_string), limit, ..Default::default() };
        Ok(self.ledger_page(&query)?.into_iter().map(|(entry, _)| entry).collect())
    }

    /// One page of the ledger, newest first, each row with its cursor (pass the last one as
    /// [`LedgerQuery::after`] for the next page).
    pub fn ledger_page(&self, q: &LedgerQuery) -> Result<Vec<(LedgerEntry, LedgerCursor)>, StoreError> {
        on_backend!(self, b => b.ledger_page(q))
    }

    /// Whether `serial` or `identity` has been revoked.
    pub fn is_revoked(&self, identity: &str, serial: &str) -> Result<bool, StoreError> {
        on_backend!(self, b => b.is_revoked(identity, serial))
    }

    /// Records that a sidecar serves `addresses` (JSON array) now, so a restarted control plane
    /// (and, on PostgreSQL, every other replica) keeps it in the endpoint table until its grace
    /// period ends.
    pub fn touch_endpoint(&self, spiffe_id: &str, addresses: &str, labels: &str) -> Result<(), StoreError> {
        on_backend!(self, b => b.touch_endpoint(spiffe_id, addresses, labels))
    }

    /// Refreshes many registrations in one transaction: (identity, addresses JSON, labels JSON).
    pub fn touch_endpoints(&self, rows: &[(String, String, String)]) -> Result<(), StoreError> {
        on_backend!(self, b => b.touch_endpoints(rows))
    }

    /// Endpoints seen since `since` (Unix seconds): (identity, addresses JSON, labels JSON).
    /// Older rows are deleted.
    pub fn recent_endpoints(&self, since: i64) -> Result<Vec<(String, String, String)>, StoreError> {
        on_backend!(self, b => b.recent_endpoints(since))
    }

    /// Registrations seen since `since` (Unix seconds) by any process sharing the store, with
    /// when each was last seen (what another replica's endpoint table is built from).
    pub fn shared_endpoints(&self, since: i64) -> Result<Vec<EndpointRow>, StoreError> {
        on_backend!(self, b => b.shared_endpoints(since))
    }

    /// Publishes what this replica's management API knows for the other replicas' (its
    /// sidecars and traffic edges, as JSON), replacing what it published before. A store no
    /// other replica shares (SQLite) keeps nothing.
    pub fn publish_replica_status(&self, replica: &str, sidecars: &str, edges: &str) -> Result<(), StoreError> {
        match &*self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.publish_replica_status(replica, sidecars, edges),
        }
    }

    /// What every replica but `except` published since `since` (Unix seconds).
    pub fn replica_statuses(&self, except: &str, since: i64) -> Result<Vec<ReplicaStatusRow>, StoreError> {
        match &*self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.replica_statuses(except, since),
        }
    }

    /// Every revoked identity and serial.
    pub fn revocations(&self) -> Result<(Vec<String>, Vec<String>), StoreError> {
        on_backend!(self, b => b.revocations())
    }

    /// Records a revocation of an identity or a serial.
    pub fn revoke(&self, identity: Option<&str>, serial: Option<&str>) -> Result<(), StoreError> {
        on_backend!(self, b => b.revoke(identity, serial))
    }

    /// Checks the store's file whole (SQLite's `PRAGMA integrity_check`): `ok`, or what is
    /// damaged. PostgreSQL keeps its own consistency: `ok` once a query succeeds.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        match &*self.backend {
            Backend::Sqlite(s) => s.integrity_check(),
            Backend::Postgres(p) => p.revocations().map(|_| "ok".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum E {
        #[error(transparent)]
        S(#[from] StoreError),
        #[error(transparent)]
        T(#[from] TokenRefusal),
    }

    fn fake_issue(id: &SpiffeId) -> Result<IssuedCertificate, E> {
        Ok(IssuedCertificate {
            chain_pem: String::new(),
            spiffe_id: id.clone(),
            serial: format!("{:x}", rand::random::<u64>()),
            not_before: 0,
            not_after: 1,
        })
    }

    #[test]
    fn token_is_single_use_and_bound_to_its_identity() {
        let dir = tempdir();
        let store = Store::open(&dir).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let t = store.create_join_token(&id, Duration::from_secs(60)).unwrap();
        let issued = store.redeem_join_token::<E>(&t, fake_issue).unwrap();
        assert_eq!(issued.spiffe_id, id);
        assert!(matches!(store.redeem_join_token::<E>(&t, fake_issue), Err(E::T(TokenRefusal::Used))));
        assert!(matches!(store.redeem_join_token::<E>("pjt_nope", fake_issue), Err(E::T(TokenRefusal::Unknown))));
        assert_eq!(store.certificates(None, 10).unwrap().len(), 1);
    }

    #[test]
    fn addresses_bound_to_a_token_belong_to_its_identity_once_redeemed() {
        let dir = tempdir();
        let store = Store::open(&dir).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let other: SpiffeId = "spiffe://cluster.local/ns/a/sa/c".parse().unwrap();
        let t = store.create_bound_join_token(&id, Duration::from_secs(60), &["10.0.0.7".into()]).unwrap();
        let unused = store.create_bound_join_token(&other, Duration::from_secs(60), &["10.0.0.8".into()]).unwrap();
        assert!(store.bound_addresses(id.as_str()).unwrap().is_empty(), "not before it is redeemed");
        store.redeem_join_token::<E>(&t, fake_issue).unwrap();
        assert_eq!(store.bound_addresses(id.as_str()).unwrap(), ["10.0.0.7"]);
        assert!(store.bound_addresses(other.as_str()).unwrap().is_empty(), "{unused} was never redeemed");
    }

    #[test]
    fn expired_token_is_refused_and_failed_issue_does_not_spend_token() {
        let dir = tempdir();
        let store = Store::open(&dir).unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let expired = store.create_join_token(&id, Duration::ZERO).unwrap();
        assert!(matches!(store.redeem_join_token::<E>(&expired, fake_issue), Err(E::T(TokenRefusal::Expired))));
        let t = store.create_join_token(&id, Duration::from_secs(60)).unwrap();
        let failed = store.redeem_join_token::<E>(&t, |_| Err(E::S(StoreError::Corrupt("boom".into()))));
        assert!(failed.is_err());
        store.redeem_join_token::<E>(&t, fake_issue).expect("token survives a failed issue");
    }

    fn certificate(n: usize) -> IssuedCertificate {
        let id: SpiffeId = format!("spiffe://cluster.local/ns/storm/sa/w{}", n % 16).parse().unwrap();
        IssuedCertificate {
            chain_pem: String::new(),
            spiffe_id: id,
            serial: format!("{n:032x}"),
            not_before: 0,
            not_after: 1,
        }
    }

    #[test]
    fn concurrent_certificates_share_commits_and_every_one_is_in_the_ledger() {
        let dir = tempdir();
        let store = Store::open(&dir).unwrap();
        let (threads, each) = (32, 40);
        std::thread::scope(|s| {
            for t in 0..threads {
                let store = &store;
                s.spawn(move || {
                    for i in 0..each {
                        store.record_certificate(&certificate(t * each + i), CredentialKind::Renewal).unwrap();
                    }
                });
            }
        });
        let rows = threads * each;
        let query = LedgerQuery { limit: rows as u32 + 1, ..Default::default() };
        let mut serials: Vec<String> = store.ledger_page(&query).unwrap().into_iter().map(|(e, _)| e.serial).collect();
        serials.sort();
        assert_eq!(serials, (0..rows).map(|n| certificate(n).serial).collect::<Vec<_>>());
        // Read back through a fresh connection too: what was acknowledged is on disk.
        assert_eq!(Store::open(&dir).unwrap().ledger_page(&query).unwrap().len(), rows);
        let commits = store.ledger_commits();
        assert!(commits < rows as u64, "{rows} certificates took {commits} commits: none shared");
    }

    #[test]
    fn a_certificate_that_cannot_be_recorded_fails_alone() {
        let dir = tempdir();
        let store = Store::open(&dir).unwrap();
        store.record_certificate(&certificate(7), CredentialKind::Renewal).unwrap();
        // Writers racing a duplicate serial: whatever batches they share, only the duplicate fails.
        let outcomes: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..64)
                .map(|n| {
                    let store = &store;
                    s.spawn(move || store.record_certificate(&certificate(n), CredentialKind::Renewal).is_ok())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let failed: Vec<usize> = (0..64).filter(|n| !outcomes[*n]).collect();
        assert_eq!(failed, [7], "only the serial already in the ledger is refused");
        assert_eq!(store.certificates(None, 100).unwrap().len(), 64);
    }

    #[test]
    fn ca_states_change_together_and_only_from_the_states_read() {
        let dir = tempdir();
        let store = Store::open(&dir).unwrap();
        let material = CaMaterial::generate("cluster.local", 1).unwrap();
        store.insert_ca(1, &material, "active").unwrap();
        store.insert_ca(2, &material, "next").unwrap();
        let change = |generation, from: &str, to: &str, retire_after| CaStateChange {
            generation,
            from: from.into(),
            to: to.into(),
            retire_after,
        };
        let step = [change(1, "active", "retiring", Some(99)), change(2, "next", "active", None)];
        let states =
            || store.ca_generations().unwrap().into_iter().map(|g| (g.state, g.retire_after)).collect::<Vec<_>>();
        assert!(store.change_ca_states(&step).unwrap());
        let taken = vec![("retiring".to_string(), Some(99)), ("active".to_string(), None)];
        assert_eq!(states(), taken);
        // The same step decided from the old states: generation 1 is no longer active, so
        // nothing is written, not even generation 2's half.
        let stale = [change(2, "active", "retiring", Some(7)), change(1, "active", "retired", None)];
        assert!(!store.change_ca_states(&stale).unwrap());
        assert_eq!(states(), taken);
    }

    #[tokio::test]
    async fn a_write_by_another_process_wakes_the_watch_and_own_writes_do_not_count() {
        let dir = tempdir();
        let server = Store::open(&dir).unwrap();
        assert!(server.changed_elsewhere().unwrap(), "the first look counts as a change");
        assert!(!server.changed_elsewhere().unwrap());
        server.revoke(Some("spiffe://cluster.local/ns/a/sa/own"), None).unwrap();
        assert!(!server.changed_elsewhere().unwrap(), "this connection's own commit");
        let woken = std::sync::Arc::new(tokio::sync::Notify::new());
        let _watcher = server.watch(woken.clone()).unwrap();

        let cli = Store::open(&dir).unwrap(); // what `palisade control revoke` opens
        cli.revoke(Some("spiffe://cluster.local/ns/a/sa/b"), None).unwrap();
        tokio::time::timeout(Duration::from_secs(5), woken.notified()).await.expect("the watch wakes");
        assert!(server.changed_elsewhere().unwrap());
        assert_eq!(server.revocations().unwrap().0.len(), 2);
    }

    #[test]
    fn store_urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("postgres://u:p%40ss@db:5432/x?sslmode=require"),
            "postgres://u:[redacted]@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_url("postgresql://u@db/x?password=hunter2&sslmode=disable"),
            "postgresql://u@db/x?password=[redacted]&sslmode=disable"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        let args = StoreArgs { store: Some("postgres://u:hunter2@db/x".into()), store_ca_file: None };
        assert!(!format!("{args:?}").contains("hunter2"));
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("palisade-store-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
