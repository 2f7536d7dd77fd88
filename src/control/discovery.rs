//! `Discovery/Stream`: versioned per-sidecar snapshots with ACK/NACK, xDS state-of-the-world
//! style.
//!
//! Every change (a resource file, a sidecar joining or leaving, a revocation, a CA step) marks
//! the mesh dirty; after a debounce the generation moves on and each stream recomputes *its*
//! snapshot. A stream sends only when its snapshot's version (a content hash) changed, so a
//! change reaches exactly the sidecars it concerns.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::Stream;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::address_proof::{AddressProver, RefusedAddress, Verdict};
use super::ca_set::CaSet;
use super::source::{Resource, Spec};
use crate::clock::now_unix;
use crate::identity::SpiffeId;
use crate::k8s::crd::MtlsMode;
use crate::proto::discovery::discovery_server::Discovery;
use crate::proto::discovery::{
    DiscoveryRequest, DiscoveryResponse, Endpoint, MeshConfig, Node, PeerAuthentication, Revocation, Snapshot,
    peer_authentication::Mode, revocation::Target,
};

/// Mesh-wide settings the control plane was started with.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MeshSettings {
    pub trust_domain: String,
    pub default_policy: String,
    pub egress: String,
    pub path_normalization: crate::guard::path::Normalization,
    pub debounce: Duration,
    pub endpoint_grace: Duration,
}

/// What the control plane knows about one connected (or recently connected) sidecar.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SidecarEntry {
    pub spiffe_id: String,
    /// The proven addresses, in the endpoint table.
    pub addresses: Vec<String>,
    /// Claimed addresses left out of the table, with why (see [`super::address_proof`]).
    #[serde(default)]
    pub refused_addresses: Vec<RefusedAddress>,
    pub labels: BTreeMap<String, String>,
    pub pushed_version: String,
    pub acked_version: String,
    pub nack_message: String,
    pub connected: bool,
    pub last_seen: i64,
    pub certificate_not_after: i64,
    #[serde(skip)]
    disconnected_at: Option<Instant>,
}

impl From<crate::proto::admin::Sidecar> for SidecarEntry {
    /// A sidecar as the management API lists it (`palisade status`, the live audit).
    fn from(s: crate::proto::admin::Sidecar) -> Self {
        SidecarEntry {
            spiffe_id: s.spiffe_id,
            addresses: s.addresses,
            refused_addresses: s
                .refused_addresses
                .into_iter()
                .map(|r| RefusedAddress { address: r.address, reason: r.reason })
                .collect(),
            labels: s.labels.into_iter().collect(),
            pushed_version: s.pushed_version,
            acked_version: s.acked_version,
            nack_message: s.nack_message,
            connected: s.connected,
            last_seen: s.last_seen,
            certificate_not_after: s.certificate_not_after,
            disconnected_at: None,
        }
    }
}

/// The control plane's live model of the mesh, shared by every stream.
pub struct MeshState {
    pub settings: MeshSettings,
    pub ca: Arc<ArcSwap<CaSet>>,
    store: Arc<super::store::Store>,
    resources: ArcSwap<Vec<Resource>>,
    /// JWKS documents fetched by the control plane (`jwksUri` → document), pushed in the specs
    /// of the `RequestAuthentication` resources that name them.
    jwks: ArcSwap<BTreeMap<String, Arc<str>>>,
    revocations: ArcSwap<(Vec<String>, Vec<String>)>,
    sidecars: Mutex<BTreeMap<u64, SidecarEntry>>,
    /// The endpoint table, built once and shared by every stream until a sidecar with addresses
    /// joins or leaves the table; rebuilding it per stream made every push O(sidecars²).
    /// Written only while `sidecars` is locked, so it never goes stale behind a change.
    endpoints: ArcSwapOption<Vec<Endpoint>>,
    /// Endpoints a cluster source knows without any sidecar registering them (Kubernetes
    /// pods and services); merged into the table.
    cluster_endpoints: ArcSwap<Vec<Endpoint>>,
    /// Registrations read from a store shared with other replicas (PostgreSQL), each with when
    /// it was last seen by the replica its sidecar is connected to; merged into the table, and
    /// dropped once older than the grace period, as this replica drops its own.
    shared_endpoints: ArcSwap<Vec<(Endpoint, i64)>>,
    next_stream: AtomicU64,
    dirty: Notify,
    generation: watch::Sender<u64>,
}

