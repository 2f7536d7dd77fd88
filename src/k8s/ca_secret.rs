//! The mesh CA in a Kubernetes Secret, so every control-plane replica signs with the same
//! intermediate and sidecars trust one root. The first replica to start creates it; a replica
//! that loses the creation race reads the winner's.
//!
//! With a key-encryption key, the Secret's two private keys are sealed (bound to the Secret's
//! namespace and name, their role and their certificate); a Secret found with keys in clear is
//! replaced by a sealed one. The KEK itself may come from another Secret ([`load_kek`]).
//!
//! The Secret holds every CA generation and where it stands in a rotation (`generations.json`;
//! its four PEM keys are the active generation, as earlier versions wrote them), so rotation is
//! one operation for the whole mesh: it is written with optimistic concurrency ([`update`]) and
//! every replica watches it ([`watch`]) and mirrors it. A Secret without `generations.json` (an
//! earlier version's) is one active generation.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};

use futures_util::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};

use crate::identity::seal::Kek;
use crate::identity::{CaMaterial, KeyCustody};

/// One CA generation as the Secret shares it, its keys opened.
#[derive(Clone, Debug)]
pub struct SharedGeneration {
    pub generation: u32,
    /// `next`, `active`, `retiring` or `retired`.
    pub state: String,
    /// When it was created (Unix seconds): a `next` generation signs once the bundle holding
    /// its root has had time to reach every sidecar.
    pub created_at: i64,
    /// When a `retiring` generation retires (Unix seconds).
    pub retire_after: Option<i64>,
    pub material: CaMaterial,
}

/// How `generations.json` holds a generation: keys sealed when there is a KEK.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredGeneration {
    generation: u32,
    state: String,
    created_at: i64,
    #[serde(default)]
    retire_after: Option<i64>,
    root_cert_pem: String,
    root_key_pem: String,
    intermediate_cert_pem: String,
    intermediate_key_pem: String,
}

/// Why the CA Secret was not changed.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    /// The change itself was refused (e.g. a rotation is already in progress).
    #[error("{0}")]
    Refused(String),
    #[error("Secret {0}: {1}")]
    Invalid(String, String),
    #[error("Secret {0}: {1}")]
    Api(String, kube::Error),
    #[error(
        "Secret {0} is immutable (an earlier version created it so); a rotation must update it. Make it mutable \
         once: kubectl get secret -n NAMESPACE NAME -o json | jq 'del(.immutable)' | kubectl replace --force -f -"
    )]
    Immutable(String),
    #[error("Secret {0}: still conflicting after {1} attempts")]
    Contended(String, usize),
}

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate.key";
/// Every generation with its state, as JSON.
const GENERATIONS: &str = "generations.json";

/// The key of the KEK Secret's data that holds the key-encryption key.
pub const KEK_KEY: &str = "kek";

/// Reads the key-encryption key from the Secret `namespace/name`, key `kek` (32 raw bytes or
/// base64 of 32 bytes).
pub async fn load_kek(client: kube::Client, namespace: &str, name: &str) -> anyhow::Result<Kek> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let secret =
        secrets.get(name).await.map_err(|e| anyhow::anyhow!("reading the KEK Secret {namespace}/{name}: {e}"))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEK_KEY))
        .ok_or_else(|| anyhow::anyhow!("the KEK Secret {namespace}/{name} has no key {KEK_KEY:?}"))?;
    let origin = format!("--ca-kek-secret {namespace}/{name}");
    Ok(Kek::from_bytes(&bytes.0, &origin)?)
}

/// The associated-data scope of keys sealed in the Secret: its namespace and name.
fn scope(namespace: &str, name: &str) -> String {
    format!("Secret {namespace}/{name}")
}

