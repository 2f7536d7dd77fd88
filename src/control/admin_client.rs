//! The management API's client side: `palisade control login` and the `--server` forms of
//! `palisade status`, `palisade control revoke`, `palisade control ca` and `palisade audit`.
//!
//! Standalone, an administrator holds a credentials directory (`cert.pem`, `key.pem`,
//! `bundle.pem`) written by [`login`] from a join token made with `--admin`; the certificate is
//! renewed with itself when half its life has passed. On Kubernetes, a bearer token (a
//! service-account or user token) and the mesh's CA bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::agent::ControlClient;
use crate::identity::SpiffeId;
use crate::proto::admin::admin_client::AdminClient as GrpcAdminClient;
use crate::proto::identity::certify_request::Credential;
use crate::tls::{CertStore, TrustBundle};

/// How a command reaches the management API.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// The control plane's gRPC address (`HOST:PORT`, or several separated by commas).
    #[arg(long, env = "PALISADE_SERVER")]
    pub server: Option<String>,
    /// Standalone: the credentials directory `palisade control login` wrote.
    #[arg(long, env = "PALISADE_CREDENTIALS", default_value = "palisade-admin")]
    pub credentials: PathBuf,
    /// Kubernetes: a file holding a bearer token (service-account or user) whose RBAC allows
    /// the call (`kubectl auth can-i VERB RESOURCE.palisade.io -n NAMESPACE`).
    #[arg(long, env = "PALISADE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// With `--token-file`: the mesh's CA bundle (PEM) the control plane's certificate chains to
    /// (its trust domain is read from the root).
    #[arg(long = "server-ca-bundle", env = "PALISADE_CA_BUNDLE", requires = "token_file")]
    pub ca_bundle: Option<PathBuf>,
}

/// Adds `authorization: Bearer …` when a token is given.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connected management client.
pub type AdminClient = GrpcAdminClient<InterceptedService<Channel, Bearer>>;

/// A management client over `channel`, sending `bearer` (a Kubernetes token) if given.
pub fn client(channel: Channel, bearer: Option<MetadataValue<Ascii>>) -> AdminClient {
    GrpcAdminClient::with_interceptor(channel, Bearer(bearer))
}

const CERT: &str = "cert.pem";
const KEY: &str = "key.pem";
const BUNDLE: &str = "bundle.pem";

/// Redeems an administrator's join token at `server` and writes the credentials directory
/// `out` (the key never leaves this machine). Returns the identity granted.
pub async fn login(server: &str, token: &str, ca_bundle: &Path, out: &Path) -> anyhow::Result<SpiffeId> {
    crate::tls::install_crypto_provider();
    let bundle_pem =
        std::fs::read_to_string(ca_bundle).with_context(|| format!("reading --ca-bundle {}", ca_bundle.display()))?;
    let bundle = TrustBundle::from_pem(&bundle_pem).with_context(|| format!("--ca-bundle {}", ca_bundle.display()))?;
    let trust_domain = trust_domain_of(&bundle_pem).unwrap_or_else(|| "cluster.local".into());
    let client = ControlClient::new(server, bundle, CertStore::new(), SpiffeId::control_plane(&trust_domain)?);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    let resp = client
        .certify(csr.der().to_vec(), Some(Credential::JoinToken(token.trim().to_string())))
        .await
        .context("redeeming the administrator's join token")?;
    let id: SpiffeId = resp.spiffe_id.parse()?;
    if !super::admin_api::is_admin_identity(&id, id.trust_domain()) {
        anyhow::bail!(
            "the token yields {id}, not an administrator's identity: make one with `palisade control token create --admin`"
        );
    }
    write_credentials(out, &resp.certificate_chain_pem, &key.serialize_pem(), &resp.trust_bundle_pem)?;
    Ok(id)
}

