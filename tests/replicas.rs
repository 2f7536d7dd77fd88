//! Several control-plane replicas on one real PostgreSQL server (issue 19): each test starts
//! its own cluster in a temporary directory (`initdb`, then `postgres` on a free loopback
//! port), two `palisade control --store postgres://…` processes on it, and sidecars on each.
//!
//! PostgreSQL comes from `.ci/install-postgres` (Debian's `postgresql`, installed on first use):
//! its bin directory is `PALISADE_PG_BIN`, else what the script prints.

mod common;
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use palisade::control::Store;
use palisade::control::store::StoreArgs;

/// The tests here each run a database server and several processes on two cores: one at a
/// time keeps the "within a second" figures honest.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A PostgreSQL server of its own, stopped (fast shutdown) when dropped.
struct PgServer {
    child: std::process::Child,
    bin: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    log: PathBuf,
}

fn pg_bin() -> PathBuf {
    tools::postgres_bin_dir().to_path_buf()
}

/// initdb refuses to run as root: as root, the server runs as the `postgres` user the package
/// created, and owns its directories.
fn server_user() -> Option<(u32, u32)> {
    let out = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, "postgres"]).output().unwrap();
        assert!(out.status.success(), "as root the test needs the `postgres` user (from the postgresql package)");
        String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().unwrap()
    };
    Some((id("-u"), id("-g")))
}

/// A server certificate for 127.0.0.1 and the root that signed it (PEM: cert, key, root).
fn server_tls() -> (String, String, String) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root, &root_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem(), root_cert.pem())
}

impl PgServer {
    fn start(dir: &Path) -> PgServer {
        Self::start_with(dir, None)
    }

