//! Resource source `kubernetes`: the CRDs, Pods, Services, EndpointSlices and Gateway API
//! routes, watched, feeding the same mesh state as the file source.
//!
//! Every replica watches and serves. The leader (see [`super::lease`]) also writes each CRD's
//! `status`: `Accepted: True`, or `False` with reason `Invalid` and what is wrong. An invalid
//! edit never reaches sidecars; the last accepted version of that object stays in force, as a
//! bad file does with the file source.
//!
//! Services with their EndpointSlices become mesh services ([`super::kube_services`]).
//! `HTTPRoute` and `GRPCRoute` objects (`gateway.networking.k8s.io/v1`) are judged like CRD
//! objects, but their status is not written (`status.parents` belongs to the route's parents'
//! controllers; a refusal shows in the control plane's resource errors). Palisade does not ship
//! the Gateway API CRDs: while one is not installed (its list answers 404) the control plane
//! runs without that kind of route, says so once, and looks again every [`ROUTE_RECHECK`] at
//! most, so routes work within seconds of the official CRDs being installed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::StreamExt;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource as _, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::{ConfigSource, NOT_ENFORCED, Resource, ResourceError, SourceState, validate};
use crate::k8s::crd;

/// Annotation the injector sets on every pod it meshed.
pub const INJECTED_ANNOTATION: &str = "palisade.io/status";

/// The Gateway API group routes are read from.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Longest wait between two attempts to watch a route kind, e.g. while its CRD is missing.
pub const ROUTE_RECHECK: Duration = Duration::from_secs(5);

/// One CRD object's verdict, remembered per generation so a policy compiles once.
struct Verdict {
    generation: i64,
    result: Result<Resource, String>,
    /// The newest accepted version, kept in force while a later edit is invalid.
    last_accepted: Option<Resource>,
}

/// Watches the cluster's CRDs, Pods and Services.
pub struct KubeSource {
    client: kube::Client,
    leader: watch::Receiver<bool>,
    changed: Arc<Notify>,
    /// Woken by every CRD event too, for the rollout writer ([`super::kube_rollout`]).
    crds_changed: Arc<Notify>,
    crds: Vec<(ApiResource, Store<DynamicObject>)>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    routes: Vec<RouteWatch>,
    verdicts: HashMap<String, Verdict>,
    /// Pod and service endpoints, updated object by object.
    table: super::cluster_table::ClusterTable,
    /// Services with their EndpointSlices, as mesh services.
    mesh_services: super::kube_services::KubeServices,
    /// The status this replica last wrote, by uid, so an unchanged verdict is not rewritten.
    written: HashMap<String, (i64, Result<(), String>)>,
}

