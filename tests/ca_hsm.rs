//! Issue 18: a CA whose keys live in a hardware security module (a real SoftHSM2 token,
//! through PKCS#11): it issues and rotates while its keys never leave the token.

mod ca_support;
mod common;
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ca_support::*;
use common::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

struct SoftHsm {
    conf: PathBuf,
    pin_file: PathBuf,
}

const TOKEN: &str = "palisade-ca";
const PIN: &str = "4711-0815";

/// A fresh SoftHSM2 token in its own directory, as an operator would initialise one.
fn softhsm(dir: &Path) -> SoftHsm {
    tools::softhsm();
    assert!(
        Path::new(SOFTHSM_MODULE).exists(),
        "{SOFTHSM_MODULE} is missing: install the Debian package softhsm2 (.ci/install-softhsm)"
    );
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", TOKEN, "--so-pin", "12345678", "--pin", PIN])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    SoftHsm { conf, pin_file }
}

impl SoftHsm {
    fn flags(&self) -> Vec<String> {
        vec![
            "--ca-pkcs11-module".into(),
            SOFTHSM_MODULE.into(),
            "--ca-pkcs11-token".into(),
            TOKEN.into(),
            "--ca-pkcs11-pin-file".into(),
            arg(&self.pin_file),
        ]
    }

    fn env(&self) -> [(&str, &str); 1] {
        [("SOFTHSM2_CONF", self.conf.to_str().unwrap())]
    }
}

/// A key pair as the token shows it to anyone logged in: its private half's protection
/// attributes and its public point.
struct TokenKeyView {
    sensitive: bool,
    extractable: bool,
    value_readable: bool,
    point: Vec<u8>,
}

/// Reads, through PKCS#11 in this test process, the key pair labelled `label`.
fn token_key(hsm: &SoftHsm, label: &str) -> TokenKeyView {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    // SoftHSM reads SOFTHSM2_CONF (set by the test before anything else) at C_Initialize.
    assert_eq!(std::env::var_os("SOFTHSM2_CONF").as_deref(), Some(hsm.conf.as_os_str()));
    let pkcs11 = Pkcs11::new(SOFTHSM_MODULE).unwrap();
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).unwrap();
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label().trim_end() == TOKEN)
        .unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    session.login(UserType::User, Some(&cryptoki::types::AuthPin::new(PIN.into()))).unwrap();
    let find = |class| {
        let found = session.find_objects(&[Attribute::Class(class), Attribute::Label(label.into())]).unwrap();
        assert_eq!(found.len(), 1, "one {class:?} labelled {label}");
        found[0]
    };
    let private = find(ObjectClass::PRIVATE_KEY);
    let attrs = session.get_attributes(private, &[AttributeType::Sensitive, AttributeType::Extractable]).unwrap();
    let (mut sensitive, mut extractable) = (false, true);
    for a in attrs {
        match a {
            Attribute::Sensitive(v) => sensitive = v,
            Attribute::Extractable(v) => extractable = v,
            _ => {}
        }
    }
    let value = session.get_attributes(private, &[AttributeType::Value]);
    let value_readable = matches!(value, Ok(ref v) if v.iter().any(|a| matches!(a, Attribute::Value(_))));
    let public = find(ObjectClass::PUBLIC_KEY);
    let Attribute::EcPoint(der) = session.get_attributes(public, &[AttributeType::EcPoint]).unwrap().remove(0) else {
        panic!("no EC point")
    };
    TokenKeyView { sensitive, extractable, value_readable, point: der[2..].to_vec() }
}

/// The public key (uncompressed point) of a PEM certificate.
fn cert_point(cert_pem: &str) -> Vec<u8> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.public_key().subject_public_key.data.to_vec()
}

