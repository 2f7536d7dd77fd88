//! Micro benchmarks of certificate issuance: the CPU cost of signing, and the full control-plane
//! path (CSR check, signing, ledger commit) without the network.
//!
//! The ledger benchmarks use a real SQLite store on disk (under cargo's per-target temp dir, not
//! tmpfs) with the store's own settings, WAL and synchronous=FULL: every commit is an fsync, and
//! that fsync is part of what a workload waits for when it asks for a certificate.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use palisade::control::Store;
use palisade::control::store::{CredentialKind, StoreError, TokenRefusal};
use palisade::identity::csr::verify_csr;
use palisade::identity::{CaMaterial, CertificateAuthority, IssuedCertificate, SpiffeId};
use rcgen::{CertificateParams, KeyPair};

const TTL: Duration = Duration::from_secs(3600);

/// A P-256 CSR as the sidecar's certificate manager makes one.
fn workload_csr() -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    CertificateParams::default().serialize_request(&key).expect("CSR").der().to_vec()
}

fn ca() -> CertificateAuthority {
    CertificateAuthority::load(CaMaterial::generate("cluster.local", 1).expect("CA material")).expect("CA loads")
}

fn workload_id() -> SpiffeId {
    "spiffe://cluster.local/ns/shop/sa/web".parse().expect("valid SPIFFE ID")
}

/// A fresh store directory on disk; removed when dropped.
struct StateDir(PathBuf);

impl StateDir {
    fn new(name: &str) -> Self {
        let dir =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("palisade-bench-{name}-{}", rand::random::<u64>()));
        StateDir(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `redeem_join_token`'s issue callback may fail with, as in the Certify service.
#[derive(Debug, thiserror::Error)]
enum IssueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Token(#[from] TokenRefusal),
    #[error(transparent)]
    Ca(#[from] palisade::identity::ca::CaError),
}

fn bench_identity(c: &mut Criterion) {
    palisade::tls::install_crypto_provider();
    let ca = ca();
    let id = workload_id();
    let csr = workload_csr();

    let mut group = c.benchmark_group("identity");
    group.sample_size(20);

    // CPU only: parse and verify the CSR (one ECDSA verify), sign the leaf (one ECDSA sign).
    group.bench_function("sign_workload", |b| {
        b.iter(|| {
            let verified = verify_csr(black_box(&csr)).expect("CSR verifies");
            ca.sign_workload(&id, &verified.public_key, TTL, &[]).expect("signs")
        })
    });

    // The renewal path of Certify: verify, sign, commit the ledger row (an fsync).
    let dir = StateDir::new("ledger");
    let store = Store::open(&dir.0).expect("store opens");
    group.bench_function("issue_with_ledger", |b| {
        b.iter(|| {
            let verified = verify_csr(black_box(&csr)).expect("CSR verifies");
            let issued = ca.sign_workload(&id, &verified.public_key, TTL, &[]).expect("signs");
            store.record_certificate(&issued, CredentialKind::Renewal).expect("ledger commit");
            issued
        })
    });

    // The ledger commit alone (one INSERT, one fsync); signing is setup. Shows how much of
    // `issue_with_ledger` is the disk rather than the CPU.
    group.bench_function("ledger_commit", |b| {
        b.iter_batched(
            || {
                let verified = verify_csr(&csr).expect("CSR verifies");
                ca.sign_workload(&id, &verified.public_key, TTL, &[]).expect("signs")
            },
            |issued| store.record_certificate(&issued, CredentialKind::Renewal).expect("ledger commit"),
            BatchSize::SmallInput,
        )
    });

    // The join-token path of Certify: verify, then in one transaction look the token up, sign,
    // spend the token and record the certificate. Minting the token (its own commit) is setup.
    let dir = StateDir::new("redeem");
    let store = Store::open(&dir.0).expect("store opens");
    group.bench_function("redeem_join_token", |b| {
        b.iter_batched(
            || store.create_join_token(&id, TTL).expect("token minted"),
            |token| {
                let verified = verify_csr(black_box(&csr)).expect("CSR verifies");
                store
                    .redeem_join_token::<IssueError>(&token, |id| {
                        Ok(ca.sign_workload(id, &verified.public_key, TTL, &[])?)
                    })
                    .expect("token redeems")
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();

    // Once, outside timing: the redeemed certificate carries the token's identity.
    let token = store.create_join_token(&id, TTL).expect("token minted");
    let verified = verify_csr(&csr).expect("CSR verifies");
    let issued: IssuedCertificate = store
        .redeem_join_token::<IssueError>(&token, |id| Ok(ca.sign_workload(id, &verified.public_key, TTL, &[])?))
        .expect("token redeems");
    assert_eq!(issued.spiffe_id, id);
}

criterion_group!(benches, bench_identity);
criterion_main!(benches);