impl MeshState {
    /// A mesh with no resources and no sidecars yet.
    ///
    /// Sidecars registered before a restart (and seen within the endpoint grace period) are
    /// restored as disconnected: a restart never shrinks the endpoint table, so no sidecar
    /// mistakes a meshed peer for an outside destination while the others reconnect.
    pub fn new(settings: MeshSettings, ca: Arc<ArcSwap<CaSet>>, store: Arc<super::store::Store>) -> Arc<Self> {
        let mut sidecars = BTreeMap::new();
        let since = now_unix() - settings.endpoint_grace.as_secs() as i64;
        match store.recent_endpoints(since) {
            Ok(rows) => {
                for (i, (spiffe_id, addresses, labels)) in rows.into_iter().enumerate() {
                    sidecars.insert(
                        u64::MAX - i as u64,
                        SidecarEntry {
                            spiffe_id,
                            addresses: serde_json::from_str(&addresses).unwrap_or_default(),
                            refused_addresses: Vec::new(),
                            labels: serde_json::from_str(&labels).unwrap_or_default(),
                            pushed_version: String::new(),
                            acked_version: String::new(),
                            nack_message: String::new(),
                            connected: false,
                            last_seen: now_unix(),
                            certificate_not_after: 0,
                            disconnected_at: Some(Instant::now()),
                        },
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot restore the endpoint table"),
        }
        Arc::new(MeshState {
            settings,
            ca,
            store,
            resources: ArcSwap::from_pointee(Vec::new()),
            jwks: ArcSwap::from_pointee(BTreeMap::new()),
            revocations: ArcSwap::from_pointee((Vec::new(), Vec::new())),
            sidecars: Mutex::new(sidecars),
            endpoints: ArcSwapOption::empty(),
            cluster_endpoints: ArcSwap::from_pointee(Vec::new()),
            shared_endpoints: ArcSwap::from_pointee(Vec::new()),
            next_stream: AtomicU64::new(1),
            dirty: Notify::new(),
            generation: watch::channel(0).0,
        })
    }

    /// Runs the debouncer and the endpoint janitor. Spawn once.
    pub async fn run(self: Arc<Self>) {
        let janitor = {
            let this = self.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut ticks = 0u64;
                loop {
                    tick.tick().await;
                    ticks += 1;
                    // Keep the persisted registrations of live sidecars fresh (well within the
                    // grace period), in one transaction.
                    let refresh_every = (this.settings.endpoint_grace.as_secs() / 3).max(1);
                    if ticks.is_multiple_of(refresh_every) {
                        let rows: Vec<(String, String, String)> = this
                            .sidecars
                            .lock()
                            .values()
                            .filter(|e| e.connected)
                            .map(|e| {
                                (
                                    e.spiffe_id.clone(),
                                    serde_json::to_string(&e.addresses).unwrap_or_default(),
                                    serde_json::to_string(&e.labels).unwrap_or_default(),
                                )
                            })
                            .collect();
                        let store = this.store.clone();
                        let _ = tokio::task::spawn_blocking(move || store.touch_endpoints(&rows)).await;
                    }
                    let grace = this.settings.endpoint_grace;
                    let mut gone = false;
                    let mut sidecars = this.sidecars.lock();
                    sidecars.retain(|_, e| {
                        let keep = e.disconnected_at.is_none_or(|t| t.elapsed() < grace);
                        gone |= !keep;
                        keep
                    });
                    let cutoff = now_unix() - grace.as_secs() as i64;
                    let shared = this.shared_endpoints.load();
                    if shared.iter().any(|(_, seen)| *seen < cutoff) {
                        let fresh = shared.iter().filter(|(_, seen)| *seen >= cutoff).cloned().collect();
                        this.shared_endpoints.store(Arc::new(fresh));
                        gone = true;
                    }
                    if gone {
                        this.endpoints.store(None);
                    }
                    drop(sidecars);
                    if gone {
                        this.mark_dirty();
                    }
                }
            }
        };
        let debouncer = async {
            loop {
                self.dirty.notified().await;
                tokio::time::sleep(self.settings.debounce).await;
                self.generation.send_modify(|g| *g += 1);
            }
        };
        // Registrations made at other replicas sharing the store, read when one announces a
        // change (never polled).
        let shared = async {
            let Some(changed) = self.store.endpoint_changes() else { return };
            loop {
                changed.notified().await;
                let since = now_unix() - self.settings.endpoint_grace.as_secs() as i64;
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || store.shared_endpoints(since)).await {
                    Ok(Ok(rows)) => self.set_shared_endpoints(rows),
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot read the registrations of other replicas"),
                    Err(e) => tracing::warn!(error = %e, "reading the registrations of other replicas panicked"),
                }
            }
        };
        tokio::join!(janitor, debouncer, shared);
    }

    /// Replaces the registrations read from the shared store.
    fn set_shared_endpoints(&self, rows: Vec<super::store::EndpointRow>) {
        let mut next: Vec<(Endpoint, i64)> = rows
            .into_iter()
            .flat_map(|row| {
                let addresses: Vec<String> = serde_json::from_str(&row.addresses).unwrap_or_default();
                let labels: BTreeMap<String, String> = serde_json::from_str(&row.labels).unwrap_or_default();
                addresses.into_iter().map(move |address| {
                    let endpoint = Endpoint {
                        address,
                        spiffe_id: row.spiffe_id.clone(),
                        labels: labels.clone().into_iter().collect(),
                    };
                    (endpoint, row.last_seen)
                })
            })
            .collect();
        next.sort_by(|a, b| (&a.0.address, &a.0.spiffe_id, a.1).cmp(&(&b.0.address, &b.0.spiffe_id, b.1)));
        let table_changed = {
            let cur = self.shared_endpoints.load();
            cur.len() != next.len() || cur.iter().zip(&next).any(|(a, b)| a.0 != b.0)
        };
        let sidecars = self.sidecars.lock();
        self.shared_endpoints.store(Arc::new(next));
        if table_changed {
            self.endpoints.store(None);
        }
        drop(sidecars);
        if table_changed {
            self.mark_dirty();
        }
    }

    /// Something changed; push after the debounce.
    pub fn mark_dirty(&self) {
        self.dirty.notify_one();
    }

    /// Replaces the resource set.
    pub fn set_resources(&self, resources: Vec<Resource>) {
        if **self.resources.load() != resources {
            self.resources.store(Arc::new(resources));
            self.mark_dirty();
        }
    }

    /// The validated resources in force.
    pub fn resources(&self) -> Arc<Vec<Resource>> {
        self.resources.load_full()
    }

    /// Notifies after every debounced change (the generation moves on).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Every `jwksUri` of the `RequestAuthentication` resources in force that the control plane
    /// must fetch (a rule with inline `jwks` needs none).
    pub fn jwks_uris(&self) -> std::collections::BTreeSet<String> {
        self.jwks_uris_where(|_| true)
    }

    /// The `jwksUri` of every rule in force whose `issuer` is `issuer`.
    pub fn jwks_uris_of(&self, issuer: &str) -> std::collections::BTreeSet<String> {
        self.jwks_uris_where(|rule| rule.issuer == issuer)
    }

    fn jwks_uris_where(
        &self,
        keep: impl Fn(&crate::guard::jwt::JwtRule) -> bool,
    ) -> std::collections::BTreeSet<String> {
        let resources = self.resources.load();
        resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::RequestAuthentication(spec) => Some(spec),
                _ => None,
            })
            .flat_map(|spec| &spec.jwt_rules)
            .filter(|rule| rule.jwks.is_none() && keep(rule))
            .filter_map(|rule| rule.jwks_uri.clone())
            .collect()
    }

    /// The fetched JWKS documents now in force, by `jwksUri`.
    pub fn jwks(&self) -> Arc<BTreeMap<String, Arc<str>>> {
        self.jwks.load_full()
    }

    /// Replaces the fetched JWKS documents; sidecars get the change with their next snapshot.
    pub fn set_jwks(&self, documents: BTreeMap<String, Arc<str>>) {
        if **self.jwks.load() != documents {
            self.jwks.store(Arc::new(documents));
            self.mark_dirty();
        }
    }

    /// Replaces the endpoints a cluster source knows (pod and service addresses).
    pub fn set_cluster_endpoints(&self, endpoints: Vec<Endpoint>) {
        if **self.cluster_endpoints.load() != endpoints {
            let sidecars = self.sidecars.lock();
            self.cluster_endpoints.store(Arc::new(endpoints));
            self.endpoints.store(None);
            drop(sidecars);
            self.mark_dirty();
        }
    }

    /// Replaces the revocation lists (identities, serials).
    pub fn set_revocations(&self, ids: Vec<String>, serials: Vec<String>) {
        // Sorted and normalized: `is_revoked` searches it.
        let next = crate::identity::revocation::lists(ids, serials);
        if **self.revocations.load() != next {
            self.revocations.store(Arc::new(next));
            self.mark_dirty();
        }
    }

    /// Takes revocations shared by other replicas (Kubernetes: the watched ConfigMap): those
    /// this replica's store lacks are recorded there (its ledger and `ListRevocations` show
    /// them; nothing is ever un-revoked), then the store's lists are pushed. Blocking.
    pub fn adopt_revocations(&self, ids: &[String], serials: &[String]) -> Result<(), super::store::StoreError> {
        let (have_ids, have_serials) = self.store.revocations()?;
        for id in ids.iter().filter(|i| !have_ids.contains(i)) {
            self.store.revoke(Some(id), None)?;
        }
        for serial in serials.iter().filter(|s| !have_serials.contains(s)) {
            self.store.revoke(None, Some(serial))?;
        }
        let (ids, serials) = self.store.revocations()?;
        self.set_revocations(ids, serials);
        Ok(())
    }

    /// Whether `id`, or the certificate `serial` (hex) when one is presented, is revoked in the
    /// lists pushed to sidecars: issuance refuses exactly what sidecars refuse.
    pub fn is_revoked(&self, id: &str, serial: Option<&str>) -> bool {
        let (ids, serials) = &**self.revocations.load();
        ids.iter().any(|i| i == id)
            || serial
                .and_then(crate::identity::revocation::normalize_serial)
                .is_some_and(|s| serials.binary_search(&s).is_ok())
    }

    /// Whether a cluster source (the Kubernetes API server) lists `ip` as a pod of `id`.
    pub fn cluster_serves(&self, id: &str, ip: std::net::IpAddr) -> bool {
        self.cluster_endpoints.load().iter().any(|e| {
            e.spiffe_id == id && e.address.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().to_canonical() == ip)
        })
    }

    /// Whether a connected sidecar of an identity other than `id` holds `ip` (any port). A
    /// disconnected one is not asked: its address may have passed to a new workload.
    pub fn ip_held_by_other(&self, id: &str, ip: std::net::IpAddr) -> bool {
        self.sidecars.lock().values().any(|e| {
            e.connected
                && e.spiffe_id != id
                && e.addresses
                    .iter()
                    .any(|a| a.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().to_canonical() == ip))
        })
    }

    /// Every sidecar entry, for `palisade status`.
    pub fn sidecars(&self) -> Vec<SidecarEntry> {
        self.sidecars.lock().values().cloned().collect()
    }

    /// The snapshot for one sidecar, and its version.
    pub fn snapshot_for(&self, id: &SpiffeId, labels: &BTreeMap<String, String>) -> (String, Snapshot) {
        let ns = id.namespace().unwrap_or("");
        let resources = self.resources.load();
        let selected: Vec<&Resource> = resources.iter().filter(|r| r.selects(ns, labels)).collect();
        let jwks = self.jwks.load();
        let policies = selected
            .iter()
            .filter(|r| !matches!(r.spec, Spec::PeerAuthentication(_)))
            .map(|r| crate::proto::discovery::Resource {
                kind: r.kind().to_string(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                origin: r.origin.clone(),
                spec_json: match &r.spec {
                    Spec::RequestAuthentication(spec) => with_fetched_keys(spec, &jwks),
                    spec => spec.to_json(),
                },
                labels: r.labels.clone().into_iter().collect(),
            })
            .collect();
        let peer_authentication = peer_authentication(&selected);
        let (ids, serials) = &**self.revocations.load();
        let revocations = ids
            .iter()
            .map(|i| Revocation { target: Some(Target::SpiffeId(i.clone())) })
            .chain(serials.iter().map(|s| Revocation { target: Some(Target::Serial(s.clone())) }))
            .collect();
        let endpoints = Vec::clone(&self.endpoint_table());
        let snapshot = Snapshot {
            policies,
            peer_authentication: Some(peer_authentication),
            trust_bundle_pem: self.ca.load().bundle_pem().to_string(),
            revocations,
            endpoints,
            mesh: Some(MeshConfig {
                trust_domain: self.settings.trust_domain.clone(),
                default_policy: self.settings.default_policy.clone(),
                egress: self.settings.egress.clone(),
                path_normalization: self.settings.path_normalization.as_str().to_string(),
            }),
        };
        (version_of(&snapshot), snapshot)
    }
}

