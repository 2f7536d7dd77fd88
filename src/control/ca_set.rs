//! The CA generations the control plane holds: which one signs and which roots are trusted.
//!
//! Rotation is overlapping (see DESIGN.md): a `next` generation is trusted before it signs, and
//! a `retiring` one stays trusted until every certificate it signed has expired.

use std::path::Path;
use std::time::Duration;

use crate::clock::now_unix;
use crate::identity::ca::{CaError, KeyRole};
use crate::identity::seal::SealError;
use crate::identity::{CaMaterial, CertificateAuthority, KeyCustody};

use super::store::{CaGeneration, CaStateChange, Store, StoreError};

/// A CA failure at the control plane.
#[derive(Debug, thiserror::Error)]
pub enum CaSetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] crate::identity::ca::CaError),
    #[error("the state store holds no active CA generation")]
    NoActive,
    #[error("a rotation is already in progress (generation {0} is {1})")]
    RotationInProgress(u32, String),
    #[error("writing {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "the CA key-encryption key does not open generation {generation} (its {role} key); is {origin} the one this \
         store was sealed with? Nothing was changed"
    )]
    WrongKek { generation: u32, role: KeyRole, origin: String },
    #[error(
        "the stored CA keys are sealed (generation {0}) and no key-encryption key was given: pass --ca-kek-file, \
         PALISADE_CA_KEK or --ca-kek-secret"
    )]
    SealedWithoutKek(u32),
    #[error("CA generation {generation}: {source}")]
    Generation { generation: u32, source: CaError },
}

/// How the stored CA keys are kept at rest: what `palisade status` and a posture audit report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeysAtRest {
    /// Some stored private key is in clear (no KEK was ever given for it).
    pub clear: bool,
    /// Some stored private key is sealed under a KEK.
    pub sealed: bool,
    /// The signing (active intermediate) key lives in a PKCS#11 token.
    pub signer_in_token: bool,
}

/// The associated-data scope of a key sealed in the store: its row.
fn store_scope(generation: u32) -> String {
    format!("store generation {generation}")
}

/// A stored generation's material with its keys opened, or why it cannot be.
fn open_generation(g: &CaGeneration, custody: &KeyCustody) -> Result<CaMaterial, CaSetError> {
    let generation = g.generation;
    g.material.opened(custody.kek.as_deref(), &store_scope(generation)).map_err(|e| match e {
        CaError::NoKek(_) => CaSetError::SealedWithoutKek(generation),
        CaError::Seal { role, source: SealError::Refused } => CaSetError::WrongKek {
            generation,
            role,
            origin: custody.kek.as_ref().map_or_else(String::new, |k| k.origin().to_string()),
        },
        source => CaSetError::Generation { generation, source },
    })
}

/// Every stored generation with its keys opened (PEM, or token references). For tests and
/// tools that must see the keys themselves; the control plane opens only what it signs with.
pub fn opened_generations(store: &Store, custody: &KeyCustody) -> Result<Vec<CaGeneration>, CaSetError> {
    store
        .ca_generations()?
        .into_iter()
        .map(|g| Ok(CaGeneration { material: open_generation(&g, custody)?, ..g }))
        .collect()
}

/// Writes a new generation, its keys sealed when there is a KEK.
fn insert_generation(
    store: &Store,
    generation: u32,
    material: &CaMaterial,
    state: &str,
    custody: &KeyCustody,
) -> Result<(), CaSetError> {
    match &custody.kek {
        Some(kek) => store.insert_ca(generation, &material.sealed(kek, &store_scope(generation)), state)?,
        None => store.insert_ca(generation, material, state)?,
    }
    Ok(())
}

/// Checks that every stored generation opens under `custody` (a wrong or missing KEK is an
/// error before anything is written), then, with a KEK, seals in place every key still in
/// clear, in one transaction. Returns the generations as stored afterwards.
pub fn protect_store(store: &Store, custody: &KeyCustody) -> Result<Vec<CaGeneration>, CaSetError> {
    let generations = store.ca_generations()?;
    for g in &generations {
        open_generation(g, custody)?;
    }
    let Some(kek) = &custody.kek else { return Ok(generations) };
    let rows: Vec<(u32, String, String)> = generations
        .iter()
        .filter(|g| g.material.has_clear_key())
        .map(|g| {
            let sealed = g.material.sealed(kek, &store_scope(g.generation));
            (g.generation, sealed.root_key_pem, sealed.intermediate_key_pem)
        })
        .collect();
    if rows.is_empty() {
        return Ok(generations);
    }
    store.replace_ca_keys(&rows)?;
    let sealed: Vec<u32> = rows.iter().map(|r| r.0).collect();
    tracing::warn!(generations = ?sealed, kek = kek.origin(),
        "CA keys found in clear in the store were sealed in place under the key-encryption key");
    Ok(store.ca_generations()?)
}

