//! Kubernetes mode: the CA generations live in the CA Secret every replica shares.
//!
//! A rotation is one operation for the whole mesh. The replica serving `ca rotate` adds the
//! `next` generation to the Secret; the elected leader alone advances the steps when they come
//! due ([`SharedCa::advance`]); every replica watches the Secret and hands what it reads to its
//! CA worker ([`SharedCa::offer`]), which mirrors it into the local store and swaps its signer and
//! trust bundle. Every write carries the `resourceVersion` it read, so two writers cannot both
//! win; a restarted replica adopts the Secret as it stands and never undoes a rotation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use crate::identity::{CaMaterial, KeyCustody};
use crate::k8s::ca_secret::{self, CaSecretError, SharedGeneration};

use super::ca_set::{self, CaSetError, GenerationState};

/// The shared CA Secret and the hand-over to this replica's CA worker.
pub struct SharedCa {
    pub client: kube::Client,
    pub namespace: String,
    pub name: String,
    pub custody: KeyCustody,
    /// The generations last read from the Secret, not yet adopted by the CA worker.
    pending: ArcSwapOption<Vec<SharedGeneration>>,
    /// The CA worker's wake-up, and its flag to reload the CA from the store.
    wake: Arc<Notify>,
    reload: Arc<AtomicBool>,
    /// Wakes the leader's rotation worker when the Secret changed.
    pub poke: Notify,
}

impl SharedCa {
    pub fn new(
        client: kube::Client,
        namespace: String,
        name: String,
        custody: KeyCustody,
        wake: Arc<Notify>,
        reload: Arc<AtomicBool>,
    ) -> Self {
        SharedCa {
            client,
            namespace,
            name,
            custody,
            pending: ArcSwapOption::empty(),
            wake,
            reload,
            poke: Notify::new(),
        }
    }

    /// Hands generations read from the Secret to the CA worker and wakes it (and the leader's
    /// rotation worker).
    pub fn offer(&self, generations: Vec<SharedGeneration>) {
        self.pending.store(Some(Arc::new(generations)));
        self.reload.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        self.poke.notify_one();
    }

    /// The generations offered since the last call, for the CA worker to adopt.
    pub fn take_pending(&self) -> Option<Arc<Vec<SharedGeneration>>> {
        self.pending.swap(None)
    }

    /// Starts a rotation for the whole mesh: a new generation joins the Secret as `next`.
    /// Refused while one is in progress.
    /// Returns the new generation's number and the generations as stored.
    pub async fn start_rotation(&self, trust_domain: &str) -> Result<(u32, Vec<SharedGeneration>), CaSecretError> {
        let mut started = 0;
        let generations = ca_secret::update(&self.client, &self.namespace, &self.name, &self.custody, |gens| {
            if let Some(g) = gens.iter().find(|g| g.state == "next" || g.state == "retiring") {
                return Err(CaSetError::RotationInProgress(g.generation, g.state.clone()).to_string());
            }
            let number = gens.iter().map(|g| g.generation).max().unwrap_or(0) + 1;
            let material = CaMaterial::generate_in(trust_domain, number, &self.custody)
                .map_err(|e| format!("generating CA generation {number}: {e}"))?;
            gens.push(SharedGeneration {
                generation: number,
                state: "next".into(),
                created_at: crate::clock::now_unix(),
                retire_after: None,
                material,
            });
            started = number;
            Ok(true)
        })
        .await?;
        self.offer(generations.clone());
        Ok((started, generations))
    }

    /// The leader's step: moves the rotation in the Secret on when its time has come. Returns
    /// when the next step is due (Unix seconds), if a rotation is in progress.
    pub async fn advance(&self, propagation: Duration, max_lifetime: Duration) -> Result<Option<i64>, CaSecretError> {
        let mut stepped = None;
        let generations = ca_secret::update(&self.client, &self.namespace, &self.name, &self.custody, |gens| {
            let mut states = states(gens);
            let Some(step) = ca_set::rotation_step(&states, crate::clock::now_unix(), propagation, max_lifetime) else {
                return Ok(false);
            };
            ca_set::apply_step(&mut states, &step);
            for (g, s) in gens.iter_mut().zip(states) {
                (g.state, g.retire_after) = (s.state, s.retire_after);
            }
            stepped = Some(step);
            Ok(true)
        })
        .await?;
        if let Some(step) = stepped {
            tracing::info!(?step, secret = %self.name, "CA rotation advanced in the shared CA Secret");
            self.offer(generations.clone());
        }
        Ok(ca_set::next_step_time(&states(&generations), propagation))
    }
}

/// Where each shared generation stands.
pub fn states(generations: &[SharedGeneration]) -> Vec<GenerationState> {
    generations
        .iter()
        .map(|g| GenerationState {
            generation: g.generation,
            state: g.state.clone(),
            created_at: g.created_at,
            retire_after: g.retire_after,
        })
        .collect()
}

/// Mirrors shared generations into the local store (see [`ca_set::adopt_shared`]).
pub fn adopt(
    store: &super::store::Store,
    generations: &[SharedGeneration],
    custody: &KeyCustody,
) -> Result<bool, CaSetError> {
    let pairs: Vec<(GenerationState, CaMaterial)> =
        states(generations).into_iter().zip(generations.iter().map(|g| g.material.clone())).collect();
    ca_set::adopt_shared(store, &pairs, custody)
}
