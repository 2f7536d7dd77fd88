//! The mesh CA in a Kubernetes Secret, so every control-plane replica signs with the same
//! intermediate and sidecars trust one root. The first replica to start creates it; a replica
//! that loses the creation race reads the winner's.
//!
//! With a key-encryption key, the Secret's two private keys are sealed (bound to the Secret's
//! namespace and name, their role and their certificate); a Secret found with keys in clear is
//! replaced by a sealed one. The KEK itself may come from another Secret ([`load_kek`]).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};

use crate::identity::seal::Kek;
use crate::identity::{CaMaterial, KeyCustody};

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate.key";

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

fn ca_secret(namespace: &str, name: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "palisade".to_string())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        // Rotation writes a new Secret; this one never changes under a running replica.
        immutable: Some(true),
        data: Some(data),
        ..Default::default()
    }
}

/// Reads the CA from `namespace/name` (its keys opened), creating it first if it does not
/// exist. A Secret holding keys in clear is replaced by a sealed one when there is a KEK.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    custody: &KeyCustody,
) -> anyhow::Result<CaMaterial> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let failed = |e: String| anyhow::anyhow!("Secret {namespace}/{name}: {e}");
    if let Some(secret) = secrets.get_opt(name).await? {
        let (material, clear) = from_secret(&secret, custody, namespace, name).map_err(failed)?;
        if clear && custody.kek.is_some() {
            seal_in_place(&secrets, &secret, &material, custody, namespace, name).await?;
        }
        return Ok(material);
    }
    // No CA Secret: a migration stopped between deleting it and writing it again left its
    // sealed copy, which must come back rather than a new CA. Only a control plane with a KEK
    // migrates (and may read the copy: without one, least privilege grants no access to it).
    let copy = match custody.kek {
        Some(_) => secrets.get_opt(&sealing_copy(name)).await?,
        None => None,
    };
    if let Some(copy) = copy {
        let (material, _) = from_secret(&copy, custody, namespace, name).map_err(failed)?;
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
        return Ok(material);
    }
    let material = CaMaterial::generate_in(trust_domain, 1, custody)?;
    let secret = ca_secret(namespace, name, secret_data(&material, custody, namespace, name));
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(
                namespace,
                name,
                sealed = custody.kek.is_some(),
                "created the mesh CA and stored it in a Secret"
            );
            Ok(material)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Another replica created it between our read and our create.
            let secret = secrets.get(name).await?;
            Ok(from_secret(&secret, custody, namespace, name).map_err(failed)?.0)
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

/// Replaces a Secret holding keys in clear with the same material sealed. The Secret is
/// immutable, so it is deleted (only if it is still the one read) and created again; a sealed
/// copy written first (`NAME-sealing`) is what [`load_or_create`] restores from if this stops in
/// between, so no replica ever makes a new CA in the gap.
async fn seal_in_place(
    secrets: &Api<Secret>,
    old: &Secret,
    material: &CaMaterial,
    custody: &KeyCustody,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let copy_name = sealing_copy(name);
    let fail = |what: &str, e: kube::Error| anyhow::anyhow!("{what} (sealing the CA Secret {namespace}/{name}): {e}");
    // Sealed under the CA Secret's own name, so the copy's data can be written back verbatim.
    let data = secret_data(material, custody, namespace, name);
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

/// The material in a Secret, keys opened, and whether a key was found in clear.
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
    let material = stored.opened(custody.kek.as_deref(), &scope(namespace, name)).map_err(|e| match e {
        crate::identity::ca::CaError::Seal { .. } => format!(
            "{e}; is {} the key-encryption key this Secret was sealed with? Nothing was changed",
            custody.kek.as_ref().map_or("", |k| k.origin())
        ),
        crate::identity::ca::CaError::NoKek(_) => {
            format!("{e}: pass --ca-kek-secret, --ca-kek-file or PALISADE_CA_KEK")
        }
        e => e.to_string(),
    })?;
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