    /// With `tls` (certificate and key PEM), the server takes TCP clients over TLS only.
    fn start_with(dir: &Path, tls: Option<(&str, &str)>) -> PgServer {
        use std::os::unix::process::CommandExt;
        let bin = pg_bin();
        let (data, socket_dir) = (dir.join("pgdata"), dir.join("pgsock"));
        std::fs::create_dir_all(&socket_dir).unwrap();
        let user = server_user();
        if let Some((uid, gid)) = user {
            for d in [dir, socket_dir.as_path()] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            }
        }
        let as_server = |cmd: &mut Command| {
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"]);
        initdb.args(["--no-locale", "-E", "UTF8", "--no-sync"]).env("LC_ALL", "C");
        as_server(&mut initdb);
        let out = initdb.output().unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_addr().port();
        let log = dir.join("postgres.log");
        let mut postgres = Command::new(bin.join("postgres"));
        postgres.arg("-D").arg(&data).arg("-k").arg(&socket_dir).args(["-p", &port.to_string()]);
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                std::fs::write(&path, pem).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some((uid, gid)) = user {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
                }
            }
            // TCP clients must come over TLS: no plain `host` rule is left.
            let hba = data.join("pg_hba.conf");
            let rules = std::fs::read_to_string(&hba).unwrap();
            let rules: String = rules
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(&hba, rules).unwrap();
            postgres.args(["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", "-c", "ssl_key_file=server.key"]);
        }
        // Durability of the test database is not what is tested; fsync would only slow it.
        postgres.args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]);
        postgres.stdout(std::fs::File::create(dir.join("postgres.out")).unwrap());
        postgres.stderr(std::fs::File::create(&log).unwrap());
        as_server(&mut postgres);
        let child = postgres.spawn().unwrap();
        let server = PgServer { child, bin, socket_dir, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.psql("postgres", "SELECT 1").status.success() {
            assert!(Instant::now() < deadline, "postgres did not accept connections\n{}", server.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs SQL as the superuser over the Unix socket.
    fn psql(&self, db: &str, sql: &str) -> std::process::Output {
        Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-X", "-q", "-t", "-A"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap()
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        let out = self.psql(db, sql);
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A new database owned by a new user with a password; its URL (over TCP, password
    /// authentication).
    fn database(&self, name: &str) -> String {
        let password = format!("pw-{:016x}", rand::random::<u64>());
        self.sql("postgres", &format!("CREATE USER {name} PASSWORD '{password}'"));
        self.sql("postgres", &format!("CREATE DATABASE {name} OWNER {name}"));
        format!("postgres://{name}:{password}@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGINT: fast shutdown (ends sessions, removes its shared memory and socket).
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- postgres log ----\n{}", self.log_text());
        }
    }
}

fn store(url: &str) -> Store {
    Store::open_with(Path::new("/nonexistent"), &StoreArgs { store: Some(url.to_string()), store_ca_file: None })
        .unwrap()
}

/// A control-plane replica on the shared database, with its own directory for its own files.
async fn replica(dir: &Path, name: &str, url: &str, extra: &[&str]) -> ControlPlane {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec!["--store", url];
    args.extend_from_slice(extra);
    ControlPlane::start(&dir, &args).await
}

/// A join token made with the CLI against the shared database, as an operator would.
fn token(url: &str, identity: &str, admin: bool) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["control", "token", "create", "--store", url, "--identity", identity]);
    if admin {
        cmd.arg("--admin");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "token create failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A sidecar whose `--control` is `controls` (a comma-separated list of replicas).
fn sidecar(
    cp: &ControlPlane,
    url: &str,
    controls: &str,
    sa: &str,
    app: Option<std::net::SocketAddr>,
    routes: &[String],
) -> Sidecar {
    sidecar_with(cp, url, controls, sa, app, routes, &[])
}

/// [`sidecar`] with `extra` flags.
fn sidecar_with(
    cp: &ControlPlane,
    url: &str,
    controls: &str,
    sa: &str,
    app: Option<std::net::SocketAddr>,
    routes: &[String],
    extra: &[&str],
) -> Sidecar {
    let identity = id(sa);
    let token_file = cp.dir.join(format!("{sa}.token"));
    std::fs::write(&token_file, token(url, &identity, false)).unwrap();
    let admin = free_addr();
    let mut args = vec![
        "--control".to_string(),
        controls.to_string(),
        "--ca-bundle".into(),
        cp.root_pem_path().display().to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--admin".into(),
        admin.to_string(),
    ];
    let inbound = app.map(|app| {
        let inbound = free_addr();
        args.extend(["--inbound".into(), inbound.to_string(), "--app".into(), app.to_string()]);
        inbound
    });
    for r in routes {
        args.extend(["--route".into(), r.clone()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let proc = Proc::spawn_proxy(&format!("sidecar-{sa}"), &cp.dir, &args);
    Sidecar { proc, admin, inbound, identity }
}

/// A client certificate for `identity` from the shared CA (as a stolen one would be).
fn mint(url: &str, identity: &str) -> Arc<rustls::sign::CertifiedKey> {
    let material = store(url).ca_generations().unwrap().into_iter().find(|g| g.state == "active").unwrap().material;
    let ca = palisade::identity::CertificateAuthority::load(material).unwrap();
    certified_by(&ca, identity, std::time::SystemTime::now() + Duration::from_secs(600))
}

/// An administrator's credentials at `cp` (`palisade control login`), as CLI arguments.
fn admin_login(cp: &ControlPlane, url: &str) -> Vec<String> {
    let credentials = cp.dir.join("admin");
    let token = token(url, "spiffe://cluster.local/admin/tests", true);
    let out = Command::new(BIN)
        .args(["control", "login", "--server", &cp.listen.to_string(), "--token", &token, "--ca-bundle"])
        .arg(cp.root_pem_path())
        .arg("--credentials")
        .arg(&credentials)
        .output()
        .unwrap();
    assert!(out.status.success(), "login failed: {}", String::from_utf8_lossy(&out.stderr));
    vec!["--server".into(), cp.listen.to_string(), "--credentials".into(), credentials.display().to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_at_one_replica_is_enforced_by_sidecars_of_the_other_within_a_second() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-revoke");
    let pg = PgServer::start(&dir);
    let url = pg.database("palisade");
    let cp1 = replica(&dir, "r1", &url, &[]).await;
    let cp2 = replica(&dir, "r2", &url, &[]).await;
    let app = EchoApp::start().await;
    // B is served by replica 2; A, its client, by replica 1.
    let b = sidecar(&cp2, &url, &cp2.listen.to_string(), "b", Some(app.addr), &[]);
    b.wait_ready().await;
    let a_to_b = free_addr();
    let a = sidecar(
        &cp1,
        &url,
        &cp1.listen.to_string(),
        "a",
        None,
        &[format!("{a_to_b}={}@{}", b.inbound.unwrap(), id("b"))],
    );
    a.wait_ready().await;
    let client = http_client();
    assert_eq!(get(&client, &format!("http://{a_to_b}/"), &[]).await.unwrap().0, 200, "across replicas");
    // B registered its inbound address at replica 2; replica 1 learned it (NOTIFY, then the
    // shared row) and pushed it to A.
    let b_in = b.inbound.unwrap().to_string();
    wait_for("A (replica 1) knows B's endpoint, registered at replica 2", Duration::from_secs(5), || async {
        a.config_dump().await["mesh"]["endpoints"][&b_in] == id("b")
    })
    .await;

    // A connection B holds open for a holder of A's certificate: B itself must cut it.
    let roots = std::fs::read_to_string(cp2.root_pem_path()).unwrap();
    let a_cert = mint(&url, &id("a"));
    let mut held = mtls_http1(b.inbound.unwrap(), &roots, a_cert.clone()).await.expect("A's certificate accepted");
    let req =
        || http::Request::get("/").header("host", "b").body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    assert_eq!(held.send_request(req()).await.unwrap().status(), 200, "held connection works before revocation");

    let server = admin_login(&cp1, &url);
    let revoked_at = Instant::now();
    let out = Command::new(BIN).args(["control", "revoke", "--identity", &id("a")]).args(&server).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("B (replica 2) cuts the held connection of revoked A", Duration::from_secs(5), || {
        let closed = held.is_closed();
        async move { closed }
    })
    .await;
    let elapsed = revoked_at.elapsed();
    assert!(elapsed < Duration::from_secs(1), "revocation took {elapsed:?} to reach replica 2's sidecar");
    wait_for("A's requests to B refused", Duration::from_secs(3), || {
        let client = client.clone();
        async move { get(&client, &format!("http://{a_to_b}/"), &[]).await.map(|r| r.0) != Ok(200) }
    })
    .await;
    // A fresh connection with A's valid, unexpired certificate is refused by B as revoked.
    let revoked = |m: &str| metric(m, "palisade_tls_handshake_failures_total", "reason=\"revoked\"");
    let before = revoked(&b.metrics().await);
    let probe = mtls_status(b.inbound.unwrap(), &roots, a_cert).await;
    assert_eq!(probe, None, "B served a holder of A's revoked certificate");
    let metrics = b.metrics().await;
    assert!(revoked(&metrics) > before, "the refusal counted as revoked\n{metrics}");
    drop((cp1, cp2));
}

/// Whether the sidecar inbound at `inbound` serves a request from a holder of `cert`.
async fn served(inbound: std::net::SocketAddr, roots: &str, cert: Arc<rustls::sign::CertifiedKey>) -> bool {
    mtls_status(inbound, roots, cert).await == Some(200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_started_elsewhere_reaches_the_sidecars_of_both_replicas_within_a_second() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-rotate");
    let pg = PgServer::start(&dir);
    let url = pg.database("palisade");
    let cp1 = replica(&dir, "r1", &url, &[]).await;
    let cp2 = replica(&dir, "r2", &url, &[]).await;
    let app = EchoApp::start().await;
    let b1 = sidecar(&cp1, &url, &cp1.listen.to_string(), "b1", Some(app.addr), &[]);
    let b2 = sidecar(&cp2, &url, &cp2.listen.to_string(), "b2", Some(app.addr), &[]);
    b1.wait_ready().await;
    b2.wait_ready().await;
    let roots = std::fs::read_to_string(cp1.root_pem_path()).unwrap();

    // The operator starts a rotation from the CLI against the database: neither replica made
    // the change, both must hear of it.
    let out = Command::new(BIN)
        .args(["control", "ca", "rotate", "--store", &url, "--state-dir"])
        .arg(dir.join("cli"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rotated_at = Instant::now();
    // A peer holding a certificate from the new root (not signing yet) is trusted by both.
    let next = store(&url).ca_generations().unwrap().into_iter().find(|g| g.state == "next").unwrap();
    let ca = palisade::identity::CertificateAuthority::load(next.material).unwrap();
    let cert = certified_by(&ca, &id("c"), std::time::SystemTime::now() + Duration::from_secs(600));
    for b in [&b1, &b2] {
        let (inbound, roots, cert) = (b.inbound.unwrap(), roots.clone(), cert.clone());
        wait_for(&format!("{} trusts the new root", b.identity), Duration::from_secs(5), || {
            let (roots, cert) = (roots.clone(), cert.clone());
            async move { served(inbound, &roots, cert).await }
        })
        .await;
    }
    let elapsed = rotated_at.elapsed();
    assert!(elapsed < Duration::from_secs(1), "the new root took {elapsed:?} to reach both replicas' sidecars");
    // Each replica exported the bundle with both roots.
    for cp in [&cp1, &cp2] {
        let bundle = std::fs::read_to_string(cp.root_pem_path()).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_database_connections_are_cut_listens_again_and_hears_later_changes() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-relisten");
    let pg = PgServer::start(&dir);
    let url = pg.database("palisade");
    let cp = replica(&dir, "r1", &url, &[]).await;
    let app = EchoApp::start().await;
    let b = sidecar(&cp, &url, &cp.listen.to_string(), "b", Some(app.addr), &[]);
    b.wait_ready().await;
    let roots = std::fs::read_to_string(cp.root_pem_path()).unwrap();
    let a_cert = mint(&url, &id("a"));
    assert!(served(b.inbound.unwrap(), &roots, a_cert.clone()).await, "A is served before");

    // Every connection of the replica is terminated by the server (a failover, an admin).
    let listener = "FROM pg_stat_activity WHERE datname = 'palisade' AND query LIKE 'LISTEN%'";
    let old = pg.sql("postgres", &format!("SELECT pid {listener}"));
    assert!(!old.is_empty() && !old.contains('\n'), "one LISTEN connection: {old:?}");
    pg.sql("postgres", "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'palisade'");
    // A new LISTEN connection, not the terminated one still listed while it goes.
    wait_for("the replica listens again", Duration::from_secs(10), || {
        let again = pg.sql("postgres", &format!("SELECT count(*) {listener} AND pid <> {old}")) == "1";
        async move { again }
    })
    .await;

    // A revocation made by the CLI afterwards reaches the replica's sidecar within a second.
    let out = Command::new(BIN).args(["control", "revoke", "--store", &url, "--identity", &id("a")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked_at = Instant::now();
    let inbound = b.inbound.unwrap();
    wait_for("B refuses revoked A", Duration::from_secs(5), || {
        let (roots, cert) = (roots.clone(), a_cert.clone());
        async move { !served(inbound, &roots, cert).await }
    })
    .await;
    let elapsed = revoked_at.elapsed();
    assert!(elapsed < Duration::from_secs(1), "the revocation took {elapsed:?} after the reconnect");
    assert!(cp.proc.log_text().contains("lost the LISTEN connection"), "{}", cp.proc.log_text());
}

#[derive(Debug)]
enum RedeemError {
    Store(#[allow(dead_code)] palisade::control::store::StoreError),
    Refused(palisade::control::store::TokenRefusal),
}

impl From<palisade::control::store::StoreError> for RedeemError {
    fn from(e: palisade::control::store::StoreError) -> Self {
        RedeemError::Store(e)
    }
}

impl From<palisade::control::store::TokenRefusal> for RedeemError {
    fn from(e: palisade::control::store::TokenRefusal) -> Self {
        RedeemError::Refused(e)
    }
}

/// The PostgreSQL backend keeps SQLite's join-token semantics (the store's unit tests check
/// SQLite's): single use, bound to one identity and its addresses, expiry, and a failed
/// issuance leaves the token unspent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_join_token_semantics() {
    use palisade::control::store::TokenRefusal;
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-tokens");
    let pg = PgServer::start(&dir);
    let s = store(&pg.database("palisade"));
    let who: palisade::identity::SpiffeId = id("a").parse().unwrap();
    let issue = |id: &palisade::identity::SpiffeId| -> Result<palisade::identity::IssuedCertificate, RedeemError> {
        Ok(palisade::identity::IssuedCertificate {
            chain_pem: String::new(),
            spiffe_id: id.clone(),
            serial: format!("{:x}", rand::random::<u64>()),
            not_before: 0,
            not_after: 1,
        })
    };
    let refused = |r: Result<palisade::identity::IssuedCertificate, RedeemError>| match r {
        Err(RedeemError::Refused(why)) => Some(why),
        _ => None,
    };
    let t = s.create_bound_join_token(&who, Duration::from_secs(60), &["10.0.0.7".into()]).unwrap();
    assert!(s.bound_addresses(who.as_str()).unwrap().is_empty(), "not before it is redeemed");
    let failed = s.redeem_join_token(&t, |_| Err(RedeemError::Refused(TokenRefusal::Unknown)));
    assert!(failed.is_err());
    assert_eq!(s.redeem_join_token(&t, issue).unwrap().spiffe_id, who, "a failed issuance spent nothing");
    assert_eq!(s.bound_addresses(who.as_str()).unwrap(), ["10.0.0.7"]);
    assert_eq!(refused(s.redeem_join_token(&t, issue)), Some(TokenRefusal::Used));
    assert_eq!(refused(s.redeem_join_token("pjt_nope", issue)), Some(TokenRefusal::Unknown));
    let expired = s.create_join_token(&who, Duration::ZERO).unwrap();
    assert_eq!(refused(s.redeem_join_token(&expired, issue)), Some(TokenRefusal::Expired));
    assert_eq!(s.certificates(None, 10).unwrap().len(), 1, "one certificate in the ledger");
    // The ledger pages by cursor, newest first.
    for _ in 0..4 {
        s.record_certificate(&issue(&who).unwrap(), palisade::control::store::CredentialKind::Renewal).unwrap();
    }
    let q = |after| palisade::control::store::LedgerQuery { limit: 2, after, ..Default::default() };
    let first = s.ledger_page(&q(None)).unwrap();
    let second = s.ledger_page(&q(first.last().map(|r| r.1))).unwrap();
    let third = s.ledger_page(&q(second.last().map(|r| r.1))).unwrap();
    let serials: std::collections::BTreeSet<String> =
        first.iter().chain(&second).chain(&third).map(|r| r.0.serial.clone()).collect();
    assert_eq!((first.len(), second.len(), third.len(), serials.len()), (2, 2, 1, 5));
    s.revoke(Some(who.as_str()), None).unwrap();
    assert!(s.is_revoked(who.as_str(), "00").unwrap());
    assert!(s.certificates(None, 10).unwrap().iter().all(|r| r.revoked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_join_token_redeemed_at_both_replicas_at_once_yields_one_certificate() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-race");
    let pg = PgServer::start(&dir);
    let url = pg.database("palisade");
    let cp1 = replica(&dir, "r1", &url, &[]).await;
    let cp2 = replica(&dir, "r2", &url, &[]).await;
    palisade::tls::install_crypto_provider();
    let roots = std::fs::read_to_string(cp1.root_pem_path()).unwrap();
    let ledger = store(&url);
    for round in 0..8 {
        let identity = id(&format!("race-{round}"));
        let token = token(&url, &identity, false);
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for cp in [&cp1, &cp2] {
            let client = palisade::agent::client::ControlClient::new(
                &cp.listen.to_string(),
                palisade::tls::TrustBundle::from_pem(&roots).unwrap(),
                palisade::tls::CertStore::new(),
                palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
            );
            let (barrier, token) = (barrier.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let key = rcgen::KeyPair::generate().unwrap();
                let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
                barrier.wait().await;
                client
                    .certify(
                        csr.der().to_vec(),
                        Some(palisade::proto::identity::certify_request::Credential::JoinToken(token)),
                    )
                    .await
                    .map_err(|e| e.to_string())
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let granted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(granted, 1, "round {round}: {results:?}");
        let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(refused.contains("already used"), "round {round}: the loser is told why: {refused}");
        assert_eq!(ledger.certificates(Some(&identity), 10).unwrap().len(), 1, "round {round}: one certificate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_move_to_the_other_replica_when_one_is_killed_and_no_request_fails() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-failover");
    let pg = PgServer::start(&dir);
    let url = pg.database("palisade");
    let mut cp1 = replica(&dir, "r1", &url, &["--cert-ttl", "20s"]).await;
    let cp2 = replica(&dir, "r2", &url, &["--cert-ttl", "20s"]).await;
    let controls = format!("{},{}", cp1.listen, cp2.listen);
    let app = EchoApp::start().await;
    let b = sidecar(&cp1, &url, &controls, "b", Some(app.addr), &[]);
    b.wait_ready().await;
    let a_to_b = free_addr();
    let a = sidecar(&cp1, &url, &controls, "a", None, &[format!("{a_to_b}={}@{}", b.inbound.unwrap(), id("b"))]);
    a.wait_ready().await;
    let roots = std::fs::read_to_string(cp1.root_pem_path()).unwrap();
    let probe_cert = mint(&url, &id("probe"));
    let first_b_serial = presented_serial(b.inbound.unwrap(), &roots, Some(probe_cert.clone())).await.unwrap();

    let traffic = Traffic::start(format!("http://{a_to_b}/"), Duration::from_millis(20));
    wait_for("traffic flows", Duration::from_secs(5), || {
        let ok = traffic.ok.load(std::sync::atomic::Ordering::SeqCst);
        async move { ok > 20 }
    })
    .await;
    let killed_at = palisade::clock::now_unix();
    cp1.proc.kill9();
    let ledger = store(&url);
    // Renewed at half of a 20 s lifetime (±10 %): only replica 2 is left to issue.
    for who in ["a", "b"] {
        wait_for(&format!("{who} renewed at replica 2"), Duration::from_secs(30), || {
            let rows = ledger.certificates(Some(&id(who)), 20).unwrap();
            async move { rows.iter().any(|r| r.credential == "renewal" && r.issued_at >= killed_at) }
        })
        .await;
    }
    // B serves with the certificate replica 2 issued (the ledger row is written just before the
    // certificate is handed out, so wait for B to swap it in); traffic carried on meanwhile.
    let inbound = b.inbound.unwrap();
    let renewed_by_2 = || -> Vec<String> {
        let rows = ledger.certificates(Some(&id("b")), 50).unwrap();
        rows.into_iter().filter(|r| r.credential == "renewal" && r.issued_at >= killed_at).map(|r| r.serial).collect()
    };
    wait_for("B serves with the certificate replica 2 issued", Duration::from_secs(5), || {
        let (roots, cert, renewed) = (roots.clone(), probe_cert.clone(), renewed_by_2());
        async move {
            let serial = presented_serial(inbound, &roots, Some(cert)).await.unwrap_or_default();
            renewed.iter().any(|r| r.eq_ignore_ascii_case(&serial))
        }
    })
    .await;
    let new_b_serial = presented_serial(inbound, &roots, Some(probe_cert)).await.unwrap();
    assert_ne!(new_b_serial, first_b_serial);
    let before_stop = traffic.ok.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("traffic goes on after the renewal", Duration::from_secs(5), || {
        let ok = traffic.ok.load(std::sync::atomic::Ordering::SeqCst);
        async move { ok > before_stop + 20 }
    })
    .await;
    let (ok, failed, failures) = traffic.finish().await;
    assert_eq!(failed, 0, "{ok} ok, {failed} failed: {failures:?}");
    // Every certificate B presented, from either replica, is in the shared ledger.
    let serials: Vec<String> =
        ledger.certificates(Some(&id("b")), 50).unwrap().into_iter().map(|r| r.serial.to_lowercase()).collect();
    for serial in [first_b_serial, new_b_serial] {
        assert!(serials.contains(&serial.to_lowercase()), "{serial} not in the ledger {serials:?}");
    }
    for who in ["a", "b"] {
        let rows = ledger.certificates(Some(&id(who)), 50).unwrap();
        assert!(rows.iter().any(|r| r.credential == "join-token" && r.issued_at <= killed_at), "{who}: {rows:?}");
    }
    drop(cp2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_at_once_on_an_empty_database_both_come_up_on_one_schema_and_one_ca() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-migrate");
    let pg = PgServer::start(&dir);
    let url = pg.database("palisade");
    let (cp1, cp2) = tokio::join!(replica(&dir, "r1", &url, &[]), replica(&dir, "r2", &url, &[]));
    assert_eq!(
        pg.sql("palisade", "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"),
        "1,2"
    );
    assert_eq!(pg.sql("palisade", "SELECT count(*) FROM ca"), "1", "one CA for both");
    let (root1, root2) =
        (std::fs::read_to_string(cp1.root_pem_path()).unwrap(), std::fs::read_to_string(cp2.root_pem_path()).unwrap());
    assert_eq!(root1, root2, "both replicas trust the same root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reaches_the_store_over_tls_verified_against_the_store_ca_file() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-tls");
    let (cert, key, root) = server_tls();
    let pg = PgServer::start_with(&dir, Some((&cert, &key)));
    let url = pg.database("palisade");
    let ca_file = dir.join("db-ca.pem");
    std::fs::write(&ca_file, &root).unwrap();
    let control = |name: &str, url: &str, ca: Option<&Path>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["control", "--store", url, "--state-dir"]).arg(dir.join(name));
        cmd.args(["--listen", &free_addr().to_string(), "--admin", &free_addr().to_string()]);
        if let Some(ca) = ca {
            cmd.arg("--store-ca-file").arg(ca);
        }
        cmd
    };
    // In clear, the server refuses (only `hostssl` rules); an unknown CA is refused by us.
    let out = control("plain", &format!("{url}?sslmode=disable"), None).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no encryption"), "{out:?}");
    let other_root = dir.join("other-ca.pem");
    std::fs::write(&other_root, server_tls().2).unwrap();
    let out = control("wrong-ca", &format!("{url}?sslmode=require"), Some(&other_root)).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("certificate"), "{stderr}");
    // With the right root it comes up and issues.
    let cp =
        replica(&dir, "r1", &format!("{url}?sslmode=require"), &["--store-ca-file", ca_file.to_str().unwrap()]).await;
    assert_eq!(pg.sql("palisade", "SELECT count(*) FROM ca"), "1");
    let on_tls = pg.sql(
        "postgres",
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND datname = 'palisade'",
    );
    assert_ne!(on_tls, "0", "the replica's connections use TLS");
    drop(cp);
}

#[test]
fn a_bad_or_unreachable_store_url_is_a_clear_startup_error_without_the_password() {
    let dir = tempdir("replicas-badurl");
    let closed = free_addr();
    let cases = [
        (format!("postgres://palisade:SeCrEt-9@{closed}/palisade"), "postgres://palisade:[redacted]@"),
        ("postgresql://palisade:SeCrEt-9@127.0.0.1:notaport/db".to_string(), "not a valid PostgreSQL URL"),
        ("mysql://palisade:SeCrEt-9@127.0.0.1/db".to_string(), "not a PostgreSQL URL"),
    ];
    for (url, expected) in cases {
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(["control", "--store", &url, "--state-dir"])
            .arg(dir.join("state"))
            .args(["--listen", &free_addr().to_string(), "--admin", &free_addr().to_string()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: started anyway");
        assert!(started.elapsed() < Duration::from_secs(15), "{url}: took {:?} to fail", started.elapsed());
        assert!(stderr.contains(expected), "{url}: {stderr}");
        assert!(!stderr.contains("SeCrEt-9"), "{url}: the password leaked: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_deciding_the_same_rotation_step_at_once_take_it_once() {
    use palisade::control::ca_set::{CaSet, advance_rotation, start_rotation};
    use palisade::identity::KeyCustody;
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-step");
    let pg = PgServer::start(&dir);
    let custody = KeyCustody::default();
    for round in 0..6 {
        let url = pg.database(&format!("step{round}"));
        let (one, two) = (store(&url), store(&url));
        CaSet::load_or_init(&one, "cluster.local", &custody).unwrap();
        start_rotation(&one, "cluster.local", &custody).unwrap();
        // The new root has spread (no propagation wait): both replicas see the step due and
        // race to take it.
        let barrier = std::sync::Barrier::new(2);
        let took: Vec<bool> = std::thread::scope(|s| {
            let racers: Vec<_> = [&one, &two]
                .into_iter()
                .map(|replica| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        advance_rotation(replica, Duration::ZERO, Duration::from_secs(3600)).unwrap()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(took.iter().filter(|t| **t).count(), 1, "round {round}: {took:?}");
        let states: Vec<String> = one.ca_generations().unwrap().into_iter().map(|g| g.state).collect();
        assert_eq!(states, ["retiring", "active"], "round {round}");
    }
}

/// `palisade status` at either replica answers for both: every sidecar with the replica it is
/// connected to, the traffic its sidecars reported, and each resource's rollout over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_at_one_replica_shows_the_sidecars_traffic_and_rollout_of_both() {
    let _one_at_a_time = SERIAL.lock().await;
    let dir = tempdir("replicas-status");
    let pg = PgServer::start(&dir);
    let url = pg.database("palisade");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    std::fs::write(
        resources.join("p.yaml"),
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-get, namespace: test}\n\
         spec: {action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}\n",
    )
    .unwrap();
    let res = resources.display().to_string();
    let cp1 = replica(&dir, "r1", &url, &["--resources", &res]).await;
    let cp2 = replica(&dir, "r2", &url, &["--resources", &res]).await;
    let app = EchoApp::start().await;
    let fast = ["--telemetry-interval", "200ms"];
    // B, the destination (which reports the traffic), is served by replica 2; A by replica 1.
    let b = sidecar_with(&cp2, &url, &cp2.listen.to_string(), "b", Some(app.addr), &[], &fast);
    b.wait_ready().await;
    let a_to_b = free_addr();
    let route = format!("{a_to_b}={}@{}", b.inbound.unwrap(), id("b"));
    let a = sidecar_with(&cp1, &url, &cp1.listen.to_string(), "a", None, &[route], &fast);
    a.wait_ready().await;
    let client = http_client_unpooled();
    for _ in 0..5 {
        assert_eq!(get(&client, &format!("http://{a_to_b}/"), &[]).await.unwrap().0, 200);
    }

    let server = admin_login(&cp1, &url);
    let status = || {
        let out = Command::new(BIN).args(["status", "-o", "json"]).args(&server).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let on = |port: u16| format!(":{port}");
    wait_for("replica 1 answers for replica 2's sidecar and traffic", Duration::from_secs(15), || async {
        let report = status();
        let sidecar = |who: &str| {
            report["sidecars"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["spiffe_id"] == id(who) && s["connected"] == true)
                .cloned()
        };
        let (Some(sa), Some(sb)) = (sidecar("a"), sidecar("b")) else { return false };
        let edge = report["traffic"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["source"] == id("a") && e["destination"] == id("b") && e["requests"] == 5);
        let rollout = report["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "only-get" && r["selected"] == 2 && r["current"] == 2 && r["nacked"] == 0);
        sa["replica"].as_str().unwrap().ends_with(&on(cp1.listen.port()))
            && sb["replica"].as_str().unwrap().ends_with(&on(cp2.listen.port()))
            && edge
            && rollout
    })
    .await;
    // The traffic was reported to replica 2 only: counted once, not once per replica.
    let edges: Vec<_> =
        status()["traffic"].as_array().unwrap().iter().filter(|e| e["destination"] == id("b")).cloned().collect();
    assert_eq!(edges.len(), 1, "{edges:?}");
    drop((cp1, cp2));
}
