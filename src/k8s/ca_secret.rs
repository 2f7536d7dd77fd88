//! The mesh CA in a Kubernetes Secret, so every control-plane replica signs with the same
//! intermediate and sidecars trust one root. The first replica to start creates it; a replica
//! that loses the creation race reads the winner's.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::identity::CaMaterial;

const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate.key";

/// Reads the CA from `namespace/name`, creating it first if it does not exist.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> anyhow::Result<CaMaterial> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(secret) = secrets.get_opt(name).await? {
        return from_secret(&secret).map_err(|e| anyhow::anyhow!("Secret {namespace}/{name}: {e}"));
    }
    let material = CaMaterial::generate(trust_domain, 1)?;
    let data: BTreeMap<String, ByteString> = [
        (ROOT_CERT, &material.root_cert_pem),
        (ROOT_KEY, &material.root_key_pem),
        (INTERMEDIATE_CERT, &material.intermediate_cert_pem),
        (INTERMEDIATE_KEY, &material.intermediate_key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
    .collect();
    let secret = Secret {
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
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(namespace, name, "created the mesh CA and stored it in a Secret");
            Ok(material)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Another replica created it between our read and our create.
            let secret = secrets.get(name).await?;
            from_secret(&secret).map_err(|e| anyhow::anyhow!("Secret {namespace}/{name}: {e}"))
        }
        Err(e) => Err(e.into()),
    }
}

fn from_secret(secret: &Secret) -> Result<CaMaterial, String> {
    let data = secret.data.as_ref().ok_or("has no data")?;
    let field = |k: &str| -> Result<String, String> {
        let v = data.get(k).ok_or_else(|| format!("has no key {k:?}"))?;
        String::from_utf8(v.0.clone()).map_err(|_| format!("key {k:?} is not UTF-8 PEM"))
    };
    let material = CaMaterial {
        root_cert_pem: field(ROOT_CERT)?,
        root_key_pem: field(ROOT_KEY)?,
        intermediate_cert_pem: field(INTERMEDIATE_CERT)?,
        intermediate_key_pem: field(INTERMEDIATE_KEY)?,
    };
    // Refuse a damaged Secret now rather than at the first signature.
    crate::identity::CertificateAuthority::load(material.clone()).map_err(|e| e.to_string())?;
    Ok(material)
}