/// One consistent view of the CA: the signer and the trust bundle.
pub struct CaSet {
    signer: CertificateAuthority,
    active_generation: u32,
    bundle_pem: String,
    generations: Vec<CaGeneration>,
}

impl CaSet {
    /// Loads the CA from the store, creating generation 1 on first start; with a KEK, keys
    /// found in clear are sealed first (see [`protect_store`]).
    pub fn load_or_init(store: &Store, trust_domain: &str, custody: &KeyCustody) -> Result<Self, CaSetError> {
        let mut generations = protect_store(store, custody)?;
        if generations.is_empty() {
            let material = CaMaterial::generate_in(trust_domain, 1, custody)?;
            match insert_generation(store, 1, &material, "active", custody) {
                Ok(()) => tracing::info!("created a new root and intermediate CA (generation 1)"),
                // Another replica sharing the store created it first (both started on an
                // empty database): use theirs.
                Err(e) if !store.ca_generations()?.is_empty() => {
                    tracing::info!(error = %e, "another replica created the CA first; using it")
                }
                Err(e) => return Err(e),
            }
            generations = protect_store(store, custody)?;
        }
        Self::from_generations(generations, custody)
    }

    fn from_generations(generations: Vec<CaGeneration>, custody: &KeyCustody) -> Result<Self, CaSetError> {
        let active = generations.iter().find(|g| g.state == "active").ok_or(CaSetError::NoActive)?;
        let signer = CertificateAuthority::load_with(open_generation(active, custody)?, custody)
            .map_err(|source| CaSetError::Generation { generation: active.generation, source })?;
        let bundle_pem =
            generations.iter().filter(|g| g.state != "retired").map(|g| g.material.root_cert_pem.as_str()).collect();
        Ok(CaSet { signer, active_generation: active.generation, bundle_pem, generations })
    }

    /// The CA that signs workload certificates now.
    pub fn signer(&self) -> &CertificateAuthority {
        &self.signer
    }

    /// Generation number of the signer.
    pub fn active_generation(&self) -> u32 {
        self.active_generation
    }

    /// How the stored keys (of every generation, retired ones included: their rows remain) are
    /// kept at rest.
    pub fn keys_at_rest(&self) -> KeysAtRest {
        KeysAtRest {
            clear: self.generations.iter().any(|g| g.material.has_clear_key()),
            sealed: self.generations.iter().any(|g| g.material.has_sealed_key()),
            signer_in_token: self.signer.material().signer_in_token(),
        }
    }

    /// PEM of every root that must be trusted now.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// A fingerprint of the stored state, to notice changes made by the CLI.
    pub fn fingerprint(&self) -> String {
        self.generations.iter().map(|g| format!("{}:{}:{:?};", g.generation, g.state, g.retire_after)).collect()
    }

    /// Validity of each trusted root as `(generation, not_before, not_after)`, Unix seconds: for
    /// the root-expiry metric and the posture audit.
    pub fn root_validity(&self) -> Vec<(u32, i64, i64)> {
        let validity = crate::tls::pem_validity;
        self.generations
            .iter()
            .filter(|g| g.state != "retired")
            .filter_map(|g| validity(&g.material.root_cert_pem).map(|(nb, na)| (g.generation, nb, na)))
            .collect()
    }

    /// When the rotation in progress takes its next step (Unix seconds), if one is in progress:
    /// the time [`advance_rotation`] will act, so the control plane wakes for it instead of
    /// polling.
    pub fn next_step_at(&self, propagation: Duration) -> Option<i64> {
        self.generations
            .iter()
            .filter_map(|g| match g.state.as_str() {
                "next" => Some(g.created_at + propagation.as_secs() as i64),
                "retiring" => g.retire_after,
                _ => None,
            })
            .min()
    }