/// The Secret's data for `material`, keys sealed when `custody` has a KEK.
pub fn secret_data(
    material: &CaMaterial,
    custody: &KeyCustody,
    namespace: &str,
    name: &str,
) -> BTreeMap<String, ByteString> {
    let material = match &custody.kek {
        Some(kek) => material.sealed(kek, &scope(namespace, name)),
        None => material.clone(),
    };
    [
        (ROOT_CERT, material.root_cert_pem),
        (ROOT_KEY, material.root_key_pem),
        (INTERMEDIATE_CERT, material.intermediate_cert_pem),
        (INTERMEDIATE_KEY, material.intermediate_key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect()
}

/// The associated-data scope of one generation's keys in `generations.json`.
fn generation_scope(namespace: &str, name: &str, generation: u32) -> String {
    format!("{} generation {generation}", scope(namespace, name))
}

/// The Secret's data for `generations`: the active one's four PEM keys, and every generation
/// in `generations.json`; keys sealed when `custody` has a KEK.
pub fn shared_data(
    generations: &[SharedGeneration],
    custody: &KeyCustody,
    namespace: &str,
    name: &str,
) -> BTreeMap<String, ByteString> {
    let mut data = generations
        .iter()
        .find(|g| g.state == "active")
        .map(|g| secret_data(&g.material, custody, namespace, name))
        .unwrap_or_default();
    let stored: Vec<StoredGeneration> = generations
        .iter()
        .map(|g| {
            let m = match &custody.kek {
                Some(kek) => g.material.sealed(kek, &generation_scope(namespace, name, g.generation)),
                None => g.material.clone(),
            };
            StoredGeneration {
                generation: g.generation,
                state: g.state.clone(),
                created_at: g.created_at,
                retire_after: g.retire_after,
                root_cert_pem: m.root_cert_pem,
                root_key_pem: m.root_key_pem,
                intermediate_cert_pem: m.intermediate_cert_pem,
                intermediate_key_pem: m.intermediate_key_pem,
            }
        })
        .collect();
    let json = serde_json::to_vec_pretty(&stored).unwrap_or_default();
    data.insert(GENERATIONS.to_string(), ByteString(json));
    data
}

fn ca_secret(namespace: &str, name: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "palisade".to_string())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        // Mutable: a rotation updates it (with optimistic concurrency) for every replica.
        data: Some(data),
        ..Default::default()
    }
}

/// Reads the CA generations from `namespace/name` (keys opened), creating the Secret with one
/// new generation first if it does not exist. A Secret holding keys in clear is replaced by a
/// sealed one when there is a KEK.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    custody: &KeyCustody,
) -> anyhow::Result<Vec<SharedGeneration>> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let failed = |e: String| anyhow::anyhow!("Secret {namespace}/{name}: {e}");
    if let Some(secret) = secrets.get_opt(name).await? {
        let (generations, clear) = shared_from_secret(&secret, custody, namespace, name).map_err(failed)?;
        if clear && custody.kek.is_some() {
            seal_in_place(&secrets, &secret, &generations, custody, namespace, name).await?;
        }
        return Ok(generations);
    }
    // No CA Secret: a migration stopped between deleting it and writing it again left its
    // sealed copy, which must come back rather than a new CA. Only a control plane with a KEK
    // migrates (and may read the copy: without one, least privilege grants no access to it).
    let copy = match custody.kek {
        Some(_) => secrets.get_opt(&sealing_copy(name)).await?,
        None => None,
    };
    if let Some(copy) = copy {
        let (generations, _) = shared_from_secret(&copy, custody, namespace, name).map_err(failed)?;
        let data = copy.data.clone().unwrap_or_default();
        match secrets.create(&PostParams::default(), &ca_secret(namespace, name, data)).await {
            Ok(_) => tracing::warn!(
                namespace,
                name,
                "restored the CA Secret from the sealed copy an interrupted migration left"
            ),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        delete_sealing_copy(&secrets, name).await;
        return Ok(generations);
    }
    let first = SharedGeneration {
        generation: 1,
        state: "active".into(),
        created_at: crate::clock::now_unix(),
        retire_after: None,
        material: CaMaterial::generate_in(trust_domain, 1, custody)?,
    };
    let generations = vec![first];
    let secret = ca_secret(namespace, name, shared_data(&generations, custody, namespace, name));
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(
                namespace,
                name,
                sealed = custody.kek.is_some(),
                "created the mesh CA and stored it in a Secret"
            );
            Ok(generations)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Another replica created it between our read and our create.
            let secret = secrets.get(name).await?;
            Ok(shared_from_secret(&secret, custody, namespace, name).map_err(failed)?.0)
        }
        Err(e) => Err(e.into()),
    }
}

/// The name of the sealed copy a migration writes before it deletes the clear CA Secret.
fn sealing_copy(name: &str) -> String {
    format!("{name}-sealing")
}

async fn delete_sealing_copy(secrets: &Api<Secret>, name: &str) {
    if let Err(e) = secrets.delete(&sealing_copy(name), &DeleteParams::default()).await {
        tracing::warn!(error = %e, secret = sealing_copy(name), "the sealed copy of the CA Secret could not be deleted");
    }
}

