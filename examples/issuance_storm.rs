//! A renewal storm against one real control plane: how many certificates a second it issues
//! with every one durable in the ledger before it is handed out.
//!
//! Starts `palisade control` (build it first), enrolls `--identities` workloads with join tokens,
//! then has them renew `--renewals` times in all, `--in-flight` requests at once, each over its
//! workload's own mTLS connection with a fresh key (the CSRs are made before the clock starts, so
//! the figure is the control plane's, not the key generation's). Every renewal is checked in the
//! ledger afterwards, and `palisade_control_ledger_commits_total` tells how many rows each
//! durable commit carried.
//!
//! ```text
//! cargo build --release --bin palisade --example issuance_storm
//! target/release/examples/issuance_storm --renewals 20000
//! ```
#![forbid(unsafe_code)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use common::{free_addr, http_get, ms, utc_now};
use palisade::agent::ControlClient;
use palisade::control::store::{CredentialKind, LedgerQuery, StoreArgs};
use palisade::proto::identity::CertifyRequest;
use palisade::proto::identity::certify_request::Credential;
use palisade::proto::identity::identity_client::IdentityClient;
use palisade::tls::{CertStore, TrustBundle};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::Semaphore;

/// Flags.
#[derive(Parser, Debug)]
struct Args {
    /// Workloads that renew (each holds one mTLS connection to the control plane).
    #[arg(long, default_value_t = 64)]
    identities: usize,
    /// Renewals in all.
    #[arg(long, default_value_t = 20_000)]
    renewals: usize,
    /// Renewals waiting for an answer at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// The `palisade` binary to start.
    #[arg(long, default_value = "target/release/palisade")]
    bin: PathBuf,
    /// The control plane's `--store` (a PostgreSQL URL); by default SQLite in its state directory.
    #[arg(long)]
    store: Option<String>,
}

/// The control plane process, killed on drop.
struct ControlPlane(Child);

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    palisade::tls::install_crypto_provider();
    if !args.bin.is_file() {
        bail!("{} not found: build it first, or pass --bin", args.bin.display());
    }
    let dir = std::env::temp_dir().join(format!("palisade-storm-{}", std::process::id()));
    let state = dir.join("state");
    let (listen, admin) = (free_addr()?, free_addr()?);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("control.log");
    let mut command = Command::new(&args.bin);
    command.args(["control", "--state-dir"]).arg(&state);
    command.args(["--listen", &listen.to_string(), "--admin", &admin.to_string()]);
    if let Some(store) = &args.store {
        command.args(["--store", store]);
    }
    let mut cp = ControlPlane(
        command
            .env("PALISADE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the control plane")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/ready").await.map(|(s, _)| s) != Some(200) {
        if !matches!(cp.0.try_wait(), Ok(None)) || Instant::now() > deadline {
            bail!("control plane not ready; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let store_args = StoreArgs { store: args.store.clone(), store_ca_file: None };
    let store = palisade::control::Store::open_with(&state, &store_args)?;
    let root_pem = std::fs::read_to_string(state.join("ca/root.pem")).context("reading ca/root.pem")?;
    let control_id = palisade::identity::SpiffeId::control_plane("cluster.local")?;

    // Enrollment, outside the measurement: one join token per workload.
    let mut clients = Vec::with_capacity(args.identities);
    for i in 0..args.identities {
        let id = format!("spiffe://cluster.local/ns/storm/sa/w{i}").parse()?;
        let token = store.create_join_token(&id, Duration::from_secs(600))?;
        let certs = CertStore::new();
        let client = ControlClient::new(
            &listen.to_string(),
            TrustBundle::from_pem(&root_pem)?,
            certs.clone(),
            control_id.clone(),
        );
        let (csr, key) = csr()?;
        let resp = client.certify(csr, Some(Credential::JoinToken(token))).await?;
        let chain = palisade::tls::certs_from_pem(&resp.certificate_chain_pem)?;
        let signing_key = palisade::tls::provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))?;
        certs.set(Arc::new(CertifiedKey::new(chain, signing_key)), resp.not_after);
        clients.push(IdentityClient::new(client.channel().await?));
    }
    let csrs = csrs(args.renewals)?;
    println!(
        "{} workloads enrolled; {} CSRs ready; storm of {} renewals, {} in flight",
        args.identities,
        csrs.len(),
        args.renewals,
        args.in_flight
    );

    let in_flight = Arc::new(Semaphore::new(args.in_flight));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.renewals);
    for (n, csr_der) in csrs.into_iter().enumerate() {
        let permit = in_flight.clone().acquire_owned().await?;
        let mut client = clients[n % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = client.certify(CertifyRequest { csr_der, credential: None }).await;
            drop(permit);
            outcome.map(|_| sent.elapsed()).map_err(|e| e.to_string())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut errors = Vec::new();
    for task in tasks {
        match task.await? {
            Ok(latency) => latencies.push(latency),
            Err(e) => errors.push(e),
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();

    // What the control plane says it did, and what the ledger holds.
    let metrics = http_get(admin, "/metrics").await.map(|(_, body)| body).unwrap_or_default();
    let commits = metric(&metrics, "palisade_control_ledger_commits_total");
    let query = LedgerQuery { limit: (args.renewals + args.identities + 16) as u32, ..Default::default() };
    let renewed = store
        .ledger_page(&query)?
        .iter()
        .filter(|(entry, _)| entry.credential == CredentialKind::Renewal.as_str())
        .count();
    let pct = |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)));
    println!(
        "{} certificates in {:.2} s: {rate:.0} certificates/s; latency p50 {} p99 {} max {}; {} errors{}",
        latencies.len(),
        elapsed.as_secs_f64(),
        pct(0.5).copied().map(ms).unwrap_or_default(),
        pct(0.99).copied().map(ms).unwrap_or_default(),
        latencies.last().copied().map(ms).unwrap_or_default(),
        errors.len(),
        errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default(),
    );
    let commits = match commits {
        Some(c) => {
            format!("{c:.0} commits in all ({:.1} rows per commit)", (renewed + args.identities) as f64 / c.max(1.0))
        }
        None => "commits not reported (a control plane without group commit)".to_string(),
    };
    println!("ledger: {renewed} renewals recorded; {commits}; store {}; {}", store.describe(), utc_now());
    drop(cp);
    if renewed != latencies.len() {
        bail!("{} renewals answered but {renewed} in the ledger", latencies.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A fresh P-256 key and a CSR for it: (CSR DER, PKCS#8 key DER).
fn csr() -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_der()))
}

/// `n` CSRs, made on every core.
fn csrs(n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || (t..n).step_by(threads).map(|_| csr().map(|(c, _)| c)).collect::<Result<Vec<_>, _>>())
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("CSR thread panicked"))??);
        }
        Ok(all)
    })
}

/// The value of an unlabelled metric in OpenMetrics text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