impl KubeSource {
    /// Starts the watches. CRD status is written while `leader` says this replica leads.
    pub fn new(client: kube::Client, trust_domain: String, leader: watch::Receiver<bool>) -> Self {
        let changed = Arc::new(Notify::new());
        let crds_changed = Arc::new(Notify::new());
        let mut crds = Vec::new();
        for ar in [
            ApiResource::erase::<crd::AuthorizationPolicy>(&()),
            ApiResource::erase::<crd::PeerAuthentication>(&()),
            ApiResource::erase::<crd::RequestAuthentication>(&()),
            ApiResource::erase::<crd::RateLimitPolicy>(&()),
            ApiResource::erase::<crd::WorkloadSecurity>(&()),
        ] {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
            crds.push((ar, watch_into(api, writer, vec![changed.clone(), crds_changed.clone()])));
        }
        let pods = watch_into(Api::<Pod>::all(client.clone()), Default::default(), vec![changed.clone()]);
        let services = watch_into(Api::<Service>::all(client.clone()), Default::default(), vec![changed.clone()]);
        let slices = watch_into(Api::<EndpointSlice>::all(client.clone()), Default::default(), vec![changed.clone()]);
        let routes = [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")]
            .into_iter()
            .map(|(kind, plural)| {
                let gvk = kube::api::GroupVersionKind::gvk(GATEWAY_GROUP, "v1", kind);
                watch_routes(client.clone(), ApiResource::from_gvk_with_plural(&gvk, plural), changed.clone())
            })
            .collect();
        let table = super::cluster_table::ClusterTable::new(&trust_domain);
        KubeSource {
            client,
            leader,
            changed,
            crds_changed,
            crds,
            pods,
            services,
            slices,
            routes,
            verdicts: HashMap::new(),
            table,
            mesh_services: Default::default(),
            written: HashMap::new(),
        }
    }
}

impl KubeSource {
    /// The watched CRD objects by kind, and what wakes at each of their events.
    pub fn crds(&self) -> (Vec<(ApiResource, Store<DynamicObject>)>, Arc<Notify>) {
        (self.crds.clone(), self.crds_changed.clone())
    }
}

impl ConfigSource for KubeSource {
    /// Returns once each watch has listed what exists.
    async fn initial(&mut self) -> anyhow::Result<SourceState> {
        for (ar, store) in &self.crds {
            store.wait_until_ready().await.map_err(|e| anyhow::anyhow!("watching {}: {e}", ar.plural))?;
        }
        self.pods.wait_until_ready().await.map_err(|e| anyhow::anyhow!("watching pods: {e}"))?;
        self.services.wait_until_ready().await.map_err(|e| anyhow::anyhow!("watching services: {e}"))?;
        self.slices.wait_until_ready().await.map_err(|e| anyhow::anyhow!("watching endpointslices: {e}"))?;
        // A route kind the cluster does not serve (or this replica may not read) holds nothing up.
        for route in &self.routes {
            let mut api = route.api.clone();
            tokio::select! {
                ready = route.store.wait_until_ready() => {
                    ready.map_err(|e| anyhow::anyhow!("watching {}: {e}", route.ar.plural))?
                }
                _ = api.wait_for(|a| matches!(a, RouteApi::Absent | RouteApi::Forbidden)) => {}
            }
        }
        let state = self.rebuild().await;
        tracing::info!("kubernetes resource source synced");
        Ok(state)
    }

    async fn changed(&mut self) -> SourceState {
        tokio::select! {
            _ = self.changed.notified() => {}
            r = self.leader.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
        self.rebuild().await
    }
}

/// A reflector over `api` whose every event wakes each of `changed`.
fn watch_into<K>(api: Api<K>, writer: reflector::store::Writer<K>, changed: Vec<Arc<Notify>>) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.iter().for_each(|c| c.notify_one()),
                Err(e) => tracing::warn!(error = %e, "kubernetes watch interrupted; retrying"),
            }
        }
    });
    reader
}

/// Whether a Gateway API route kind is read from the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RouteApi {
    Starting,
    Watching,
    /// Its CRD is not installed (the list answers 404).
    Absent,
    /// This replica may not list it (403: a ClusterRole older than the binary).
    Forbidden,
}

/// One Gateway API route kind, watched whenever the cluster serves it.
struct RouteWatch {
    ar: ApiResource,
    store: Store<DynamicObject>,
    api: watch::Receiver<RouteApi>,
}

/// Watches route kind `ar`, waking `changed` at each event and each change of whether it can be
/// read. A missing CRD or a missing grant is said once, not at every retry.
fn watch_routes(client: kube::Client, ar: ApiResource, changed: Arc<Notify>) -> RouteWatch {
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let store = writer.as_reader();
    let (tx, api) = watch::channel(RouteApi::Starting);
    let objects: Api<DynamicObject> = Api::all_with(client, &ar);
    let stream = reflector::reflector(writer, watcher(objects, watcher::Config::default())).backoff(Recheck::default());
    let (kind, plural) = (ar.kind.clone(), ar.plural.clone());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let now = match &event {
                // Sent before the list request: no news of the kind's presence.
                Ok(watcher::Event::Init) => continue,
                Ok(_) => RouteApi::Watching,
                Err(e) => match api_status(e) {
                    Some(404) => RouteApi::Absent,
                    Some(403) => RouteApi::Forbidden,
                    _ => {
                        tracing::warn!(error = %e, kind = %kind, "kubernetes watch interrupted; retrying");
                        continue;
                    }
                },
            };
            // Said before it is known: `initial` goes on once a route kind is known absent.
            let before = *tx.borrow();
            if before != now {
                match now {
                    RouteApi::Absent => tracing::info!(
                        "the Gateway API {kind} CRD ({plural}.{GATEWAY_GROUP}) is not installed: no {kind} applies \
                         until it is (looked for again every {}s at most)",
                        ROUTE_RECHECK.as_secs()
                    ),
                    RouteApi::Forbidden => tracing::warn!(
                        error = ?event.as_ref().err(),
                        "cannot list {plural}.{GATEWAY_GROUP}: no {kind} applies until the control plane's \
                         ClusterRole grants list and watch on it"
                    ),
                    RouteApi::Watching if before != RouteApi::Starting => {
                        tracing::info!("the Gateway API {kind} CRD is installed: {kind} objects now apply")
                    }
                    _ => {}
                }
                tx.send_replace(now);
            }
            if event.is_ok() || before != now {
                changed.notify_one();
            }
        }
    });
    RouteWatch { ar, store, api }
}