impl MeshState {
    /// Every meshed workload's address and identity, sorted; cached until it changes.
    fn endpoint_table(&self) -> Arc<Vec<Endpoint>> {
        if let Some(table) = self.endpoints.load_full() {
            return table;
        }
        let sidecars = self.sidecars.lock();
        let mut endpoints: Vec<Endpoint> = sidecars
            .values()
            .flat_map(|e| {
                e.addresses.iter().map(|a| Endpoint {
                    address: a.clone(),
                    spiffe_id: e.spiffe_id.clone(),
                    labels: e.labels.clone().into_iter().collect(),
                })
            })
            .chain(self.cluster_endpoints.load().iter().cloned())
            .chain(self.shared_endpoints.load().iter().map(|(e, _)| e.clone()))
            .collect();
        endpoints.sort_by(|a, b| (&a.address, &a.spiffe_id).cmp(&(&b.address, &b.spiffe_id)));
        endpoints.dedup_by(|a, b| a.address == b.address && a.spiffe_id == b.spiffe_id);
        let table = Arc::new(endpoints);
        self.endpoints.store(Some(table.clone()));
        table
    }
}

/// A `RequestAuthentication` spec as a sidecar receives it: every rule that names only a
/// `jwksUri` carries the document the control plane fetched from it as `jwks` (none yet: no
/// keys, and the sidecar refuses that issuer's tokens with `no-keys`). Sidecars never fetch.
fn with_fetched_keys(spec: &crate::guard::jwt::RequestAuthenticationSpec, jwks: &BTreeMap<String, Arc<str>>) -> String {
    let mut spec = spec.clone();
    for rule in &mut spec.jwt_rules {
        if rule.jwks.is_none()
            && let Some(doc) = rule.jwks_uri.as_ref().and_then(|uri| jwks.get(uri))
        {
            rule.jwks = Some(doc.to_string());
        }
    }
    serde_json::to_string(&spec).expect("typed specs always serialize")
}