    /// Writes the trust bundle to `DIR/ca/root.pem` for sidecars started by hand.
    pub fn export_bundle(&self, state_dir: &Path) -> Result<(), CaSetError> {
        let dir = state_dir.join("ca");
        let io = |source| CaSetError::Io { path: dir.display().to_string(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let tmp = dir.join(".root.pem.tmp");
        std::fs::write(&tmp, &self.bundle_pem).map_err(io)?;
        std::fs::rename(&tmp, dir.join("root.pem")).map_err(io)?;
        Ok(())
    }
}

/// Starts a rotation: a new generation joins the bundle as `next`. The running control plane
/// advances it (see [`advance_rotation`]).
/// A wrong or missing KEK is refused before anything is written, and a new generation is
/// sealed (or made in the token) as the custody says.
pub fn start_rotation(store: &Store, trust_domain: &str, custody: &KeyCustody) -> Result<u32, CaSetError> {
    let generations = protect_store(store, custody)?;
    if let Some(g) = generations.iter().find(|g| g.state == "next" || g.state == "retiring") {
        return Err(CaSetError::RotationInProgress(g.generation, g.state.clone()));
    }
    let next = generations.iter().map(|g| g.generation).max().unwrap_or(0) + 1;
    let material = CaMaterial::generate_in(trust_domain, next, custody)?;
    insert_generation(store, next, &material, "next", custody)?;
    Ok(next)
}

/// Where one generation stands in a rotation: what [`rotation_step`] reads, whether the
/// generations live in the local store or in the Kubernetes CA Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationState {
    pub generation: u32,
    pub state: String,
    pub created_at: i64,
    pub retire_after: Option<i64>,
}

/// The next step of a rotation, decided by [`rotation_step`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotationStep {
    /// A `retiring` generation's last certificate has expired: its root leaves the bundle.
    Retire(u32),
    /// `next` signs from now on; the old active generation (if any) retires after the time given.
    Activate { next: u32, retiring: Option<(u32, i64)> },
}

/// The step a rotation takes at `now`, if its time has come:
/// `next` becomes `active` once `propagation` has passed since it was created (every sidecar has
/// renewed at least once and so holds the new root); the old `active` becomes `retiring` until
/// `max_lifetime` has passed (every certificate it signed has expired), then `retired`.
pub fn rotation_step(
    generations: &[GenerationState],
    now: i64,
    propagation: Duration,
    max_lifetime: Duration,
) -> Option<RotationStep> {
    if let Some(g) = generations.iter().find(|g| g.state == "retiring" && g.retire_after.is_some_and(|t| now >= t)) {
        return Some(RotationStep::Retire(g.generation));
    }
    let next = generations.iter().find(|g| g.state == "next")?;
    if now < next.created_at + propagation.as_secs() as i64 {
        return None;
    }
    let retiring = generations
        .iter()
        .find(|g| g.state == "active")
        .map(|g| (g.generation, now + max_lifetime.as_secs() as i64 + 60));
    Some(RotationStep::Activate { next: next.generation, retiring })
}

/// When the rotation in progress takes its next step (Unix seconds), if one is in progress.
pub fn next_step_time(generations: &[GenerationState], propagation: Duration) -> Option<i64> {
    generations
        .iter()
        .filter_map(|g| match g.state.as_str() {
            "next" => Some(g.created_at + propagation.as_secs() as i64),
            "retiring" => g.retire_after,
            _ => None,
        })
        .min()
}

/// Applies `step` to `generations` in memory.
pub fn apply_step(generations: &mut [GenerationState], step: &RotationStep) {
    let mut set = |generation: u32, state: &str, retire_after: Option<i64>| {
        if let Some(g) = generations.iter_mut().find(|g| g.generation == generation) {
            g.state = state.to_string();
            g.retire_after = retire_after;
        }
    };
    match step {
        RotationStep::Retire(g) => set(*g, "retired", None),
        RotationStep::Activate { next, retiring } => {
            if let Some((old, after)) = retiring {
                set(*old, "retiring", Some(*after));
            }
            set(*next, "active", None);
        }
    }
}