/// The HTTP status of the API server's refusal behind a watch error, if that is what it is.
fn api_status(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// Retries of a route watch: from half a second, doubling up to [`ROUTE_RECHECK`] (the
/// watches of core kinds back off to 30 s). A cluster without the CRD costs one list request
/// per kind every few seconds; one that installs it gets routes within seconds.
struct Recheck(Duration);

impl Default for Recheck {
    fn default() -> Self {
        Recheck(Duration::from_millis(500))
    }
}

impl Iterator for Recheck {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.0;
        self.0 = (self.0 * 2).min(ROUTE_RECHECK);
        Some(wait)
    }
}

impl Backoff for Recheck {
    fn reset(&mut self) {
        *self = Recheck::default();
    }
}

impl KubeSource {
    /// Judges every object (once per generation), and writes CRD status when leading.
    async fn rebuild(&mut self) -> SourceState {
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        let mut live = std::collections::HashSet::new();
        let mut to_write = Vec::new();
        for (ar, store) in &self.crds {
            for obj in store.state() {
                let uid = obj.uid().unwrap_or_default();
                let generation = obj.meta().generation.unwrap_or(0);
                let status = judge(&mut self.verdicts, &ar.kind, &obj, &mut resources, &mut errors);
                if !status_matches(&obj, &ar.kind, generation, &status)
                    && self.written.get(&uid) != Some(&(generation, status.clone()))
                {
                    to_write.push((ar.clone(), obj.clone(), generation, status));
                }
                live.insert(uid);
            }
        }
        // Gateway API routes: judged alike, their status left to their parents' controllers.
        for route in &self.routes {
            for obj in route.store.state() {
                // The verdict is in `errors` when refused.
                let _ = judge(&mut self.verdicts, &route.ar.kind, &obj, &mut resources, &mut errors);
                live.insert(obj.uid().unwrap_or_default());
            }
        }
        self.verdicts.retain(|uid, _| live.contains(uid));
        self.written.retain(|uid, _| live.contains(uid));
        let (pods, services, slices) = (self.pods.state(), self.services.state(), self.slices.state());
        let endpoints = self.table.update(pods.iter().map(|p| &**p), services.iter().map(|s| &**s));
        let (mesh_services, refused) =
            self.mesh_services.update(services.iter().map(|s| &**s), slices.iter().map(|s| &**s), &self.table);
        resources.extend(mesh_services);
        errors.extend(refused);
        if *self.leader.borrow() {
            for (ar, obj, generation, status) in to_write {
                let uid = obj.uid().unwrap_or_default();
                match write_status(&self.client, &ar, &obj, generation, &status).await {
                    Ok(()) => {
                        self.written.insert(uid, (generation, status));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, kind = %ar.kind, name = %obj.name_any(), "cannot write status")
                    }
                }
            }
        }
        SourceState { resources, errors, endpoints: Some(endpoints) }
    }
}