/// The most specific PeerAuthentication: one with a selector beats the namespace-wide one.
/// Without any, STRICT (zero trust).
fn peer_authentication(selected: &[&Resource]) -> PeerAuthentication {
    let mut chosen: Option<(bool, &crate::k8s::crd::PeerAuthenticationSpec)> = None;
    for r in selected {
        let Spec::PeerAuthentication(spec) = &r.spec else { continue };
        if chosen.is_none_or(|(has_selector, _)| !has_selector && spec.selector.is_some()) {
            chosen = Some((spec.selector.is_some(), spec));
        }
    }
    let mode_of = |m: Option<MtlsMode>| match m {
        Some(MtlsMode::Permissive) => Mode::Permissive,
        _ => Mode::Strict,
    };
    let Some((_, spec)) = chosen else {
        return PeerAuthentication { mode: Mode::Strict as i32, port_modes: Default::default() };
    };
    // Ports were checked when the resource was validated.
    let port_modes = spec
        .port_level_mtls
        .iter()
        .filter_map(|(port, m)| Some((port.parse::<u16>().ok()?.into(), mode_of(Some(m.mode)) as i32)))
        .collect();
    PeerAuthentication { mode: mode_of(spec.mtls.as_ref().map(|m| m.mode)) as i32, port_modes }
}