/// Makes the local store hold exactly the generations shared through the Kubernetes CA Secret
/// (each given as its state and its material, keys opened): a generation already stored (the
/// same root and intermediate) takes the shared state, a new one is added, and one the Secret
/// no longer lists is retired. The Secret is the truth; this replica's store only mirrors it,
/// so a restart adopts the current rotation state and never undoes it. Returns whether
/// anything changed.
pub fn adopt_shared(
    store: &Store,
    shared: &[(GenerationState, CaMaterial)],
    custody: &KeyCustody,
) -> Result<bool, CaSetError> {
    let local = protect_store(store, custody)?;
    let same = |a: &CaMaterial, b: &CaMaterial| {
        a.root_cert_pem == b.root_cert_pem && a.intermediate_cert_pem == b.intermediate_cert_pem
    };
    let mut changed = false;
    let mut number = local.iter().map(|g| g.generation).max().unwrap_or(0);
    // Retirements first, then the rest in the Secret's order (oldest first), so the store is
    // never left with two active generations.
    for g in local.iter().filter(|g| g.state != "retired" && !shared.iter().any(|(_, m)| same(&g.material, m))) {
        store.set_ca_state(g.generation, "retired", None)?;
        changed = true;
    }
    for (state, material) in shared {
        match local.iter().find(|g| same(&g.material, material)) {
            Some(g) if g.state == state.state && g.retire_after == state.retire_after => {}
            Some(g) => {
                store.set_ca_state(g.generation, &state.state, state.retire_after)?;
                changed = true;
            }
            None => {
                number += 1;
                insert_generation(store, number, material, &state.state, custody)?;
                if state.retire_after.is_some() {
                    store.set_ca_state(number, &state.state, state.retire_after)?;
                }
                changed = true;
            }
        }
    }
    if changed {
        tracing::info!(generations = shared.len(), "adopted the CA generations of the shared CA Secret");
    }
    Ok(changed)
}

/// Moves a rotation in the local store on by one step when its time has come (see
/// [`rotation_step`]). Returns whether anything changed.
pub fn advance_rotation(store: &Store, propagation: Duration, max_lifetime: Duration) -> Result<bool, CaSetError> {
    let before: Vec<GenerationState> = store
        .ca_generations()?
        .into_iter()
        .map(|g| GenerationState {
            generation: g.generation,
            state: g.state,
            created_at: g.created_at,
            retire_after: g.retire_after,
        })
        .collect();
    let Some(step) = rotation_step(&before, now_unix(), propagation, max_lifetime) else {
        return Ok(false);
    };
    let mut after = before.clone();
    apply_step(&mut after, &step);
    // One transaction, taken only if no one moved first.
    let changes: Vec<CaStateChange> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.state != a.state || b.retire_after != a.retire_after)
        .map(|(b, a)| CaStateChange {
            generation: a.generation,
            from: b.state.clone(),
            to: a.state.clone(),
            retire_after: a.retire_after,
        })
        .collect();
    if !store.change_ca_states(&changes)? {
        // Another replica (or the CLI) took a step first; the watch brings what it did.
        tracing::debug!(?step, "the rotation moved on elsewhere first");
        return Ok(false);
    }
    match step {
        RotationStep::Retire(g) => {
            tracing::info!(generation = g, "old CA generation retired: its root leaves the trust bundle")
        }
        RotationStep::Activate { next, .. } => {
            tracing::info!(generation = next, "signing switched to the new CA generation")
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(generation: u32, state: &str, created_at: i64, retire_after: Option<i64>) -> GenerationState {
        GenerationState { generation, state: state.into(), created_at, retire_after }
    }

    #[test]
    fn a_rotation_activates_after_propagation_then_retires_after_the_longest_lifetime() {
        let (propagation, lifetime) = (Duration::from_secs(5), Duration::from_secs(3));
        let mut gens = vec![g(1, "active", 0, None), g(2, "next", 100, None)];
        assert_eq!(next_step_time(&gens, propagation), Some(105));
        assert_eq!(rotation_step(&gens, 104, propagation, lifetime), None, "the new root is still spreading");
        let step = rotation_step(&gens, 105, propagation, lifetime).unwrap();
        assert_eq!(step, RotationStep::Activate { next: 2, retiring: Some((1, 105 + 3 + 60)) });
        apply_step(&mut gens, &step);
        assert_eq!(gens, [g(1, "retiring", 0, Some(168)), g(2, "active", 100, None)]);
        assert_eq!(next_step_time(&gens, propagation), Some(168));
        assert_eq!(rotation_step(&gens, 167, propagation, lifetime), None);
        let step = rotation_step(&gens, 168, propagation, lifetime).unwrap();
        assert_eq!(step, RotationStep::Retire(1));
        apply_step(&mut gens, &step);
        assert_eq!(gens[0].state, "retired");
        assert_eq!(next_step_time(&gens, propagation), None);
        assert_eq!(rotation_step(&gens, i64::MAX, propagation, lifetime), None, "nothing in progress");
    }
}