/// Replaces a Secret holding keys in clear with the same material sealed. An earlier version's
/// Secret is immutable, so it is deleted (only if it is still the one read) and created again; a sealed
/// copy written first (`NAME-sealing`) is what [`load_or_create`] restores from if this stops in
/// between, so no replica ever makes a new CA in the gap.
async fn seal_in_place(
    secrets: &Api<Secret>,
    old: &Secret,
    generations: &[SharedGeneration],
    custody: &KeyCustody,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let copy_name = sealing_copy(name);
    let fail = |what: &str, e: kube::Error| anyhow::anyhow!("{what} (sealing the CA Secret {namespace}/{name}): {e}");
    // Sealed under the CA Secret's own name, so the copy's data can be written back verbatim.
    let data = shared_data(generations, custody, namespace, name);
    match secrets.delete(&copy_name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(fail("deleting an old sealed copy", e)),
    }
    secrets
        .create(&PostParams::default(), &ca_secret(namespace, &copy_name, data.clone()))
        .await
        .map_err(|e| fail("writing the sealed copy", e))?;
    let preconditions =
        Preconditions { uid: old.metadata.uid.clone(), resource_version: old.metadata.resource_version.clone() };
    let delete = DeleteParams { preconditions: Some(preconditions), ..Default::default() };
    secrets.delete(name, &delete).await.map_err(|e| fail("deleting the clear Secret", e))?;
    secrets
        .create(&PostParams::default(), &ca_secret(namespace, name, data))
        .await
        .map_err(|e| fail("writing the sealed Secret (its sealed copy is restored at the next start)", e))?;
    delete_sealing_copy(secrets, name).await;
    tracing::warn!(
        namespace,
        name,
        "the CA Secret held its keys in clear: replaced by one with the keys sealed under the key-encryption key"
    );
    Ok(())
}

/// The generations in a Secret, keys opened, and whether a key was found in clear. A Secret
/// without `generations.json` holds one active generation in its four PEM keys.
fn shared_from_secret(
    secret: &Secret,
    custody: &KeyCustody,
    namespace: &str,
    name: &str,
) -> Result<(Vec<SharedGeneration>, bool), String> {
    let Some(json) = secret.data.as_ref().and_then(|d| d.get(GENERATIONS)) else {
        let (material, clear) = from_secret(secret, custody, namespace, name)?;
        let generation =
            SharedGeneration { generation: 1, state: "active".into(), created_at: 0, retire_after: None, material };
        return Ok((vec![generation], clear));
    };
    let stored: Vec<StoredGeneration> =
        serde_json::from_slice(&json.0).map_err(|e| format!("key {GENERATIONS:?} is not valid: {e}"))?;
    let mut clear = false;
    let mut generations = Vec::with_capacity(stored.len());
    for g in stored {
        let material = CaMaterial {
            root_cert_pem: g.root_cert_pem,
            root_key_pem: g.root_key_pem,
            intermediate_cert_pem: g.intermediate_cert_pem,
            intermediate_key_pem: g.intermediate_key_pem,
        };
        clear |= material.has_clear_key();
        let opened = material
            .opened(custody.kek.as_deref(), &generation_scope(namespace, name, g.generation))
            .map_err(|e| open_error(e, custody))?;
        generations.push(SharedGeneration {
            generation: g.generation,
            state: g.state,
            created_at: g.created_at,
            retire_after: g.retire_after,
            material: opened,
        });
    }
    let active = generations.iter().find(|g| g.state == "active").ok_or("holds no active CA generation")?;
    // Refuse a damaged Secret now rather than at the first signature.
    crate::identity::CertificateAuthority::load_with(active.material.clone(), custody).map_err(|e| e.to_string())?;
    Ok((generations, clear))
}

fn open_error(e: crate::identity::ca::CaError, custody: &KeyCustody) -> String {
    match e {
        crate::identity::ca::CaError::Seal { .. } => format!(
            "{e}; is {} the key-encryption key this Secret was sealed with? Nothing was changed",
            custody.kek.as_ref().map_or("", |k| k.origin())
        ),
        crate::identity::ca::CaError::NoKek(_) => {
            format!("{e}: pass --ca-kek-secret, --ca-kek-file or PALISADE_CA_KEK")
        }
        e => e.to_string(),
    }
}

/// Changes the generations in the Secret `namespace/name` with `change` (which says whether it
/// changed anything, or refuses), written with the `resourceVersion` read: a concurrent writer
/// makes the write fail, and `change` runs again on what it wrote. Returns the generations as
/// stored.
pub async fn update(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    custody: &KeyCustody,
    mut change: impl FnMut(&mut Vec<SharedGeneration>) -> Result<bool, String>,
) -> Result<Vec<SharedGeneration>, CaSecretError> {
    const ATTEMPTS: usize = 16;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let full = format!("{namespace}/{name}");
    for _ in 0..ATTEMPTS {
        let secret = secrets.get(name).await.map_err(|e| CaSecretError::Api(full.clone(), e))?;
        let (mut generations, _) = shared_from_secret(&secret, custody, namespace, name)
            .map_err(|e| CaSecretError::Invalid(full.clone(), e))?;
        if !change(&mut generations).map_err(CaSecretError::Refused)? {
            return Ok(generations);
        }
        if secret.immutable == Some(true) {
            return Err(CaSecretError::Immutable(full));
        }
        let mut next = secret.clone();
        next.data = Some(shared_data(&generations, custody, namespace, name));
        // `replace` carries the resourceVersion read: a concurrent writer makes it fail.
        match secrets.replace(name, &PostParams::default(), &next).await {
            Ok(_) => return Ok(generations),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(CaSecretError::Api(full, e)),
        }
    }
    Err(CaSecretError::Contended(full, ATTEMPTS))
}