/// A content hash: equal snapshots have equal versions, across restarts too.
fn version_of(snapshot: &Snapshot) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &snapshot.encode_to_vec());
    crate::hex::encode(&digest.as_ref()[..8])
}

/// The gRPC service.
pub struct DiscoveryService {
    pub mesh: Arc<MeshState>,
    pub metrics: Arc<super::metrics::ControlMetrics>,
    /// Judges the addresses each registration claims.
    pub prover: Arc<AddressProver>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(&self, request: Request<Streaming<DiscoveryRequest>>) -> Result<Response<ResponseStream>, Status> {
        let certs = request.peer_certs();
        let remote = request.remote_addr();
        let (id, _serial) = crate::tls::peer_identity(certs.as_deref().map(|v| v.as_slice()))
            .map_err(|e| Status::unauthenticated(format!("discovery needs the workload's mTLS certificate: {e}")))?;
        let not_after = certs
            .as_ref()
            .and_then(|c| c.first())
            .and_then(|c| crate::tls::validity(c).map(|(_, not_after)| not_after))
            .unwrap_or(0);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before the first request"))?;
        let node = first.node.clone().ok_or_else(|| Status::invalid_argument("first request must carry `node`"))?;
        if node.spiffe_id != id.as_str() {
            return Err(Status::permission_denied(format!(
                "node claims {} but its certificate proves {id}",
                node.spiffe_id
            )));
        }
        let mesh = self.mesh.clone();
        let stream_id = mesh.next_stream.fetch_add(1, Ordering::Relaxed);
        let labels: BTreeMap<String, String> = node.labels.clone().into_iter().collect();
        let verdict = self
            .prover
            .judge(
                &id,
                &node.addresses,
                remote,
                |ip| mesh.cluster_serves(id.as_str(), ip),
                |ip| mesh.ip_held_by_other(id.as_str(), ip),
            )
            .await;
        tracing::info!(spiffe_id = %id, addresses = ?verdict.accepted, refused = verdict.refused.len(),
            resume = %first.version_info, "sidecar connected");
        register(&mesh, stream_id, &node, verdict, not_after);

        let (tx, rx) = mpsc::channel(4);
        let metrics = self.metrics.clone();
        let connected = metrics.sidecar_connected();
        tokio::spawn(async move {
            let _connected = connected;
            let mut generation = mesh.generation.subscribe();
            let mut sent_version = first.version_info.clone();
            let mut nonce = 0u64;
            let push = |sent_version: &mut String, nonce: &mut u64| {
                let started = Instant::now();
                let (version, snapshot) = mesh.snapshot_for(&id, &labels);
                if version == *sent_version {
                    return None;
                }
                metrics.push_duration.observe(started.elapsed().as_secs_f64());
                metrics.snapshot_pushes.inc();
                *nonce += 1;
                *sent_version = version.clone();
                if let Some(e) = mesh.sidecars.lock().get_mut(&stream_id) {
                    e.pushed_version = version.clone();
                }
                Some(DiscoveryResponse { version_info: version, nonce: nonce.to_string(), snapshot: Some(snapshot) })
            };
            // Resume: a sidecar that already runs the current version gets nothing new.
            if let Some(resp) = push(&mut sent_version, &mut nonce) {
                if tx.send(Ok(resp)).await.is_err() {
                    return unregister(&mesh, stream_id);
                }
            } else {
                ack(&mesh, stream_id, &sent_version, None);
            }
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            if req.response_nonce == nonce.to_string() {
                                if let Some(e) = &req.error_detail {
                                    metrics.nack(&e.message);
                                }
                                ack(&mesh, stream_id, &req.version_info, req.error_detail.map(|e| e.message));
                            }
                        }
                        _ => break,
                    },
                    changed = generation.changed() => {
                        if changed.is_err() { break; }
                        if let Some(resp) = push(&mut sent_version, &mut nonce)
                            && tx.send(Ok(resp)).await.is_err()
                        {
                            break;
                        }
                    }
                }
            }
            tracing::info!(spiffe_id = %id, "sidecar disconnected");
            unregister(&mesh, stream_id);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Enters a sidecar with only the addresses `verdict` accepted.
