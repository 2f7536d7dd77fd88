//! Helpers of the CA-at-rest tests: certificates asked of a real control plane, chains
//! verified as a peer would, and the files of a state directory searched for keys.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use palisade::agent::ControlClient;
use palisade::control::store::CaGeneration;
use palisade::identity::KeyCustody;
use palisade::identity::seal::Kek;
use palisade::proto::identity::certify_request::Credential;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::common::*;

/// A KEK file holding base64 of 32 `byte`s.
pub fn kek_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode([byte; 32])).unwrap();
    path
}

pub fn custody(byte: u8) -> KeyCustody {
    KeyCustody { kek: Some(Arc::new(Kek::from_bytes(&[byte; 32], "test").unwrap())), token: None }
}

pub fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// Runs the CLI; returns its output.
pub fn palisade(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN).args(args).envs(env.iter().copied()).output().unwrap()
}

/// Starts `palisade control` that must fail; returns its stderr once it has exited.
pub fn failed_start(dir: &Path, extra: &[&str]) -> String {
    let state = dir.join("state");
    let mut args = vec!["control", "--state-dir", state.to_str().unwrap()];
    let (listen, admin) = (free_addr().to_string(), free_addr().to_string());
    args.extend(["--listen", &listen, "--admin", &admin]);
    args.extend(extra);
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the control plane started although it must not");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asks the control plane for a workload certificate with a join token; returns the chain, leaf
/// first.
pub async fn certify(cp: &ControlPlane, identity: &str) -> Vec<CertificateDer<'static>> {
    palisade::tls::install_crypto_provider();
    let bundle = palisade::tls::TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let client = ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        palisade::tls::CertStore::new(),
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
    let resp = client.certify(csr, Some(Credential::JoinToken(cp.token(identity)))).await.unwrap();
    CertificateDer::pem_slice_iter(resp.certificate_chain_pem.as_bytes()).collect::<Result<_, _>>().unwrap()
}

/// Verifies `chain` (leaf, intermediate) up to the roots in `roots_pem` as a peer would.
pub fn verify_chain(chain: &[CertificateDer<'static>], roots_pem: &str) -> Result<(), String> {
    verify_chain_at(chain, roots_pem, rustls::pki_types::UnixTime::now())
}

/// Like [`verify_chain`] at time `at` (a short-lived certificate checked after it expired).
pub fn verify_chain_at(
    chain: &[CertificateDer<'static>],
    roots_pem: &str,
    at: rustls::pki_types::UnixTime,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(root.unwrap()).unwrap();
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), palisade::tls::provider())
            .build()
            .unwrap();
    verifier.verify_client_cert(&chain[0], &chain[1..], at).map(|_| ()).map_err(|e| e.to_string())
}

/// Every file under `dir` with its bytes (the database, its WAL and shared memory, exports).
pub fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What a key in clear looks like in a file: its PEM header, its PKCS#8 DER, its first line of
/// base64.
pub fn clear_forms(pem: &str) -> Vec<Vec<u8>> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap().secret_pkcs8_der().to_vec();
    let first_b64 = pem.lines().nth(1).unwrap().as_bytes().to_vec();
    vec![der, first_b64]
}

/// Asserts no file under `state` holds any CA key of `generations` (opened) in clear.
pub fn assert_no_clear_key(state: &Path, generations: &[CaGeneration]) {
    let files = files(state);
    assert!(files.iter().any(|(p, _)| p.ends_with("state.db")), "the store is missing");
    for (path, bytes) in &files {
        assert!(!contains(bytes, b"PRIVATE KEY"), "{} holds a PEM private key", path.display());
        for g in generations {
            for (role, pem) in [("root", &g.material.root_key_pem), ("intermediate", &g.material.intermediate_key_pem)]
            {
                for form in clear_forms(pem) {
                    assert!(
                        !contains(bytes, &form),
                        "{} holds generation {}'s {role} key in clear",
                        path.display(),
                        g.generation
                    );
                }
            }
        }
    }
}

pub fn generations(state: &Path) -> Vec<CaGeneration> {
    palisade::control::Store::open(state).unwrap().ca_generations().unwrap()
}

/// Folds the WAL into the database and removes it, so a snapshot of the files is the whole
/// state and a later read-only open has nothing to fold in.
pub fn checkpoint(state: &Path) {
    let conn = rusqlite::Connection::open(state.join("state.db")).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
}
