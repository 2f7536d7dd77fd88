//! `Discovery/Stream`: versioned per-sidecar snapshots with ACK/NACK, as xDS: full snapshots
//! (state of the world) and deltas from the version a sidecar runs (proto/…/discovery.proto
//! says when each is sent).
//!
//! Every change (a resource file, a sidecar joining or leaving, a revocation, a CA step) marks
//! the mesh dirty; after a debounce the generation moves on and each stream looks up *its*
//! view. A view is what every sidecar of one namespace and label set is sent: built once per
//! generation and shared by their streams, so a push costs one build per distinct workload, not
//! one per sidecar. A stream sends only when its view's version (a content hash) changed, so a
//! change reaches exactly the sidecars it concerns; and it sends a delta when it can, so one
//! workload joining costs every other sidecar that entry, not the table.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};
use tonic::{Request, Status, Streaming};

use super::address_proof::{AddressProver, RefusedAddress, Verdict};
use super::ca_set::CaSet;
use super::endpoint_table::{EndpointTable, Table};
use super::source::{Resource, Spec};
use crate::clock::now_unix;
use crate::k8s::crd::MtlsMode;
use crate::proto::discovery::{
    DiscoveryRequest, DiscoveryResponse, Endpoint, MeshConfig, Node, PeerAuthentication, Revocation, Snapshot,
    SnapshotDelta, peer_authentication::Mode, revocation::Target,
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
    /// The control-plane replica the sidecar is connected to, as the management API lists it
    /// (empty in the replica's own state).
    #[serde(default)]
    pub replica: String,
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
            replica: s.replica,
            disconnected_at: None,
        }
    }
}