fn register(mesh: &MeshState, stream_id: u64, node: &Node, verdict: Verdict, not_after: i64) {
    let Verdict { accepted: addresses, refused } = verdict;
    persist(mesh, &node.spiffe_id, &addresses, node);
    let mut sidecars = mesh.sidecars.lock();
    // A restored entry for the same workload is superseded by the live one.
    let before = sidecars.len();
    sidecars.retain(|_, e| e.connected || e.spiffe_id != node.spiffe_id || e.addresses != addresses);
    let restored_dropped = sidecars.len() != before;
    let has_addresses = !addresses.is_empty();
    let replaced = sidecars.insert(
        stream_id,
        SidecarEntry {
            spiffe_id: node.spiffe_id.clone(),
            addresses,
            refused_addresses: refused,
            labels: node.labels.clone().into_iter().collect(),
            pushed_version: String::new(),
            acked_version: String::new(),
            nack_message: String::new(),
            connected: true,
            last_seen: now_unix(),
            certificate_not_after: not_after,
            disconnected_at: None,
        },
    );
    if restored_dropped || has_addresses || replaced.is_some_and(|e| !e.addresses.is_empty()) {
        mesh.endpoints.store(None);
    }
    drop(sidecars);
    mesh.mark_dirty();
}

/// Writes a registration through to the store, on the blocking pool (an fsync'd upsert must not
/// stall a runtime thread while thousands of sidecars connect).
fn persist(mesh: &MeshState, id: &str, addresses: &[String], node: &Node) {
    let addresses = serde_json::to_string(addresses).unwrap_or_default();
    let labels: BTreeMap<_, _> = node.labels.iter().collect();
    let labels = serde_json::to_string(&labels).unwrap_or_default();
    let (store, id) = (mesh.store.clone(), id.to_string());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.touch_endpoint(&id, &addresses, &labels) {
            tracing::warn!(error = %e, "cannot persist the endpoint registration");
        }
    });
}