/// The trust domain the mesh CA's root names (its SPIFFE URI SAN or subject), if readable.
fn trust_domain_of(bundle_pem: &str) -> Option<String> {
    let der = crate::tls::certs_from_pem(bundle_pem).ok()?.into_iter().next()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => {
            u.strip_prefix("spiffe://").map(|rest| rest.split('/').next().unwrap_or(rest).to_string())
        }
        _ => None,
    })
}

fn write_credentials(dir: &Path, chain_pem: &str, key_pem: &str, bundle_pem: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    for (name, text, mode) in [(KEY, key_pem, 0o600), (CERT, chain_pem, 0o644), (BUNDLE, bundle_pem, 0o644)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("writing {}", dir.join(name).display()))?;
    }
    Ok(())
}

/// A certificate store holding the credentials in `dir`, and its identity and validity.
fn load_credentials(dir: &Path) -> anyhow::Result<(Arc<CertStore>, SpiffeId, i64, i64)> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| {
            format!(
                "reading {} (log in first: `palisade control login --server ADDR --token TOKEN --ca-bundle ROOT.pem --credentials {}`)",
                dir.join(name).display(),
                dir.display()
            )
        })
    };
    let chain = crate::tls::certs_from_pem(&read(CERT)?)?;
    let leaf = chain.first().context("cert.pem holds no certificate")?;
    let (not_before, not_after) = crate::tls::validity(leaf).context("cert.pem: not an X.509 certificate")?;
    let (id, _) = crate::tls::peer_identity(Some(&chain[..1])).context("cert.pem")?;
    let key_pem = read(KEY)?;
    let key_der = rustls_pemfile_pkcs8(&key_pem).context("key.pem: not a PKCS#8 private key")?;
    let signing_key = crate::tls::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)))?;
    let store = CertStore::new();
    store.set(Arc::new(rustls::sign::CertifiedKey::new(chain, signing_key)), not_after);
    Ok((store, id, not_before, not_after))
}

fn rustls_pemfile_pkcs8(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).ok().map(|k| k.secret_pkcs8_der().to_vec())
}

/// Connects to the management API as `args` says.
pub async fn connect(args: &ServerArgs) -> anyhow::Result<AdminClient> {
    crate::tls::install_crypto_provider();
    let default = format!("127.0.0.1:{}", crate::ports::CONTROL_GRPC);
    let server = args.server.as_deref().unwrap_or(&default);
    let (control, bearer) = if let Some(token_file) = &args.token_file {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading --token-file {}", token_file.display()))?;
        let ca_bundle = args.ca_bundle.as_ref().context("--token-file needs --ca-bundle")?;
        let pem = std::fs::read_to_string(ca_bundle)
            .with_context(|| format!("reading --ca-bundle {}", ca_bundle.display()))?;
        let bundle = TrustBundle::from_pem(&pem).with_context(|| format!("--ca-bundle {}", ca_bundle.display()))?;
        let header: MetadataValue<Ascii> =
            format!("Bearer {}", token.trim()).parse().context("--token-file: not a usable token")?;
        let trust_domain = trust_domain_of(&pem).unwrap_or_else(|| "cluster.local".into());
        let control = ControlClient::new(server, bundle, CertStore::new(), SpiffeId::control_plane(&trust_domain)?);
        (control, Some(header))
    } else {
        let dir = &args.credentials;
        let (mut certs, mut id, not_before, not_after) = load_credentials(dir)?;
        let bundle_pem = std::fs::read_to_string(dir.join(BUNDLE))
            .with_context(|| format!("reading {}", dir.join(BUNDLE).display()))?;
        let bundle = TrustBundle::from_pem(&bundle_pem)?;
        let control_id = SpiffeId::control_plane(id.trust_domain())?;
        let mut control = ControlClient::new(server, bundle.clone(), certs.clone(), control_id.clone());
        // Past half its life, the certificate is renewed with itself (as sidecars do).
        let now = crate::clock::now_unix();
        if now >= not_before + (not_after - not_before) / 2 && now < not_after {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
            let resp = control.certify(csr.der().to_vec(), None).await.context("renewing the admin certificate")?;
            write_credentials(dir, &resp.certificate_chain_pem, &key.serialize_pem(), &resp.trust_bundle_pem)?;
            (certs, id, _, _) = load_credentials(dir)?;
            control = ControlClient::new(server, TrustBundle::from_pem(&resp.trust_bundle_pem)?, certs, control_id);
            tracing::debug!(%id, "admin certificate renewed");
        }
        (control, None)
    };
    Ok(client(control.channel().await?, bearer))
}