#[test]
fn with_an_hsm_the_ca_issues_and_rotates_while_its_keys_stay_in_the_token() {
    let dir = tempdir("hsm");
    let hsm = softhsm(&dir);
    // This test reads the token too, and SoftHSM finds its token directory only through the
    // environment. This binary holds this one test, and no other thread of it runs yet (the
    // runtime is built below), so nothing reads the environment while it changes.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &hsm.conf) };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(hsm_flow(dir, hsm));
}

async fn hsm_flow(dir: PathBuf, hsm: SoftHsm) {
    let state = dir.join("state");
    let (listen, admin) = (free_addr(), free_addr());
    let mut args: Vec<String> = [
        "control",
        "--state-dir",
        state.to_str().unwrap(),
        "--listen",
        &listen.to_string(),
        "--admin",
        &admin.to_string(),
        "--cert-ttl",
        "3s",
        "--default-policy",
        "allow-authenticated",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(hsm.flags());
    let proc = Proc::spawn_with_env("control-hsm", &dir, &args, &hsm.env());
    wait_for("control plane ready", Duration::from_secs(30), || async {
        status_of(&format!("http://{admin}/ready")).await == Some(200)
    })
    .await;
    assert!(proc.log_text().contains("ca_signer_in_token=true"), "{}", proc.log_text());
    let cp = ControlPlane { proc, dir: dir.clone(), state: state.clone(), listen, admin };
    let first = certify(&cp, &id("web")).await;
    let first_at = rustls::pki_types::UnixTime::now();

    let mut rotate = vec!["control", "ca", "rotate", "--state-dir", state.to_str().unwrap()];
    let flags = hsm.flags();
    rotate.extend(flags.iter().map(String::as_str));
    let out = palisade(&rotate, &hsm.env());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = palisade::control::Store::open(&state).unwrap();
    // Through its steps: generation 2 signs, then generation 1 retires.
    wait_for("generation 2 signs", Duration::from_secs(30), || {
        let active = store.ca_generations().unwrap().iter().any(|g| g.generation == 2 && g.state == "active");
        async move { active }
    })
    .await;
    let second = certify(&cp, &id("api")).await;
    let second_at = rustls::pki_types::UnixTime::now();

    let gens = store.ca_generations().unwrap();
    for g in &gens {
        // The store holds references, never a key.
        assert!(g.material.root_key_pem.starts_with("pkcs11:token=palisade-ca;"), "{}", g.material.root_key_pem);
        assert!(g.material.intermediate_key_pem.starts_with("pkcs11:"), "{}", g.material.intermediate_key_pem);
    }
    for (path, bytes) in files(&state) {
        assert!(!contains(&bytes, b"PRIVATE KEY"), "{} holds a private key", path.display());
    }
    for (g, chain, at) in [(&gens[0], &first, first_at), (&gens[1], &second, second_at)] {
        let int_pem = &g.material.intermediate_cert_pem;
        assert_eq!(chain[1], CertificateDer::from_pem_slice(int_pem.as_bytes()).unwrap());
        let key = token_key(&hsm, &format!("palisade:cluster.local:generation-{}:intermediate", g.generation));
        assert!(key.sensitive && !key.extractable && !key.value_readable, "generation {} key can leave", g.generation);
        assert_eq!(key.point, cert_point(int_pem), "the intermediate certificate is the token key's");
        let root = token_key(&hsm, &format!("palisade:cluster.local:generation-{}:root", g.generation));
        assert!(root.sensitive && !root.extractable);
        verify_chain_at(chain, &g.material.root_cert_pem, at).unwrap();
    }
    wait_for("generation 1 retired", Duration::from_secs(120), || {
        let retired = store.ca_generations().unwrap().iter().any(|g| g.generation == 1 && g.state == "retired");
        async move { retired }
    })
    .await;
    let third = certify(&cp, &id("web")).await;
    verify_chain(&third, &std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let bundle = std::fs::read_to_string(cp.root_pem_path()).unwrap();
    let err = verify_chain_at(&first, &bundle, first_at).unwrap_err();
    assert!(err.contains("UnknownIssuer"), "the old root left the bundle: {err}");
}