fn unregister(mesh: &MeshState, stream_id: u64) {
    if let Some(e) = mesh.sidecars.lock().get_mut(&stream_id) {
        e.connected = false;
        e.disconnected_at = Some(Instant::now());
    }
}

fn ack(mesh: &MeshState, stream_id: u64, version: &str, nack: Option<String>) {
    if let Some(e) = mesh.sidecars.lock().get_mut(&stream_id) {
        e.last_seen = now_unix();
        match nack {
            Some(msg) => {
                tracing::warn!(spiffe_id = %e.spiffe_id, version = %e.pushed_version, error = %msg, "sidecar NACKed a snapshot");
                e.nack_message = msg;
            }
            None => {
                e.acked_version = version.to_string();
                e.nack_message.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(spec: serde_json::Value, name: &str) -> Resource {
        super::super::source::validate("PeerAuthentication", "shop", name, Default::default(), spec, "t".into())
            .unwrap()
    }

    #[test]
    fn peer_authentication_prefers_the_selector_and_keeps_port_modes() {
        let ns_wide = resource(serde_json::json!({"mtls": {"mode": "PERMISSIVE"}}), "default");
        let selected = resource(
            serde_json::json!({"selector": {"matchLabels": {"app": "orders"}}, "mtls": {"mode": "STRICT"},
                               "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}),
            "orders",
        );
        let pa = peer_authentication(&[&ns_wide, &selected]);
        assert_eq!(pa.mode, Mode::Strict as i32);
        assert_eq!(pa.port_modes.get(&9090), Some(&(Mode::Permissive as i32)));
        let pa = peer_authentication(&[&selected, &ns_wide]);
        assert_eq!(pa.mode, Mode::Strict as i32, "order of resources does not matter");
        assert_eq!(peer_authentication(&[&ns_wide]).mode, Mode::Permissive as i32);
        assert_eq!(peer_authentication(&[]).mode, Mode::Strict as i32, "zero trust without any resource");
    }
}