impl From<SidecarEntry> for crate::proto::admin::Sidecar {
    /// The entry as the management API sends it (the inverse of the conversion above).
    fn from(s: SidecarEntry) -> Self {
        crate::proto::admin::Sidecar {
            spiffe_id: s.spiffe_id,
            addresses: s.addresses,
            labels: s.labels.into_iter().collect(),
            pushed_version: s.pushed_version,
            acked_version: s.acked_version,
            nack_message: s.nack_message,
            certificate_not_after: s.certificate_not_after,
            last_seen: s.last_seen,
            connected: s.connected,
            refused_addresses: s
                .refused_addresses
                .into_iter()
                .map(|r| crate::proto::admin::RefusedAddress { address: r.address, reason: r.reason })
                .collect(),
            replica: s.replica,
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
    /// The endpoint table and its recent changes, rebuilt when a sidecar with addresses joins
    /// or leaves (`endpoints_stale`), before the next view is built.
    endpoints: EndpointTable,
    /// Set, while `sidecars` is locked, by every change to what the table is built from.
    endpoints_stale: AtomicBool,
    /// The views of the current generation.
    views: Mutex<Views>,
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
    /// Moves on whenever a sidecar connects, disconnects, ACKs or NACKs: what a rollout count
    /// is made of.
    acks: watch::Sender<u64>,
}

/// How a resource has rolled out among the connected sidecars it selects: how many there are,
/// how many run the version of their view that carries the resource as it is now (`current`),
/// and how many refused that version (`nacked`). The rest are still being sent it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    pub selected: u32,
    pub current: u32,
    pub nacked: u32,
}

impl std::ops::AddAssign for Rollout {
    fn add_assign(&mut self, other: Rollout) {
        self.selected += other.selected;
        self.current += other.current;
        self.nacked += other.nacked;
    }
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
                            replica: String::new(),
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
            endpoints: EndpointTable::default(),
            endpoints_stale: AtomicBool::new(true),
            views: Mutex::new(Views::default()),
            cluster_endpoints: ArcSwap::from_pointee(Vec::new()),
            shared_endpoints: ArcSwap::from_pointee(Vec::new()),
            next_stream: AtomicU64::new(1),
            dirty: Notify::new(),
            generation: watch::channel(0).0,
            acks: watch::channel(0).0,
        })
    }

    /// Runs the debouncer and the endpoint janitor. Spawn once.
    pub async fn run(self: Arc<Self>) {
        let janitor = {
            let this = self.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut ticks = 0u64;
                // The store write of the last refresh. Never awaited here: a slow disk (an
                // fsync stalled under load) must not hold back dropping departed sidecars; a
                // refresh still running when the next is due is let be, not doubled.
                let mut touching: Option<tokio::task::JoinHandle<()>> = None;
                loop {
                    tick.tick().await;
                    ticks += 1;
                    // Keep the persisted registrations of live sidecars fresh (well within the
                    // grace period), in one transaction.
                    let refresh_every = (this.settings.endpoint_grace.as_secs() / 3).max(1);
                    if ticks.is_multiple_of(refresh_every) && touching.as_ref().is_none_or(|t| t.is_finished()) {
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
                        touching = Some(tokio::task::spawn_blocking(move || {
                            if let Err(e) = store.touch_endpoints(&rows) {
                                tracing::warn!(error = %e, "cannot refresh the stored registrations of live sidecars");
                            }
                        }));
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
                        this.endpoints_stale.store(true, Ordering::Release);
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
            self.endpoints_stale.store(true, Ordering::Release);
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

    /// The mesh services resolved against the endpoint table in force, as each sidecar
    /// resolves them from what it is sent (the specs as they are, not through their JSON).
    pub fn services(&self) -> crate::proxy::service::Resolved {
        self.refresh_endpoints();
        let table = self.endpoints.current();
        let resources = self.resources();
        let specs: Vec<(String, &crate::proxy::service::MeshServiceSpec)> = resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::MeshService(spec) => Some((format!("{}/{}", r.namespace, r.name), spec)),
                _ => None,
            })
            .collect();
        crate::proxy::service::resolve(specs.iter().map(|(name, spec)| (name.as_str(), *spec)), &table.endpoints)
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
            self.endpoints_stale.store(true, Ordering::Release);
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

    /// Notifies whenever a sidecar connects, disconnects, ACKs or NACKs.
    pub fn ack_changes(&self) -> watch::Receiver<u64> {
        self.acks.subscribe()
    }

    fn acks_changed(&self) {
        self.acks.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The rollout of every resource in force among this replica's connected sidecars, by the
    /// resource's origin (`FILE#DOC`, `kubernetes:KIND/NS/NAME`).
    pub fn rollout(&self) -> BTreeMap<String, Rollout> {
        self.rollout_of(&self.sidecars())
    }

    /// The rollout of every resource in force among the connected ones of `sidecars` (this
    /// replica's and others': versions are content hashes, the same at every replica).
    pub fn rollout_of(&self, sidecars: &[SidecarEntry]) -> BTreeMap<String, Rollout> {
        // Connected sidecars by view: (acked version, NACKed the pushed version, pushed version).
        let mut by_view: HashMap<WorkloadKey, Vec<(String, bool, String)>> = HashMap::new();
        for e in sidecars.iter().filter(|e| e.connected) {
            let namespace = e
                .spiffe_id
                .parse::<crate::identity::SpiffeId>()
                .ok()
                .and_then(|id| id.namespace().map(str::to_string))
                .unwrap_or_default();
            by_view.entry((namespace, e.labels.clone())).or_default().push((
                e.acked_version.clone(),
                !e.nack_message.is_empty(),
                e.pushed_version.clone(),
            ));
        }
        let resources = self.resources.load();
        let mut out: BTreeMap<String, Rollout> =
            resources.iter().map(|r| (r.origin.clone(), Rollout::default())).collect();
        for ((namespace, labels), sidecars) in by_view {
            let selecting: Vec<&Resource> = resources.iter().filter(|r| r.selects(&namespace, &labels)).collect();
            if selecting.is_empty() {
                continue;
            }
            let now = self.view_for(&namespace, &labels).version.clone();
            let mut counts = Rollout::default();
            for (acked, nacked, pushed) in sidecars {
                counts.selected += 1;
                if acked == now {
                    counts.current += 1;
                } else if nacked && pushed == now {
                    counts.nacked += 1;
                }
            }
            for r in selecting {
                *out.entry(r.origin.clone()).or_default() += counts;
            }
        }
        out
    }

    /// The view of a workload in `namespace` with `labels` for the current generation: built by
    /// the first stream that asks, shared by the others.
    fn view_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Arc<View> {
        let generation = *self.generation.borrow();
        self.refresh_endpoints();
        let mut views = self.views.lock();
        if views.generation != generation {
            views.by_workload.clear();
            views.generation = generation;
        }
        let key = (namespace.to_string(), labels.clone());
        if let Some(view) = views.by_workload.get(&key) {
            return view.clone();
        }
        let config = self.config_for(namespace, labels);
        let config_version = version_of(&config);
        let table = self.endpoints.current();
        let version = {
            let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            ctx.update(config_version.as_bytes());
            ctx.update(&table.digest);
            crate::hex::encode(&ctx.finish().as_ref()[..8])
        };
        let view = Arc::new(View { version, config_version, config, table, full: Default::default() });
        views.by_workload.insert(key, view.clone());
        view
    }

    /// Everything a workload in `namespace` with `labels` is sent but the endpoints.
    fn config_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Snapshot {
        let resources = self.resources.load();
        let selected: Vec<&Resource> = resources.iter().filter(|r| r.selects(namespace, labels)).collect();
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
        Snapshot {
            policies,
            peer_authentication: Some(peer_authentication),
            trust_bundle_pem: self.ca.load().bundle_pem().to_string(),
            revocations,
            endpoints: Vec::new(),
            mesh: Some(MeshConfig {
                trust_domain: self.settings.trust_domain.clone(),
                default_policy: self.settings.default_policy.clone(),
                egress: self.settings.egress.clone(),
                path_normalization: self.settings.path_normalization.as_str().to_string(),
            }),
        }
    }
}

impl MeshState {
    /// Rebuilds the endpoint table from every meshed workload's addresses if one joined or left
    /// since the last rebuild; the table records what changed, for deltas.
    fn refresh_endpoints(&self) {
        if !self.endpoints_stale.load(Ordering::Acquire) {
            return;
        }
        let sidecars = self.sidecars.lock();
        if !self.endpoints_stale.swap(false, Ordering::AcqRel) {
            return;
        }
        let endpoints: Vec<Endpoint> = sidecars
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
        self.endpoints.replace(endpoints);
    }
}

/// What every sidecar of one workload view (namespace and labels) is sent in one generation.
struct View {
    /// The snapshot's version: a hash of `config_version` and the table's digest.
    version: String,
    /// A hash of `config`: whether a delta must carry it.
    config_version: String,
    /// The snapshot without its endpoints.
    config: Snapshot,
    table: Arc<Table>,
    /// The full snapshot, encoded once by the first stream that sends it and shared as bytes by
    /// every other: at 10,000 endpoints it is about 1.5 MB, and building, cloning and encoding
    /// it per stream cost as much memory as every stream connecting at once held.
    full: std::sync::OnceLock<bytes::Bytes>,
}

impl View {
    /// The snapshot in full, encoded, for a sidecar whose version the stream cannot build on:
    /// the parts, then every endpoint of the table encoded from where it is (protobuf fields may
    /// come in any order), so no copy of the table is built per view.
    fn snapshot(&self) -> bytes::Bytes {
        const ENDPOINTS_FIELD: u32 = 5;
        self.full
            .get_or_init(|| {
                let endpoints: usize = self
                    .table
                    .endpoints
                    .iter()
                    .map(|e| prost::encoding::message::encoded_len(ENDPOINTS_FIELD, e))
                    .sum();
                let mut buf = Vec::with_capacity(self.config.encoded_len() + endpoints);
                self.config.encode(&mut buf).expect("a Vec grows");
                for e in &self.table.endpoints {
                    prost::encoding::message::encode(ENDPOINTS_FIELD, e, &mut buf);
                }
                buf.into()
            })
            .clone()
    }

    /// The delta from `base` to this view, or `None` when the table's history no longer reaches
    /// back to it.
    fn delta_from(&self, base: &Running, endpoints: &EndpointTable) -> Option<SnapshotDelta> {
        let changes = endpoints.since(base.table_rev, self.table.rev)?;
        Some(SnapshotDelta {
            base_version: base.version.clone(),
            config: (base.config_version != self.config_version).then(|| self.config.clone()),
            removed: changes.removed,
            added: changes.added,
        })
    }

    fn running(&self) -> Running {
        Running {
            version: self.version.clone(),
            config_version: self.config_version.clone(),
            table_rev: self.table.rev,
        }
    }
}

/// A workload's namespace and labels: what its view depends on.
type WorkloadKey = (String, BTreeMap<String, String>);

/// The views of one generation, by namespace and labels.
#[derive(Default)]
struct Views {
    generation: u64,
    by_workload: HashMap<WorkloadKey, Arc<View>>,
}

/// A version a stream delivered, as much as a delta from it needs.
#[derive(Clone)]
struct Running {
    version: String,
    config_version: String,
    table_rev: u64,
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

/// A content hash of a snapshot's parts but its endpoints: equal parts have equal versions,
/// across restarts and replicas too.
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

impl DiscoveryService {
    /// Opens one sidecar's stream: checks that its node is the identity its certificate proves,
    /// registers it, and returns the responses its stream will send.
    async fn open(&self, request: Request<Streaming<DiscoveryRequest>>) -> Result<mpsc::Receiver<Outgoing>, Status> {
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
        let connected = self.metrics.sidecar_connected();
        let stream = SidecarStream {
            mesh,
            metrics: self.metrics.clone(),
            stream_id,
            namespace: id.namespace().unwrap_or("").to_string(),
            labels,
            base: None,
            acked: None,
            nonce: 0,
            last_was_delta: false,
            refused: String::new(),
        };
        tokio::spawn(async move {
            let _connected = connected;
            stream.serve(first.version_info, inbound, tx).await;
            tracing::info!(spiffe_id = %id, "sidecar disconnected");
        });
        Ok(rx)
    }
}

/// One response as a stream sends it, encoded: the gRPC message head (compression flag, length,
/// the stream's own fields) and the full snapshot it carries as the bytes its view encoded once
/// (`None` for a delta). Kept small: it waits in the stream's channel.
struct Outgoing {
    head: bytes::Bytes,
    snapshot: Option<bytes::Bytes>,
}

impl Outgoing {
    /// Encodes `message` (whose own `snapshot` is unset) followed by `snapshot` as its `snapshot`
    /// field: protobuf fields may come in any order, so the shared bytes are appended after the
    /// stream's own fields without copying them.
    fn new(message: &DiscoveryResponse, snapshot: Option<bytes::Bytes>) -> Outgoing {
        use bytes::BufMut;
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        const SNAPSHOT_FIELD: u32 = 3;
        debug_assert!(message.snapshot.is_none());
        let own = message.encoded_len();
        let tail = snapshot.as_ref().map_or(0, |s| key_len(SNAPSHOT_FIELD) + encoded_len_varint(s.len() as u64));
        let total = own + tail + snapshot.as_ref().map_or(0, |s| s.len());
        let mut head = bytes::BytesMut::with_capacity(5 + own + tail);
        head.put_u8(0); // not compressed
        head.put_u32(u32::try_from(total).expect("a discovery response under 4 GiB"));
        message.encode(&mut head).expect("the buffer was sized for the message");
        if let Some(snapshot) = &snapshot {
            encode_key(SNAPSHOT_FIELD, WireType::LengthDelimited, &mut head);
            encode_varint(snapshot.len() as u64, &mut head);
        }
        Outgoing { head: head.freeze(), snapshot }
    }
}

/// `Discovery/Stream` served over tonic's router but not through its generated server, whose
/// encoder copies each message into a per-stream buffer that then keeps the capacity of the
/// largest message for the stream's life: a full snapshot of the whole table per connected
/// sidecar, which made memory grow as sidecars × endpoints. Here a response's shared snapshot
/// bytes go to the connection as they are. Requests are decoded by tonic as before; the wire
/// format is the same, so sidecars use the generated client.
#[derive(Clone)]
pub struct DiscoveryGrpc(pub Arc<DiscoveryService>);

/// The one method of the service.
const STREAM_PATH: &str = "/palisade.discovery.v1.Discovery/Stream";
/// The largest request a sidecar sends (an ACK, or a NACK with its reason; the first carries the
/// node): far below tonic's default 4 MiB.
const MAX_REQUEST: usize = 1 << 20;

impl tonic::server::NamedService for DiscoveryGrpc {
    const NAME: &'static str = crate::proto::discovery::discovery_server::SERVICE_NAME;
}

impl tower_service::Service<http::Request<tonic::body::Body>> for DiscoveryGrpc {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        use tonic::codec::Codec;
        let service = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != STREAM_PATH {
                return Ok(Status::unimplemented(format!("no method {}", req.uri().path())).into_http());
            }
            if req.headers().get("grpc-encoding").is_some_and(|e| e != "identity") {
                return Ok(Status::unimplemented("discovery requests are not compressed").into_http());
            }
            let (parts, body) = req.into_parts();
            let decoder =
                SmallRequests(tonic_prost::ProstCodec::<DiscoveryResponse, DiscoveryRequest>::default().decoder());
            let inbound = Streaming::new_request(decoder, body, None, Some(MAX_REQUEST));
            let request = Request::from_http(http::Request::from_parts(parts, inbound));
            Ok(match service.open(request).await {
                Ok(responses) => {
                    let body = ResponseBody { responses, rest: None, ended: false };
                    let mut response = http::Response::new(tonic::body::Body::new(body));
                    response
                        .headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
                    response
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// The prost decoder of a sidecar's requests with a small first buffer: tonic's default 8 KiB
/// is allocated per stream for its life, and ACKs are a few dozen bytes (a larger request grows
/// it as needed).
struct SmallRequests<D>(D);

impl<D: tonic::codec::Decoder> tonic::codec::Decoder for SmallRequests<D> {
    type Item = D::Item;
    type Error = D::Error;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        self.0.decode(src)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        tonic::codec::BufferSettings::new(512, 32 * 1024)
    }
}

/// The response stream as an HTTP/2 body: each message as its head and its shared snapshot,
/// then `grpc-status: 0` once the stream ends.
struct ResponseBody {
    responses: mpsc::Receiver<Outgoing>,
    /// The shared part of the message whose head went last.
    rest: Option<bytes::Bytes>,
    ended: bool,
}

impl http_body::Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        if let Some(rest) = self.rest.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(rest))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        match self.responses.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Outgoing { head, snapshot })) => {
                self.rest = snapshot;
                Poll::Ready(Some(Ok(http_body::Frame::data(head))))
            }
            Poll::Ready(None) => {
                self.ended = true;
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.rest.is_none()
    }
}

/// One sidecar's stream: what it was sent and what it runs, so that each push is a delta from
/// the version it will run when it can be, and a full snapshot when it cannot.
struct SidecarStream {
    mesh: Arc<MeshState>,
    metrics: Arc<super::metrics::ControlMetrics>,
    stream_id: u64,
    namespace: String,
    labels: BTreeMap<String, String>,
    /// What the sidecar runs once it applies everything sent; `None`: unknown, so the next
    /// push is a full snapshot.
    base: Option<Running>,
    /// What it ACKed last: what it still runs after a NACK.
    acked: Option<Running>,
    /// The nonce of the last response sent; replies to older ones are ignored.
    nonce: u64,
    last_was_delta: bool,
    /// The version last refused in full: not sent again until the view changes.
    refused: String,
}

impl SidecarStream {
    /// Pushes the sidecar's view at every generation and takes its replies, until either side
    /// ends the stream.
    async fn serve(
        mut self,
        resume_from: String,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Outgoing>,
    ) {
        let mut generation = self.mesh.generation.subscribe();
        // Resume: a sidecar that already runs the current version gets nothing new, and its
        // version is a base for deltas. Any other version means nothing to this stream.
        let view = self.mesh.view_for(&self.namespace, &self.labels);
        let mut next = if resume_from == view.version {
            self.base = Some(view.running());
            self.acked = self.base.clone();
            ack(&self.mesh, self.stream_id, &resume_from, None);
            None
        } else {
            Some(self.response(&view, false))
        };
        // One response in flight: while the sidecar has not answered the last one, changes are
        // owed, not sent, and its answer brings one response to the newest view (a delta over
        // every change meanwhile). A slow sidecar costs one queued message, not one per
        // generation, and no work is spent on versions it would only skip.
        let (mut awaiting, mut owed) = (false, false);
        loop {
            if let Some(resp) = next.take() {
                if tx.send(resp).await.is_err() {
                    break;
                }
                awaiting = true;
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        let answered = req.response_nonce == self.nonce.to_string();
                        next = self.reply(req);
                        if answered && next.is_none() {
                            awaiting = false;
                            if std::mem::take(&mut owed) {
                                next = self.catch_up();
                            }
                        }
                    }
                    _ => break,
                },
                changed = generation.changed() => {
                    if changed.is_err() { break; }
                    if awaiting {
                        owed = true;
                    } else {
                        next = self.catch_up();
                    }
                }
            }
        }
        unregister(&self.mesh, self.stream_id);
    }

    /// The response to the sidecar's current view, unless it runs it already (or refused it).
    fn catch_up(&mut self) -> Option<Outgoing> {
        let view = self.mesh.view_for(&self.namespace, &self.labels);
        (self.base.as_ref().is_none_or(|b| b.version != view.version) && view.version != self.refused)
            .then(|| self.response(&view, false))
    }

    /// The response that brings the sidecar to `view`: a delta from its base when there is one
    /// the table's history reaches (and `full` is not asked), else the full snapshot.
    fn response(&mut self, view: &View, full: bool) -> Outgoing {
        let started = Instant::now();
        let delta = self.base.as_ref().filter(|_| !full).and_then(|base| view.delta_from(base, &self.mesh.endpoints));
        self.last_was_delta = delta.is_some();
        let snapshot = delta.is_none().then(|| view.snapshot());
        self.metrics.push_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.snapshot_pushes.inc();
        if self.last_was_delta {
            self.metrics.delta_pushes.inc();
        }
        self.nonce += 1;
        self.base = Some(view.running());
        if let Some(e) = self.mesh.sidecars.lock().get_mut(&self.stream_id) {
            e.pushed_version = view.version.clone();
        }
        let message = DiscoveryResponse {
            version_info: view.version.clone(),
            nonce: self.nonce.to_string(),
            snapshot: None,
            delta,
        };
        Outgoing::new(&message, snapshot)
    }

    /// Takes an ACK or NACK of the last response; returns what to send at once: the full
    /// snapshot when a delta was refused (its base did not match, or it did not apply).
    fn reply(&mut self, req: DiscoveryRequest) -> Option<Outgoing> {
        if req.response_nonce != self.nonce.to_string() {
            return None;
        }
        let Some(error) = req.error_detail else {
            self.acked = self.base.clone();
            ack(&self.mesh, self.stream_id, &req.version_info, None);
            return None;
        };
        self.metrics.nack(&error.message);
        ack(&self.mesh, self.stream_id, &req.version_info, Some(error.message));
        // The sidecar runs what it last ACKed if it says so; anything else is unknown.
        let sent = std::mem::replace(&mut self.base, self.acked.clone().filter(|a| a.version == req.version_info));
        if !self.last_was_delta {
            // A refused full snapshot is not sent again until the view changes.
            self.refused = sent.map(|s| s.version).unwrap_or_default();
            return None;
        }
        let view = self.mesh.view_for(&self.namespace, &self.labels);
        Some(self.response(&view, true))
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
            replica: String::new(),
            disconnected_at: None,
        },
    );
    if restored_dropped || has_addresses || replaced.is_some_and(|e| !e.addresses.is_empty()) {
        mesh.endpoints_stale.store(true, Ordering::Release);
    }
    drop(sidecars);
    mesh.mark_dirty();
    mesh.acks_changed();
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
    mesh.acks_changed();
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
    mesh.acks_changed();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(spec: serde_json::Value, name: &str) -> Resource {
        super::super::source::validate("PeerAuthentication", "shop", name, Default::default(), spec, "t".into())
            .unwrap()
    }

    #[test]
    fn a_response_with_a_shared_snapshot_decodes_as_the_whole_message() {
        let snapshot = Snapshot {
            trust_bundle_pem: "roots".into(),
            endpoints: (0..3)
                .map(|i| Endpoint {
                    address: format!("10.0.0.{i}:15006"),
                    spiffe_id: format!("spiffe://cluster.local/ns/shop/sa/s{i}"),
                    labels: [("app".to_string(), format!("s{i}"))].into(),
                })
                .collect(),
            ..Default::default()
        };
        let shared = bytes::Bytes::from(snapshot.encode_to_vec());
        let message = DiscoveryResponse { version_info: "v1".into(), nonce: "7".into(), snapshot: None, delta: None };
        let Outgoing { head, snapshot: rest } = Outgoing::new(&message, Some(shared.clone()));
        let rest = rest.expect("the snapshot follows the head");
        assert_eq!(rest.as_ptr(), shared.as_ptr(), "the snapshot's bytes are sent as they are, not copied");
        let wire = [&head[..], &rest[..]].concat();
        assert_eq!(wire[0], 0, "not compressed");
        let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, wire.len() - 5, "the length prefix covers head and snapshot");
        let decoded = DiscoveryResponse::decode(&wire[5..]).unwrap();
        assert_eq!(
            decoded,
            DiscoveryResponse { version_info: "v1".into(), nonce: "7".into(), snapshot: Some(snapshot), delta: None }
        );

        let delta = SnapshotDelta { base_version: "v0".into(), ..Default::default() };
        let message =
            DiscoveryResponse { version_info: "v2".into(), nonce: "8".into(), snapshot: None, delta: Some(delta) };
        let Outgoing { head, snapshot: rest } = Outgoing::new(&message, None);
        assert!(rest.is_none());
        assert_eq!(DiscoveryResponse::decode(&head[5..]).unwrap(), message);
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
