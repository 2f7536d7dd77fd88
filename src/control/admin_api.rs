//! The management API (`palisade.admin.v1.Admin`): every call authorized, every call audited.
//!
//! Who may call is decided by [`Authorizer`]: standalone, an administrator's certificate
//! (`spiffe://<td>/admin/<name>`, minted only from a join token made with `--admin`); on
//! Kubernetes, a bearer token checked with TokenReview and a SubjectAccessReview for the call's
//! verb on a `palisade.io` resource, so cluster RBAC answers exactly as `kubectl auth can-i`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use parking_lot::Mutex;
use tonic::{Request, Response, Status};

use super::ca_set::{self, CaSet, CaSetError};
use super::discovery::MeshState;
use super::jwks::JwksStatuses;
use super::source::ResourceError;
use super::store::{LedgerQuery, Store};
use super::telemetry::TrafficGraph;
use crate::identity::SpiffeId;
use crate::proto::admin::admin_server::Admin;
use crate::proto::admin::*;

/// The API group whose resources name what an admin call touches (`kubectl auth can-i VERB
/// RESOURCE.palisade.io -n NAMESPACE`).
pub const API_GROUP: &str = "palisade.io";

/// The path under which administrators' identities live: `spiffe://<td>/admin/<name>`.
pub const ADMIN_PATH_PREFIX: &str = "/admin/";

/// Whether `id` is an administrator's identity of `trust_domain`.
pub fn is_admin_identity(id: &SpiffeId, trust_domain: &str) -> bool {
    id.trust_domain() == trust_domain
        && id.path().strip_prefix(ADMIN_PATH_PREFIX).is_some_and(|name| !name.is_empty() && !name.contains('/'))
}

/// Who may call.
pub enum Authorizer {
    /// Administrators' certificates of this trust domain, unless revoked.
    Standalone { trust_domain: String },
    /// Bearer tokens: TokenReview, then SubjectAccessReview in `namespace`.
    Kubernetes(Box<KubeAuthorizer>),
}

/// The Kubernetes side of [`Authorizer`].
pub struct KubeAuthorizer {
    reviews: Api<TokenReview>,
    access: Api<SubjectAccessReview>,
    namespace: String,
}

impl Authorizer {
    pub fn kubernetes(client: kube::Client, namespace: &str) -> Self {
        Authorizer::Kubernetes(Box::new(KubeAuthorizer {
            reviews: Api::all(client.clone()),
            access: Api::all(client),
            namespace: namespace.to_string(),
        }))
    }
}

/// A caller as the audit log names it.
#[derive(Clone, Debug)]
struct Caller {
    name: String,
    remote: Option<SocketAddr>,
}

/// The append-only audit log: one JSON object per line (time, caller, remote address, call,
/// target, result), also emitted as a `palisade::audit` log event so a cluster's log pipeline
/// keeps it when the file lives on an `emptyDir`.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the audit log {}", path.display()))?;
        Ok(AuditLog { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    fn record(&self, caller: &str, remote: Option<SocketAddr>, call: &str, target: &str, result: &Result<(), Status>) {
        let (outcome, code, message) = match result {
            Ok(()) => ("allowed", "OK".to_string(), String::new()),
            Err(s) => {
                let refused = matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated);
                (if refused { "refused" } else { "failed" }, format!("{:?}", s.code()), s.message().to_string())
            }
        };
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "caller": caller,
            "remote": remote.map(|r| r.to_string()),
            "call": call,
            "target": target,
            "result": outcome,
            "code": code,
            "message": message,
        });
        tracing::info!(target: "palisade::audit", caller, call, target, result = outcome, code = %code, %message, "admin call");
        let mut file = self.file.lock();
        if let Err(e) = writeln!(file, "{line}") {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit log");
        }
    }
}

