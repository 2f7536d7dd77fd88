//! Leader election on a `coordination.k8s.io/v1` Lease, as Kubernetes' own controllers do.
//!
//! Every replica serves sidecars; only the leader writes CRD status. A replica takes the Lease
//! when it is free or its holder has not renewed within `leaseDurationSeconds`; every write goes
//! through `resourceVersion`, so two replicas racing for an expired Lease cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// Settings of one election.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    /// This replica's name (its pod name in a cluster).
    pub identity: String,
    /// How long a holder's claim lasts without renewal.
    pub lease_duration: Duration,
}

impl Election {
    /// Runs the election forever; the watch says whether this replica leads now.
    pub fn spawn(self, client: kube::Client) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let leases: Api<Lease> = Api::namespaced(client, &self.namespace);
            // Renew well inside the duration so a slow round trip never loses the Lease.
            let period = self.lease_duration / 3;
            loop {
                let leading = match self.try_acquire_or_renew(&leases).await {
                    Ok(leading) => leading,
                    Err(e) => {
                        tracing::warn!(error = %e, lease = %self.name, "leader election: API server unreachable");
                        // Without a renewal we cannot know we still lead: step down in time.
                        false
                    }
                };
                if *tx.borrow() != leading {
                    tracing::info!(identity = %self.identity, leading, lease = %self.name, "leadership changed");
                }
                tx.send_replace(leading);
                tokio::time::sleep(period).await;
            }
        });
        rx
    }

    async fn try_acquire_or_renew(&self, leases: &Api<Lease>) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let mine = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs().max(1) as i32),
            acquire_time: acquired.or_else(|| Some(now.clone())),
            renew_time: Some(now.clone()),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let Some(mut lease) = leases.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(mine(0, None)),
            };
            return match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(secs)) => {
                let age = Timestamp::now().duration_since(renewed.0);
                age.as_secs_f64() > f64::from(secs)
            }
            _ => true,
        };
        if !held_by_me && !expired && spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty()) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me);
        lease.spec = Some(mine(transitions, if held_by_me { spec.acquire_time } else { None }));
        // `replace` carries the resourceVersion we read: a concurrent writer makes it fail.
        match leases.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
