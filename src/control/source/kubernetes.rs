//! Resource source `kubernetes`: the CRDs, Pods and Services, watched, feeding the same mesh
//! state as the file source.
//!
//! Every replica watches and serves. The leader (see [`super::lease`]) also writes each CRD's
//! `status`: `Accepted: True`, or `False` with reason `Invalid` and what is wrong. An invalid
//! edit never reaches sidecars; the last accepted version of that object stays in force, as a
//! bad file does with the file source.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource as _, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::{ConfigSource, NOT_ENFORCED, Resource, ResourceError, SourceState, validate};
use crate::k8s::crd;

/// Annotation the injector sets on every pod it meshed.
pub const INJECTED_ANNOTATION: &str = "palisade.io/status";

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
    verdicts: HashMap<String, Verdict>,
    /// Pod and service endpoints, updated object by object.
    table: super::cluster_table::ClusterTable,
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
        let table = super::cluster_table::ClusterTable::new(&trust_domain);
        KubeSource {
            client,
            leader,
            changed,
            crds_changed,
            crds,
            pods,
            services,
            verdicts: HashMap::new(),
            table,
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
                live.insert(uid.clone());
                let generation = obj.meta().generation.unwrap_or(0);
                let verdict = match self.verdicts.remove(&uid) {
                    Some(v) if v.generation == generation => v,
                    previous => {
                        let result = to_resource(&ar.kind, &obj);
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
                            origin: format!("kubernetes:{}/{ns}/{}", ar.kind, obj.name_any()),
                            document: None,
                            line: None,
                            column: None,
                            object: Some(format!("{} {ns}/{}", ar.kind, obj.name_any())),
                            message: message.clone(),
                        });
                        // The last accepted generation of this object stays in force.
                        if let Some(r) = &verdict.last_accepted {
                            resources.push(r.clone());
                        }
                    }
                }
                let status = verdict.result.as_ref().map(|_| ()).map_err(Clone::clone);
                if !status_matches(&obj, &ar.kind, generation, &status)
                    && self.written.get(&uid) != Some(&(generation, status.clone()))
                {
                    to_write.push((ar.clone(), obj.clone(), generation, status));
                }
                self.verdicts.insert(uid, verdict);
            }
        }
        self.verdicts.retain(|uid, _| live.contains(uid));
        self.written.retain(|uid, _| live.contains(uid));
        let (pods, services) = (self.pods.state(), self.services.state());
        let endpoints = self.table.update(pods.iter().map(|p| &**p), services.iter().map(|s| &**s));
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