/// The service.
pub struct AdminService {
    pub authorizer: Authorizer,
    pub audit: Arc<AuditLog>,
    pub mesh: Arc<MeshState>,
    pub store: Arc<Store>,
    pub ca: Arc<ArcSwap<CaSet>>,
    pub graph: Arc<TrafficGraph>,
    pub resource_errors: Arc<ArcSwap<Vec<ResourceError>>>,
    pub jwks_status: JwksStatuses,
    /// Wakes the CA worker after a change this process made to the store.
    pub ca_changed: Arc<dyn Fn() + Send + Sync>,
    /// How long a new root takes to reach every sidecar (when `next` becomes `active`).
    pub propagation: Duration,
    /// Where new CA generations' keys go (a KEK, a PKCS#11 token).
    pub custody: crate::identity::KeyCustody,
    /// Kubernetes: the client and namespace of the revocations every replica shares and
    /// watches ([`crate::k8s::revocations`]); a revoke call is stored there first.
    pub shared_revocations: Option<(kube::Client, String)>,
    /// Kubernetes: the CA generations shared through the CA Secret; a rotation starts there.
    pub shared_ca: Option<Arc<super::shared_ca::SharedCa>>,
    pub cert_ttl: Duration,
    /// This replica among the others sharing its store: sidecars, traffic and rollouts are
    /// answered for all of them.
    pub replicas: Arc<super::replicas::Replicas>,
}

impl AdminService {
    /// Authorizes `verb` on `resource` for the caller of `req`, records the refusal if it is
    /// one, and returns who the caller is.
    async fn authorize<T>(&self, req: &Request<T>, call: &str, verb: &str, resource: &str) -> Result<Caller, Status> {
        let remote = req.remote_addr();
        let decided = self.decide(req, verb, resource).await;
        match decided {
            Ok(name) => Ok(Caller { name, remote }),
            Err((name, status)) => {
                self.audit.record(&name, remote, call, "", &Err(status.clone()));
                Err(status)
            }
        }
    }