/// Watches the Secret `namespace/name` and calls `changed` with its generations whenever it is
/// created or changed (and at the start of every watch, so a reconnect misses nothing). Runs
/// until dropped.
pub async fn watch(
    client: kube::Client,
    namespace: String,
    name: String,
    custody: KeyCustody,
    changed: impl Fn(Vec<SharedGeneration>) + Send,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let one = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut changes = std::pin::pin!(watcher(api, one).default_backoff().applied_objects());
    while let Some(change) = changes.next().await {
        match change.map(|secret| shared_from_secret(&secret, &custody, &namespace, &name)) {
            Ok(Ok((generations, _))) => changed(generations),
            Ok(Err(e)) => {
                tracing::error!(error = %e, namespace, name, "the CA Secret changed to something unusable; ignored")
            }
            // The stream's backoff paces the retries.
            Err(e) => tracing::warn!(error = %e, namespace, name, "watching the CA Secret"),
        }
    }
}

/// The material in a Secret's four PEM keys, opened, and whether a key was found in clear.
fn from_secret(
    secret: &Secret,
    custody: &KeyCustody,
    namespace: &str,
    name: &str,
) -> Result<(CaMaterial, bool), String> {
    let data = secret.data.as_ref().ok_or("has no data")?;
    let field = |k: &str| -> Result<String, String> {
        let v = data.get(k).ok_or_else(|| format!("has no key {k:?}"))?;
        String::from_utf8(v.0.clone()).map_err(|_| format!("key {k:?} is not UTF-8 PEM"))
    };
    let stored = CaMaterial {
        root_cert_pem: field(ROOT_CERT)?,
        root_key_pem: field(ROOT_KEY)?,
        intermediate_cert_pem: field(INTERMEDIATE_CERT)?,
        intermediate_key_pem: field(INTERMEDIATE_KEY)?,
    };
    let material =
        stored.opened(custody.kek.as_deref(), &scope(namespace, name)).map_err(|e| open_error(e, custody))?;
    // Refuse a damaged Secret now rather than at the first signature.
    crate::identity::CertificateAuthority::load_with(material.clone(), custody).map_err(|e| e.to_string())?;
    Ok((material, stored.has_clear_key()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> std::sync::Arc<Kek> {
        std::sync::Arc::new(Kek::from_bytes(&[3u8; 32], "test").unwrap())
    }

    #[test]
    fn sealed_secret_data_holds_no_clear_key_and_opens_only_in_its_secret() {
        let material = CaMaterial::generate("cluster.local", 1).unwrap();
        let custody = KeyCustody { kek: Some(kek()), token: None };
        let data = secret_data(&material, &custody, "palisade-system", "palisade-ca");
        for (k, v) in &data {
            let text = String::from_utf8_lossy(&v.0);
            assert!(!text.contains("PRIVATE KEY"), "{k} holds a key in clear");
        }
        for key in [&material.root_key_pem, &material.intermediate_key_pem] {
            let der = rustls::pki_types::pem::PemObject::from_pem_slice(key.as_bytes())
                .map(|d: rustls::pki_types::PrivatePkcs8KeyDer| d.secret_pkcs8_der().to_vec())
                .unwrap();
            assert!(!data.values().any(|v| v.0.windows(der.len()).any(|w| w == der.as_slice())));
        }
        let secret = ca_secret("palisade-system", "palisade-ca", data);
        let (opened, clear) = from_secret(&secret, &custody, "palisade-system", "palisade-ca").unwrap();
        assert!(!clear);
        assert_eq!(opened.intermediate_key_pem, material.intermediate_key_pem);
        // The same data under another Secret's name does not open, nor without the KEK.
        let moved = from_secret(&secret, &custody, "palisade-system", "other").unwrap_err();
        assert!(moved.contains("does not open"), "{moved}");
        let none = from_secret(&secret, &KeyCustody::default(), "palisade-system", "palisade-ca").unwrap_err();
        assert!(none.contains("no key-encryption key"), "{none}");
    }

    #[test]
    fn clear_secret_is_reported_clear() {
        let material = CaMaterial::generate("cluster.local", 1).unwrap();
        let secret = ca_secret("ns", "ca", secret_data(&material, &KeyCustody::default(), "ns", "ca"));
        let custody = KeyCustody { kek: Some(kek()), token: None };
        let (_, clear) = from_secret(&secret, &custody, "ns", "ca").unwrap();
        assert!(clear, "a clear Secret must be found so it can be sealed");
    }
}