/// Judges `obj`, a `kind` object, once per generation (remembered in `verdicts`): adds what it
/// puts in force to `resources` (itself, or its last accepted generation while it is refused)
/// and its refusal to `errors`; returns its verdict, for status.
fn judge(
    verdicts: &mut HashMap<String, Verdict>,
    kind: &str,
    obj: &DynamicObject,
    resources: &mut Vec<Resource>,
    errors: &mut Vec<ResourceError>,
) -> Result<(), String> {
    let uid = obj.uid().unwrap_or_default();
    let generation = obj.meta().generation.unwrap_or(0);
    let verdict = match verdicts.remove(&uid) {
        Some(v) if v.generation == generation => v,
        previous => {
            let result = to_resource(kind, obj);
            let last_accepted = match &result {
                Ok(r) => Some(r.clone()),
                Err(_) => previous.and_then(|p| p.last_accepted),
            };
            Verdict { generation, result, last_accepted }
        }
    };
    match &verdict.result {
        Ok(r) => resources.push(r.clone()),
        Err(message) => {
            let ns = obj.namespace().unwrap_or_default();
            errors.push(ResourceError {
                origin: format!("kubernetes:{kind}/{ns}/{}", obj.name_any()),
                document: None,
                line: None,
                column: None,
                object: Some(format!("{kind} {ns}/{}", obj.name_any())),
                message: message.clone(),
            });
            // The last accepted generation of this object stays in force.
            if let Some(r) = &verdict.last_accepted {
                resources.push(r.clone());
            }
        }
    }
    let status = verdict.result.as_ref().map(|_| ()).map_err(Clone::clone);
    verdicts.insert(uid, verdict);
    status
}

/// The object as the mesh sees it, or why it is refused. Metadata is reduced to what policy
/// documents carry, so server-side bookkeeping (resourceVersion, managedFields) never changes
/// a snapshot's version.
fn to_resource(kind: &str, obj: &DynamicObject) -> Result<Resource, String> {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    if !spec.is_object() {
        return Err("missing object field `spec`".into());
    }
    let labels: BTreeMap<String, String> = obj.metadata.labels.clone().unwrap_or_default();
    let origin = format!("kubernetes:{kind}/{namespace}/{name}");
    validate(kind, &namespace, &name, labels, spec, origin).map_err(|e| e.message)
}

/// Status, reason and message of the `Accepted` condition for a `kind` object with `status`.
fn acceptance(kind: &str, status: &Result<(), String>) -> (&'static str, &'static str, String) {
    match status {
        Err(m) => ("False", "Invalid", m.clone()),
        // Said plainly, so nobody takes an accepted JWT or rate-limit rule for a protection.
        Ok(()) if NOT_ENFORCED.contains(&kind) => (
            "True",
            "NotEnforced",
            format!("accepted and valid, but this version of Palisade does not enforce {kind} yet"),
        ),
        Ok(()) => ("True", "Accepted", "accepted by the Palisade control plane".to_string()),
    }
}

fn accepted_condition(kind: &str, generation: i64, status: &Result<(), String>) -> Condition {
    let (s, reason, message) = acceptance(kind, status);
    Condition {
        type_: "Accepted".into(),
        status: s.into(),
        reason: reason.into(),
        message,
        observed_generation: Some(generation),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
    }
}

/// Whether the object's status already says what we would write.
fn status_matches(obj: &DynamicObject, kind: &str, generation: i64, status: &Result<(), String>) -> bool {
    let (want_status, want_reason, want_message) = acceptance(kind, status);
    let Some(conds) = obj.data.get("status").and_then(|s| s.get("conditions")).and_then(|c| c.as_array()) else {
        return false;
    };
    conds.iter().any(|c| {
        let field = |name: &str| c.get(name).and_then(Value::as_str);
        field("type") == Some("Accepted")
            && field("status") == Some(want_status)
            && field("reason") == Some(want_reason)
            && field("message") == Some(want_message.as_str())
            && c.get("observedGeneration").and_then(Value::as_i64) == Some(generation)
    })
}

async fn write_status(
    client: &kube::Client,
    ar: &ApiResource,
    obj: &DynamicObject,
    generation: i64,
    status: &Result<(), String>,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &obj.namespace().unwrap_or_default(), ar);
    let body = json!({
        "status": {"observedGeneration": generation, "conditions": [accepted_condition(&ar.kind, generation, status)]}
    });
    api.patch_status(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&body)).await?;
    Ok(())
}