/// `palisade control revoke --server`.
pub async fn revoke(args: &ServerArgs, identity: Option<String>, serial: Option<String>) -> anyhow::Result<()> {
    use crate::proto::admin::{RevokeRequest, revoke_request::Target};
    let target = match (identity, serial) {
        (Some(id), _) => Target::SpiffeId(id),
        (_, Some(serial)) => Target::Serial(serial),
        (None, None) => anyhow::bail!("give --identity or --serial"),
    };
    connect(args).await?.revoke(RevokeRequest { target: Some(target) }).await.map_err(refused)?;
    Ok(())
}

/// `palisade control ca rotate --server` and `palisade control ca status`: the generations.
pub async fn rotate_ca(args: &ServerArgs, status_only: bool) -> anyhow::Result<String> {
    use crate::proto::admin::RotateCaRequest;
    let resp = connect(args).await?.rotate_ca(RotateCaRequest { status_only }).await.map_err(refused)?.into_inner();
    let mut out = format!("rotation: {}\n", resp.phase);
    out.push_str(&format!(
        "{:<11} {:<9} {:<22} {:<22} NEXT STEP\n",
        "GENERATION", "STATE", "ROOT NOT BEFORE", "ROOT NOT AFTER"
    ));
    for g in resp.generations {
        let at = |t: i64| {
            if t <= 0 {
                "-".to_string()
            } else {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64))
                    .to_string()
            }
        };
        out.push_str(&format!(
            "{:<11} {:<9} {:<22} {:<22} {}\n",
            g.generation,
            g.state,
            at(g.root_not_before),
            at(g.root_not_after),
            at(g.next_step_at)
        ));
    }
    Ok(out)
}

/// `palisade control revocations`: what is revoked.
pub async fn revocations(args: &ServerArgs) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    use crate::proto::admin::ListRevocationsRequest;
    let resp = connect(args).await?.list_revocations(ListRevocationsRequest {}).await.map_err(refused)?.into_inner();
    Ok((resp.spiffe_ids, resp.serials))
}

/// Ledger rows through the API, newest first, up to `limit`, paging as needed.
pub async fn ledger(
    args: &ServerArgs,
    identity: Option<String>,
    issued_after: Option<i64>,
    limit: u32,
) -> anyhow::Result<Vec<super::store::LedgerEntry>> {
    use crate::proto::admin::ListCertificatesRequest;
    let mut client = connect(args).await?;
    let mut rows = Vec::new();
    let mut page_token = String::new();
    while (rows.len() as u32) < limit {
        let resp = client
            .list_certificates(ListCertificatesRequest {
                spiffe_id: identity.clone().unwrap_or_default(),
                limit: (limit - rows.len() as u32).min(1000),
                issued_after: issued_after.unwrap_or(0),
                issued_before: 0,
                page_token: page_token.clone(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        rows.extend(resp.certificates.into_iter().map(|c| super::store::LedgerEntry {
            serial: c.serial,
            spiffe_id: c.spiffe_id,
            not_before: c.not_before,
            not_after: c.not_after,
            credential: c.credential,
            revoked: c.revoked,
            issued_at: c.issued_at,
        }));
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    Ok(rows)
}

/// A refusal as the operator should read it.
fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the control plane refused: {:?}: {}", s.code(), s.message())
}