    /// The caller's name, or (what is known of the caller, why refused).
    async fn decide<T>(&self, req: &Request<T>, verb: &str, resource: &str) -> Result<String, (String, Status)> {
        match &self.authorizer {
            Authorizer::Standalone { trust_domain } => {
                let certs = req.peer_certs();
                let (id, serial) = crate::tls::peer_identity(certs.as_deref().map(|v| v.as_slice())).map_err(|e| {
                    (
                        "anonymous".to_string(),
                        Status::unauthenticated(format!(
                            "the admin API needs an administrator's client certificate ({e}); get one with `palisade control login`"
                        )),
                    )
                })?;
                let name = id.to_string();
                if !is_admin_identity(&id, trust_domain) {
                    return Err((
                        name.clone(),
                        Status::permission_denied(format!(
                            "{name} is not an administrator: the admin API answers only spiffe://{trust_domain}/admin/<name> identities"
                        )),
                    ));
                }
                let store = self.store.clone();
                let (id_str, serial_str) = (name.clone(), serial.clone());
                let revoked = tokio::task::spawn_blocking(move || store.is_revoked(&id_str, &serial_str))
                    .await
                    .map_err(|e| (name.clone(), Status::internal(e.to_string())))?
                    .map_err(|e| (name.clone(), Status::unavailable(e.to_string())))?;
                if revoked {
                    return Err((
                        name.clone(),
                        Status::permission_denied(format!("{name} (serial {serial}) is revoked")),
                    ));
                }
                Ok(name)
            }
            Authorizer::Kubernetes(kube) => {
                let KubeAuthorizer { reviews, access, namespace } = &**kube;
                let token = bearer(req).ok_or_else(|| {
                    (
                        "anonymous".to_string(),
                        Status::unauthenticated(
                            "the admin API needs `authorization: Bearer <token>` (a service-account or user token)",
                        ),
                    )
                })?;
                let review =
                    TokenReview { spec: TokenReviewSpec { token: Some(token), audiences: None }, ..Default::default() };
                let reviewed = reviews
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| ("anonymous".to_string(), Status::unavailable(format!("TokenReview failed: {e}"))))?;
                let status = reviewed.status.unwrap_or_default();
                let user = status.user.unwrap_or_default();
                if status.authenticated != Some(true) {
                    let why = status.error.unwrap_or_else(|| "not authenticated".into());
                    return Err((
                        "anonymous".to_string(),
                        Status::unauthenticated(format!("token refused by the Kubernetes API server: {why}")),
                    ));
                }
                let name = user.username.clone().unwrap_or_default();
                let sar = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: user.username,
                        groups: user.groups,
                        uid: user.uid,
                        extra: user.extra,
                        resource_attributes: Some(ResourceAttributes {
                            group: Some(API_GROUP.into()),
                            resource: Some(resource.into()),
                            verb: Some(verb.into()),
                            namespace: Some(namespace.clone()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let decided = access
                    .create(&PostParams::default(), &sar)
                    .await
                    .map_err(|e| (name.clone(), Status::unavailable(format!("SubjectAccessReview failed: {e}"))))?;
                let decision = decided.status.unwrap_or_default();
                if !decision.allowed {
                    let reason =
                        decision.reason.filter(|r| !r.is_empty()).map(|r| format!(" ({r})")).unwrap_or_default();
                    return Err((
                        name.clone(),
                        Status::permission_denied(format!(
                            "{name} may not {verb} {resource}.{API_GROUP} in namespace {namespace}{reason}"
                        )),
                    ));
                }
                Ok(name)
            }
        }
    }

    /// Records the outcome of an authorized call and passes it on.
    fn audited<T>(&self, caller: &Caller, call: &str, target: &str, result: Result<T, Status>) -> Result<T, Status> {
        self.audit.record(
            &caller.name,
            caller.remote,
            call,
            target,
            &result.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        result
    }

    /// What every replica knows (see [`super::replicas`]), read off the runtime.
    async fn fleet(&self) -> super::replicas::Fleet {
        let replicas = self.replicas.clone();
        tokio::task::spawn_blocking(move || replicas.fleet()).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading the other replicas' status panicked");
            super::replicas::Fleet { sidecars: self.mesh.sidecars(), edges: self.graph.edges() }
        })
    }

    /// Each resource in force with its rollout among `sidecars`.
    fn rollouts(&self, sidecars: &[super::discovery::SidecarEntry]) -> Vec<crate::proto::admin::ResourceRollout> {
        let counts = self.mesh.rollout_of(sidecars);
        self.mesh
            .resources()
            .iter()
            .map(|r| {
                let c = counts.get(&r.origin).copied().unwrap_or_default();
                crate::proto::admin::ResourceRollout {
                    kind: r.kind().to_string(),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    origin: r.origin.clone(),
                    selected: c.selected,
                    current: c.current,
                    nacked: c.nacked,
                }
            })
            .collect()
    }

    /// Each mesh service with its endpoints, and whether the sidecar behind each is connected.
    fn services(&self, sidecars: &[super::discovery::SidecarEntry]) -> Vec<crate::proto::admin::ServiceStatus> {
        let resolved = self.mesh.services();
        // (address, identity) → whether a sidecar registered it and is connected.
        let mut connected: std::collections::HashMap<(&str, &str), bool> = Default::default();
        for s in sidecars {
            for a in &s.addresses {
                *connected.entry((a.as_str(), s.spiffe_id.as_str())).or_default() |= s.connected;
            }
        }
        let mut names: Vec<&String> = resolved.services.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let (namespace, short) = name.split_once('/').unwrap_or(("", name));
                let service = &resolved.services[name];
                let mut addresses: Vec<String> = resolved
                    .addresses
                    .at
                    .iter()
                    .filter(|(_, s)| ***s == **name)
                    .map(|(at, _)| {
                        let target = service.ports.iter().find(|(p, _)| *p == at.port()).map_or(at.port(), |p| p.1);
                        format!("{at} -> {target}")
                    })
                    .collect();
                addresses.sort();
                let endpoints = service
                    .endpoints
                    .iter()
                    .map(|e| {
                        let (address, id) = (e.address.to_string(), e.identity.to_string());
                        let state = match connected.get(&(address.as_str(), id.as_str())) {
                            Some(true) => "connected",
                            Some(false) => "gone",
                            None => "listed",
                        };
                        crate::proto::admin::ServiceEndpointStatus {
                            state: state.to_string(),
                            address,
                            spiffe_id: id,
                            zone: e.zone.clone().unwrap_or_default(),
                        }
                    })
                    .collect();
                crate::proto::admin::ServiceStatus {
                    namespace: namespace.to_string(),
                    name: short.to_string(),
                    addresses,
                    endpoints,
                }
            })
            .collect()
    }

    fn generations(&self) -> Vec<CaGeneration> {
        let generations = match self.store.ca_generations() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the CA generations");
                return Vec::new();
            }
        };
        generations
            .into_iter()
            .map(|g| self.generation(g.generation, g.state, g.created_at, g.retire_after, &g.material.root_cert_pem))
            .collect()
    }

    fn generation(
        &self,
        generation: u32,
        state: String,
        created_at: i64,
        retire_after: Option<i64>,
        root_pem: &str,
    ) -> CaGeneration {
        let (root_not_before, root_not_after) = validity(root_pem);
        let next_step_at = match state.as_str() {
            "next" => created_at + self.propagation.as_secs() as i64,
            "retiring" => retire_after.unwrap_or(0),
            _ => 0,
        };
        CaGeneration { generation, state, created_at, root_not_before, root_not_after, next_step_at }
    }

    /// Kubernetes: starts a rotation in the shared CA Secret, for every replica at once.
    async fn rotate_shared(&self, shared: &super::shared_ca::SharedCa) -> Result<Vec<CaGeneration>, Status> {
        use crate::k8s::ca_secret::CaSecretError;
        match shared.start_rotation(&self.mesh.settings.trust_domain).await {
            Ok((generation, generations)) => {
                tracing::info!(generation, "CA rotation started through the admin API, in the shared CA Secret");
                Ok(generations
                    .into_iter()
                    .map(|g| {
                        self.generation(g.generation, g.state, g.created_at, g.retire_after, &g.material.root_cert_pem)
                    })
                    .collect())
            }
            Err(e @ CaSecretError::Refused(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

fn bearer<T>(req: &Request<T>) -> Option<String> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// A certificate's validity (Unix seconds), or zeros if it cannot be read.
fn validity(pem: &str) -> (i64, i64) {
    crate::tls::pem_validity(pem).unwrap_or((0, 0))
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

const LEDGER_PAGE_MAX: u32 = 1000;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_sidecars(&self, req: Request<ListSidecarsRequest>) -> Result<Response<ListSidecarsResponse>, Status> {
        let caller = self.authorize(&req, "ListSidecars", "list", "sidecars").await?;
        let sidecars = self.fleet().await.sidecars.into_iter().map(Into::into).collect();
        self.audited(&caller, "ListSidecars", "", Ok(Response::new(ListSidecarsResponse { sidecars })))
    }

    async fn list_certificates(
        &self,
        req: Request<ListCertificatesRequest>,
    ) -> Result<Response<ListCertificatesResponse>, Status> {
        let caller = self.authorize(&req, "ListCertificates", "get", "ledger").await?;
        let r = req.into_inner();
        let target = if r.spiffe_id.is_empty() { String::new() } else { r.spiffe_id.clone() };
        let result = async {
            let after = if r.page_token.is_empty() {
                None
            } else {
                let (at, row) = r
                    .page_token
                    .split_once(':')
                    .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)))
                    .ok_or_else(|| Status::invalid_argument("page_token: not a token this API returned"))?;
                Some((at, row))
            };
            let limit = match r.limit {
                0 => 100,
                n => n.min(LEDGER_PAGE_MAX),
            };
            let query = LedgerQuery {
                identity: (!r.spiffe_id.is_empty()).then_some(r.spiffe_id),
                issued_after: (r.issued_after != 0).then_some(r.issued_after),
                issued_before: (r.issued_before != 0).then_some(r.issued_before),
                after,
                limit,
            };
            let store = self.store.clone();
            let rows = tokio::task::spawn_blocking(move || store.ledger_page(&query))
                .await
                .map_err(internal)?
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let next_page_token = match rows.last() {
                Some((_, (at, row))) if rows.len() as u32 == limit => format!("{at}:{row}"),
                _ => String::new(),
            };
            let certificates = rows
                .into_iter()
                .map(|(e, _)| IssuedCertificate {
                    serial: e.serial,
                    spiffe_id: e.spiffe_id,
                    not_before: e.not_before,
                    not_after: e.not_after,
                    credential: e.credential,
                    revoked: e.revoked,
                    issued_at: e.issued_at,
                })
                .collect();
            Ok(Response::new(ListCertificatesResponse { certificates, next_page_token }))
        }
        .await;
        self.audited(&caller, "ListCertificates", &target, result)
    }

    async fn traffic_graph(&self, req: Request<TrafficGraphRequest>) -> Result<Response<TrafficGraphResponse>, Status> {
        let caller = self.authorize(&req, "TrafficGraph", "get", "traffic").await?;
        let edges = self.fleet().await.edges.into_iter().map(Into::into).collect();
        self.audited(&caller, "TrafficGraph", "", Ok(Response::new(TrafficGraphResponse { edges })))
    }

    async fn revoke(&self, req: Request<RevokeRequest>) -> Result<Response<RevokeResponse>, Status> {
        let caller = self.authorize(&req, "Revoke", "revoke", "identities").await?;
        let (identity, serial, target) = match req.into_inner().target {
            Some(revoke_request::Target::SpiffeId(id)) => (Some(id.clone()), None, id),
            Some(revoke_request::Target::Serial(serial)) => (None, Some(serial.clone()), format!("serial {serial}")),
            None => (None, None, String::new()),
        };
        let result = async {
            match (&identity, &serial) {
                (Some(id), _) => {
                    id.parse::<SpiffeId>().map_err(|e| Status::invalid_argument(format!("spiffe_id {id:?}: {e}")))?;
                }
                (_, Some(serial)) => {
                    if crate::identity::revocation::normalize_serial(serial).is_none() {
                        return Err(Status::invalid_argument(format!("serial {serial:?}: not a hex serial")));
                    }
                }
                (None, None) => return Err(Status::invalid_argument("give a spiffe_id or a serial to revoke")),
            }
            let serial = serial.and_then(|s| crate::identity::revocation::normalize_serial(&s));
            if let Some((client, namespace)) = &self.shared_revocations {
                // Shared first: once stored there, every replica's watch brings it to its
                // sidecars and its issuance; then here at once, without waiting for ours.
                let (ids, serials) =
                    crate::k8s::revocations::revoke(client, namespace, identity.as_deref(), serial.as_deref())
                        .await
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                let mesh = self.mesh.clone();
                tokio::task::spawn_blocking(move || mesh.adopt_revocations(&ids, &serials))
                    .await
                    .map_err(internal)?
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                return Ok(Response::new(RevokeResponse {}));
            }
            let store = self.store.clone();
            let (ids, serials) = tokio::task::spawn_blocking(move || {
                store.revoke(identity.as_deref(), serial.as_deref())?;
                store.revocations()
            })
            .await
            .map_err(internal)?
            .map_err(|e| Status::unavailable(e.to_string()))?;
            // Straight to the mesh: sidecars get it with the next push, not the next CA step.
            self.mesh.set_revocations(ids, serials);
            Ok(Response::new(RevokeResponse {}))
        }
        .await;
        self.audited(&caller, "Revoke", &target, result)
    }

    async fn list_revocations(
        &self,
        req: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        let caller = self.authorize(&req, "ListRevocations", "list", "revocations").await?;
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || store.revocations())
            .await
            .map_err(internal)
            .and_then(|r| r.map_err(|e| Status::unavailable(e.to_string())))
            .map(|(spiffe_ids, serials)| Response::new(ListRevocationsResponse { spiffe_ids, serials }));
        self.audited(&caller, "ListRevocations", "", result)
    }

    async fn rotate_ca(&self, req: Request<RotateCaRequest>) -> Result<Response<RotateCaResponse>, Status> {
        let status_only = req.get_ref().status_only;
        let (call, verb) = if status_only { ("RotateCa(status)", "get") } else { ("RotateCa", "rotate") };
        let caller = self.authorize(&req, call, verb, "certificateauthorities").await?;
        let result = async {
            if let (Some(shared), false) = (&self.shared_ca, status_only) {
                let generations = self.rotate_shared(shared).await?;
                return Ok(Response::new(RotateCaResponse { phase: "started".into(), generations }));
            }
            let phase = if status_only {
                None
            } else {
                let store = self.store.clone();
                let trust_domain = self.mesh.settings.trust_domain.clone();
                let custody = self.custody.clone();
                let started =
                    tokio::task::spawn_blocking(move || ca_set::start_rotation(&store, &trust_domain, &custody))
                        .await
                        .map_err(internal)?;
                match started {
                    Ok(generation) => {
                        tracing::info!(generation, "CA rotation started through the admin API");
                        (self.ca_changed)();
                        Some("started")
                    }
                    Err(e @ CaSetError::RotationInProgress(..)) => {
                        return Err(Status::failed_precondition(e.to_string()));
                    }
                    Err(e) => return Err(Status::unavailable(e.to_string())),
                }
            };
            let generations = self.generations();
            let in_progress = generations.iter().any(|g| g.state == "next" || g.state == "retiring");
            let phase = phase.unwrap_or(if in_progress { "in-progress" } else { "idle" }).to_string();
            Ok(Response::new(RotateCaResponse { phase, generations }))
        }
        .await;
        self.audited(&caller, call, "", result)
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let caller = self.authorize(&req, "Status", "get", "status").await?;
        let settings = &self.mesh.settings;
        let fleet = self.fleet().await;
        let jwks = self
            .jwks_status
            .lock()
            .iter()
            .map(|(uri, s)| JwksStatus {
                uri: uri.clone(),
                keys: s.keys as u32,
                fetched_at: s.fetched_at.unwrap_or(0),
                last_error: s.last_error.clone().unwrap_or_default(),
            })
            .collect();
        let certificate_events = self
            .graph
            .events()
            .into_iter()
            .map(|e| CertificateEvent {
                spiffe_id: e.spiffe_id,
                kind: e.kind,
                serial: e.serial,
                not_after: e.not_after,
                message: e.message,
                received_at: e.received_at,
            })
            .collect();
        let response = StatusResponse {
            trust_domain: settings.trust_domain.clone(),
            default_policy: settings.default_policy.clone(),
            egress: settings.egress.clone(),
            path_normalization: format!("{:?}", settings.path_normalization),
            ca_generations: self.generations(),
            resource_errors: self.resource_errors.load().iter().map(ToString::to_string).collect(),
            jwks,
            certificate_events,
            sidecars_connected: fleet.sidecars.iter().filter(|s| s.connected).count() as u32,
            ca_keys_protected: !self.ca.load().keys_at_rest().clear,
            caller: caller.name.clone(),
            cert_ttl_seconds: self.cert_ttl.as_secs() as i64,
            rollouts: self.rollouts(&fleet.sidecars),
            services: self.services(&fleet.sidecars),
        };
        self.audited(&caller, "Status", "", Ok(Response::new(response)))
    }

    async fn list_resources(
        &self,
        req: Request<ListResourcesRequest>,
    ) -> Result<Response<ListResourcesResponse>, Status> {
        let caller = self.authorize(&req, "ListResources", "list", "resources").await?;
        let resources = self
            .mesh
            .resources()
            .iter()
            .map(|r| Resource {
                kind: r.kind().to_string(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                labels: r.labels.clone().into_iter().collect(),
                spec_json: r.spec.to_json(),
                origin: r.origin.clone(),
            })
            .collect();
        self.audited(&caller, "ListResources", "", Ok(Response::new(ListResourcesResponse { resources })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_segment_under_admin_of_the_same_trust_domain_is_an_administrator() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        assert!(is_admin_identity(&id("spiffe://cluster.local/admin/alice"), "cluster.local"));
        assert!(!is_admin_identity(&id("spiffe://other.org/admin/alice"), "cluster.local"));
        assert!(!is_admin_identity(&id("spiffe://cluster.local/ns/admin/sa/alice"), "cluster.local"));
        assert!(!is_admin_identity(&id("spiffe://cluster.local/admin/alice/x"), "cluster.local"));
        assert!(!is_admin_identity(&id("spiffe://cluster.local/adminx/alice"), "cluster.local"));
        assert!(!is_admin_identity(&id("spiffe://cluster.local/web"), "cluster.local"));
    }
}
