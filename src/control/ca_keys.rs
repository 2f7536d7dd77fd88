//! The flags that say where the CA's private keys are kept (a key-encryption key, a PKCS#11
//! token), shared by `palisade control` and the offline `palisade control ca rotate`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::identity::KeyCustody;
use crate::identity::pkcs11::Token;
use crate::identity::seal::Kek;

/// Environment variable holding the KEK as base64 of 32 bytes.
pub const KEK_ENV: &str = "PALISADE_CA_KEK";
/// Environment variable holding the PKCS#11 user PIN.
pub const PIN_ENV: &str = "PALISADE_CA_PKCS11_PIN";

/// Where the CA's private keys are kept. With none of these, keys are stored in clear (a
/// warning says so at start).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CaKeyArgs {
    /// File holding the key-encryption key that seals the CA's private keys in the store and
    /// the CA Secret (AES-256-GCM): exactly 32 raw bytes, or base64 of 32 bytes (e.g.
    /// `head -c32 /dev/urandom | base64`). Alternatively PALISADE_CA_KEK (base64 of 32 bytes).
    #[arg(long)]
    pub ca_kek_file: Option<PathBuf>,
    /// Kubernetes: the Secret, in the control plane's namespace, whose key `kek` holds the
    /// key-encryption key (32 raw bytes or base64 of 32 bytes).
    #[arg(long, env = "PALISADE_CA_KEK_SECRET")]
    pub ca_kek_secret: Option<String>,
    /// PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so): new CA generations get their keys
    /// generated inside the token, and signing goes through it.
    #[arg(long, env = "PALISADE_CA_PKCS11_MODULE", requires = "ca_pkcs11_token")]
    pub ca_pkcs11_module: Option<PathBuf>,
    /// Label of the PKCS#11 token holding the CA keys.
    #[arg(long, env = "PALISADE_CA_PKCS11_TOKEN", requires = "ca_pkcs11_module")]
    pub ca_pkcs11_token: Option<String>,
    /// File holding the token's user PIN (alternatively PALISADE_CA_PKCS11_PIN).
    #[arg(long)]
    pub ca_pkcs11_pin_file: Option<PathBuf>,
}

impl CaKeyArgs {
    /// The KEK from the file or the environment (not the Kubernetes Secret: see
    /// [`custody`](Self::custody)). More than one source is refused rather than guessed.
    fn local_kek(&self) -> anyhow::Result<Option<Kek>> {
        let env = std::env::var(KEK_ENV).ok().filter(|v| !v.trim().is_empty());
        match (&self.ca_kek_file, env, &self.ca_kek_secret) {
            (Some(_), Some(_), _) | (_, Some(_), Some(_)) | (Some(_), _, Some(_)) => {
                anyhow::bail!("give the CA key-encryption key once: --ca-kek-file, {KEK_ENV} or --ca-kek-secret")
            }
            (Some(path), None, None) => {
                Ok(Some(Kek::from_file(path)?.with_origin(format!("--ca-kek-file {}", path.display()))))
            }
            (None, Some(b64), None) => Ok(Some(Kek::from_bytes(b64.as_bytes(), KEK_ENV)?)),
            _ => Ok(None),
        }
    }

    /// Builds the custody these flags describe: reads the KEK (from the Secret through `kube`
    /// when `--ca-kek-secret` is given) and logs in to the token. Logs once how the keys are
    /// kept; without a KEK or token that is a warning.
    pub async fn custody(&self, kube: Option<(&kube::Client, &str)>) -> anyhow::Result<KeyCustody> {
        let mut kek = self.local_kek()?;
        if let Some(name) = &self.ca_kek_secret {
            let Some((client, namespace)) = kube else {
                anyhow::bail!("--ca-kek-secret needs --kubernetes; use --ca-kek-file or {KEK_ENV} standalone");
            };
            kek = Some(crate::k8s::ca_secret::load_kek(client.clone(), namespace, name).await?);
        }
        let token = match (&self.ca_pkcs11_module, &self.ca_pkcs11_token) {
            (Some(module), Some(label)) => {
                let pin = match (&self.ca_pkcs11_pin_file, std::env::var(PIN_ENV)) {
                    (Some(path), _) => std::fs::read_to_string(path)
                        .with_context(|| format!("reading --ca-pkcs11-pin-file {}", path.display()))?
                        .trim()
                        .to_string(),
                    (None, Ok(pin)) => pin,
                    (None, Err(_)) => {
                        anyhow::bail!("--ca-pkcs11-module needs the token's PIN: --ca-pkcs11-pin-file or {PIN_ENV}")
                    }
                };
                let module_path = module.clone();
                let label = label.clone();
                // Loading a module and logging in may block (a network HSM).
                let token = tokio::task::spawn_blocking(move || Token::open(&module_path, &label, &pin)).await??;
                Some(token)
            }
            _ => None,
        };
        let custody = KeyCustody { kek: kek.map(Arc::new), token };
        log_custody(&custody);
        Ok(custody)
    }
}

/// The one line that says how the CA keys are kept (`ca_keys_sealed`, `ca_signer_in_token`),
/// which an operator or a posture audit greps for.
fn log_custody(custody: &KeyCustody) {
    let kek = custody.kek.as_ref().map(|k| k.origin().to_string());
    let token = custody.token.as_ref().map(|t| t.label().to_string());
    if kek.is_none() && token.is_none() {
        tracing::warn!(
            ca_keys_sealed = false,
            ca_signer_in_token = false,
            "the CA's private keys are stored in clear: give a key-encryption key (--ca-kek-file, {KEK_ENV}, \
             --ca-kek-secret) or a PKCS#11 token (--ca-pkcs11-module) outside of experiments"
        );
    } else {
        tracing::info!(
            ca_keys_sealed = kek.is_some(),
            ca_signer_in_token = token.is_some(),
            kek,
            token,
            "CA key custody"
        );
    }
}
