//! `palisade certs dev`: a throwaway CA and two workload certificates for local experiments.

use std::path::Path;
use std::time::Duration;

use rcgen::KeyPair;

use super::{CaMaterial, CertificateAuthority, SpiffeId};

const README: &str = "# Development certificates — for local experiments only

These files were written by `palisade certs dev`. The private keys are in plain files next to the
certificates and anyone with this directory can impersonate these identities. Never use them
outside your own machine, never trust `root.pem` anywhere that matters.

Real sidecars never see files like these: they generate their key in memory and get a
short-lived certificate from the control plane (`palisade control`).

| file | what |
|---|---|
| root.pem / root.key | dev root CA |
| intermediate.pem / intermediate.key | dev intermediate CA (the signer) |
| web.pem / web.key | spiffe://cluster.local/ns/demo/sa/web (chain: leaf + intermediate) |
| orders.pem / orders.key | spiffe://cluster.local/ns/demo/sa/orders |

Inspect one with `openssl x509 -in web.pem -noout -text`.
";

/// Writes the dev CA and two workload certificates into `out`.
pub fn write_dev_certs(out: &Path, lifetime: Duration) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(out)?;
    let material = CaMaterial::generate("cluster.local", 1)?;
    let ca = CertificateAuthority::load(material.clone())?;
    let mut written = vec![];
    let mut write = |name: &str, body: &str| -> anyhow::Result<()> {
        std::fs::write(out.join(name), body)?;
        written.push(name.to_string());
        Ok(())
    };
    write("root.pem", &material.root_cert_pem)?;
    write("root.key", &material.root_key_pem)?;
    write("intermediate.pem", &material.intermediate_cert_pem)?;
    write("intermediate.key", &material.intermediate_key_pem)?;
    for sa in ["web", "orders"] {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let id = SpiffeId::workload("cluster.local", "demo", sa)?;
        let issued = ca.sign_workload(&id, &key, lifetime, &[])?;
        write(&format!("{sa}.pem"), &issued.chain_pem)?;
        write(&format!("{sa}.key"), &key.serialize_pem())?;
    }
    write("README.md", README)?;
    Ok(written)
}
