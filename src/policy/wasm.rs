//! The OPA WebAssembly engine: a bundle built by `opa build -t wasm`, compiled once by wasmtime
//! when the policy loads, evaluated per request by `opa-wasm`.
//!
//! A wasmtime `Store` is single-threaded, so each policy keeps a small pool of ready instances
//! (store + instantiated policy with its `data.json` loaded). A request pops one, evaluates and
//! pushes it back; the lock is held only for the pop and the push, never during evaluation, and
//! nothing is compiled on the request path. When the pool is empty (more concurrent requests than
//! instances so far) a new instance is made from the compiled module.
//!
//! `opa-wasm`'s API is async, but nothing in it waits: no fuel or epoch yielding is configured
//! and its only lock is uncontended. Its futures are therefore polled once with a no-op waker on
//! the calling thread; a future that did not complete would be a bug, and is a denial rather
//! than a blocked tokio worker.
//!
//! Results are read exactly as for Rego ([`super::rego`]): a boolean or an object
//! `{allowed, http_status, headers, body}`; anything else, an undefined result or an error is
//! "not allowed" with a reason.

use std::io::Read;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use base64::Engine as _;
use parking_lot::Mutex;
use serde_json::Value;

use super::input::Input;
use super::rego::{self, RegoVerdict};

/// The largest `policy.wasm` (and `data.json`) accepted from a bundle, uncompressed.
const MAX_BUNDLE_FILE: u64 = 64 << 20;

/// Instances kept per policy beyond which a returned one is dropped: enough for every worker
/// thread. (Read once: `available_parallelism` reads cgroup files on Linux.)
fn pool_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4) * 2)
}

/// The process-wide wasmtime engine: compiled modules must share the engine of the stores that
/// run them, and one engine keeps one code cache and one set of compiler threads.
///
/// Epoch interruption bounds every evaluation: a thread advances the engine's epoch every
/// [`EPOCH_TICK`], and each evaluation may run for [`EPOCH_BUDGET`] ticks before it traps (and
/// the request is denied). Cheaper than fuel: the generated code checks one counter at loop
/// heads and calls.
fn shared_engine() -> &'static wasmtime::Engine {
    static ENGINE: OnceLock<wasmtime::Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine = wasmtime::Engine::new(&config).expect("a default config with epochs is valid");
        let clock = engine.weak();
        let spawned = std::thread::Builder::new().name("palisade-wasm-epoch".into()).spawn(move || {
            // A clock, not synchronisation: it only measures time for the deadlines.
            while let Some(engine) = clock.upgrade() {
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
                match clock.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no epoch thread: Wasm policies run without a time limit");
        }
        engine
    })
}

/// How often the epoch advances.
const EPOCH_TICK: std::time::Duration = std::time::Duration::from_millis(10);
/// Ticks one evaluation (or instantiation) may take: 250 ms, as for Rego
/// ([`super::rego::EVALUATION_BUDGET`]).
const EPOCH_BUDGET: u64 = 25;

/// One ready instance: a store and the OPA policy instantiated in it.
struct Instance {
    store: wasmtime::Store<()>,
    policy: opa_wasm::Policy<opa_wasm::DefaultContext>,
}

struct Compiled {
    module: wasmtime::Module,
    data: Value,
    /// The entrypoint as `opa-wasm` names it: `shop/orders/allow`.
    entrypoint: String,
    /// As Rego spells it, for reasons: `data.shop.orders.allow`.
    rule: String,
    pool: Mutex<Vec<Instance>>,
}

/// An OPA Wasm bundle compiled for one entrypoint. Cheap to clone (the module and the instance
/// pool are shared).
#[derive(Clone)]
pub struct WasmEngine {
    inner: Arc<Compiled>,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("rule", &self.inner.rule)
            .field("pooled", &self.inner.pool.lock().len())
            .finish_non_exhaustive()
    }
}

impl WasmEngine {
    /// Decodes `bundle_base64` (a gzip tarball holding `/policy.wasm` and optionally
    /// `/data.json`), compiles the module and instantiates it once to check that it is an OPA
    /// policy exporting `entrypoint`. The error says what is wrong.
    pub fn compile(bundle_base64: &str, entrypoint: &str) -> Result<Self, String> {
        let rule = rego::entrypoint_rule(entrypoint)?;
        let wasm_entrypoint = rule.trim_start_matches("data.").replace('.', "/");
        let compact: String = bundle_base64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let tarball = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| format!("bundle is not valid base64: {e}"))?;
        let (wasm, data) = read_bundle(&tarball)?;
        let module = wasmtime::Module::new(shared_engine(), &wasm)
            .map_err(|e| format!("policy.wasm is not a valid WebAssembly module: {e:#}"))?;
        let compiled = Compiled {
            module,
            data: data.unwrap_or_else(|| Value::Object(Default::default())),
            entrypoint: wasm_entrypoint,
            rule,
            pool: Mutex::new(Vec::new()),
        };
        let first = compiled.instantiate()?;
        let known = first.policy.entrypoints();
        if !known.contains(compiled.entrypoint.as_str()) {
            let mut known: Vec<&str> = known.into_iter().collect();
            known.sort_unstable();
            return Err(format!(
                "entrypoint {:?} is not in the bundle (it has: {}); build it with `opa build -t wasm -e {}`",
                compiled.entrypoint,
                if known.is_empty() { "none".to_string() } else { known.join(", ") },
                compiled.entrypoint
            ));
        }
        compiled.pool.lock().push(first);
        Ok(WasmEngine { inner: Arc::new(compiled) })
    }

    /// The rule evaluated, e.g. `data.shop.orders.allow`.
    pub fn rule(&self) -> &str {
        &self.inner.rule
    }

    /// Evaluates the entrypoint for one request.
    pub fn evaluate(&self, input: &Input) -> RegoVerdict {
        let c = &self.inner;
        let popped = c.pool.lock().pop();
        let mut instance = match popped {
            Some(i) => i,
            None => match c.instantiate() {
                Ok(i) => i,
                Err(e) => return deny(format!("{}: {e}", c.rule)),
            },
        };
        let Instance { store, policy } = &mut instance;
        store.set_epoch_deadline(EPOCH_BUDGET);
        let result: Result<Value, String> = poll_ready(policy.evaluate(&mut *store, &c.entrypoint, input.document()))
            .and_then(|r| r.map_err(|e| out_of_time(e).unwrap_or_else(|e| format!("{e:#}"))));
        match result {
            Ok(v) => {
                let limit = pool_limit();
                let mut pool = c.pool.lock();
                if pool.len() < limit {
                    pool.push(instance);
                }
                drop(pool);
                interpret_result_set(&c.rule, v)
            }
            // The instance may be half-way through something: drop it.
            Err(e) => deny(format!("{} failed: {e}", c.rule)),
        }
    }
}

/// The reason for an evaluation stopped at its deadline, or the error unchanged.
fn out_of_time(e: anyhow::Error) -> Result<String, anyhow::Error> {
    match e.chain().find_map(|c| c.downcast_ref::<wasmtime::Trap>()) {
        Some(wasmtime::Trap::Interrupt) => {
            Ok(format!("exceeded its evaluation budget ({} ms)", EPOCH_TICK.as_millis() as u64 * EPOCH_BUDGET))
        }
        _ => Err(e),
    }
}

impl Compiled {
    fn instantiate(&self) -> Result<Instance, String> {
        let mut store = wasmtime::Store::new(shared_engine(), ());
        store.set_epoch_deadline(EPOCH_BUDGET);
        let policy = poll_ready(async {
            let runtime = opa_wasm::Runtime::new(&mut store, &self.module).await?;
            runtime.with_data(&mut store, &self.data).await
        })
        .and_then(|r| r.map_err(|e| format!("policy.wasm is not an OPA policy module: {e:#}")))?;
        Ok(Instance { store, policy })
    }
}

/// Reads `policy.wasm` and `data.json` out of a gzip tarball.
pub(crate) fn read_bundle(tarball: &[u8]) -> Result<(Vec<u8>, Option<Value>), String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tarball));
    let entries = archive.entries().map_err(|e| format!("bundle is not a gzip tarball: {e}"))?;
    let (mut wasm, mut data) = (None, None);
    for entry in entries {
        let entry = entry.map_err(|e| format!("bundle is not a gzip tarball: {e}"))?;
        let name = entry.path().map_err(|e| format!("bundle entry has a bad name: {e}"))?;
        let name = name.to_string_lossy();
        let name = name.trim_start_matches("./").trim_start_matches('/').to_string();
        let slot = match name.as_str() {
            "policy.wasm" => &mut wasm,
            "data.json" => &mut data,
            _ => continue,
        };
        let mut bytes = Vec::new();
        entry
            .take(MAX_BUNDLE_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("bundle is not a gzip tarball: reading {name}: {e}"))?;
        if bytes.len() as u64 > MAX_BUNDLE_FILE {
            return Err(format!("bundle: {name} is larger than {} MiB", MAX_BUNDLE_FILE >> 20));
        }
        *slot = Some(bytes);
    }
    let wasm = wasm.ok_or("bundle has no /policy.wasm (build it with `opa build -t wasm`)")?;
    let data = match data {
        Some(d) => Some(serde_json::from_slice(&d).map_err(|e| format!("bundle: data.json is not JSON: {e}"))?),
        None => None,
    };
    Ok((wasm, data))
}

/// Polls a future that never waits to completion on this thread.
fn poll_ready<F: Future>(f: F) -> Result<F::Output, String> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Ok(v),
        Poll::Pending => Err("the Wasm policy tried to wait, which this engine does not support".to_string()),
    }
}

/// OPA's result set: `[{"result": X}]`, or `[]` when the entrypoint is undefined.
fn interpret_result_set(rule: &str, set: Value) -> RegoVerdict {
    let value = match set {
        Value::Array(mut items) if items.len() <= 1 => match items.pop() {
            None => regorus::Value::Undefined,
            Some(Value::Object(mut o)) => match o.remove("result") {
                Some(v) => regorus::Value::from(v),
                None => regorus::Value::Undefined,
            },
            Some(other) => return deny(format!("{rule}: unexpected result set entry {other}")),
        },
        other => return deny(format!("{rule}: unexpected result set {other}")),
    };
    rego::interpret(rule, &value)
}

fn deny(reason: String) -> RegoVerdict {
    RegoVerdict { allowed: false, reason, ..RegoVerdict::default() }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::input::tests::attrs;

    /// A committed fixture bundle, as base64 (what a policy's `wasm.bundle` holds).
    pub(crate) fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/opa/{name}.tar.gz", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn input(source: Option<&str>, method: &str, path: &str) -> Input<'static> {
        Input::new(attrs(source, method, path))
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn a_runaway_policy_is_stopped_at_its_budget_and_denies() {
        let e = WasmEngine::compile(&fixture("runaway"), "runaway/allow").unwrap();
        let started = std::time::Instant::now();
        let v = e.evaluate(&input(Some(WEB), "GET", "/"));
        let took = started.elapsed();
        assert!(!v.allowed);
        assert!(v.reason.contains("exceeded its evaluation budget"), "{}", v.reason);
        // Unbounded, this policy runs for seconds; the budget is 250 ms (plus one epoch tick).
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
        // The engine stays usable for the next request.
        assert!(e.evaluate(&input(Some(WEB), "GET", "/")).reason.contains("budget"));
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<WasmEngine>();
    }

    #[test]
    fn allows_and_denies_as_written() {
        let e = WasmEngine::compile(&fixture("method_path_allowlist"), "envoy/authz/allow").unwrap();
        let v = e.evaluate(&input(Some(WEB), "GET", "/orders/7"));
        assert!(v.allowed, "{}", v.reason);
        let v = e.evaluate(&input(Some(WEB), "DELETE", "/orders/7"));
        assert!(!v.allowed);
        assert!(v.reason.contains("data.envoy.authz.allow is false"), "{}", v.reason);
        assert!(!e.evaluate(&input(None, "GET", "/orders/7")).allowed);
        // Many evaluations reuse the pooled instance.
        for _ in 0..100 {
            assert!(e.evaluate(&input(Some(WEB), "GET", "/orders/7")).allowed);
        }
        assert_eq!(e.inner.pool.lock().len(), 1);
    }

    #[test]
    fn concurrent_workers_get_their_own_instances() {
        let e = WasmEngine::compile(&fixture("method_path_allowlist"), "envoy/authz/allow").unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let e = &e;
                s.spawn(move || {
                    for i in 0..50 {
                        let allow = (t + i) % 2 == 0;
                        let v = e.evaluate(&input(Some(WEB), if allow { "GET" } else { "PUT" }, "/orders/7"));
                        assert_eq!(v.allowed, allow, "{}", v.reason);
                    }
                });
            }
        });
        let pooled = e.inner.pool.lock().len();
        assert!((1..=pool_limit()).contains(&pooled), "{pooled} instances pooled");
    }

    #[test]
    fn object_results_carry_status_headers_body() {
        let e = WasmEngine::compile(&fixture("object_result"), "envoy/authz/result").unwrap();
        let v = e.evaluate(&input(Some(WEB), "DELETE", "/orders/7"));
        assert!(!v.allowed);
        assert_eq!(v.http_status, Some(403));
        assert_eq!(v.headers.get("x-palisade-reason").map(String::as_str), Some("method-not-allowed"));
        assert!(v.body.as_deref().is_some_and(|b| b.contains("DELETE")), "{v:?}");
        assert!(e.evaluate(&input(Some(WEB), "GET", "/orders/7")).allowed);
    }

    #[test]
    fn garbage_is_refused_clearly() {
        let err = WasmEngine::compile("not base64!", "a/allow").unwrap_err();
        assert!(err.contains("not valid base64"), "{err}");
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let err = WasmEngine::compile(&b64(b"hello world"), "a/allow").unwrap_err();
        assert!(err.contains("not a gzip tarball"), "{err}");
        let err = WasmEngine::compile(&b64(&tarball(&[("other.txt", b"x")])), "a/allow").unwrap_err();
        assert!(err.contains("no /policy.wasm"), "{err}");
        let err = WasmEngine::compile(&b64(&tarball(&[("/policy.wasm", b"\0asm junk")])), "a/allow").unwrap_err();
        assert!(err.contains("not a valid WebAssembly module"), "{err}");
        let err = WasmEngine::compile(&fixture("method_path_allowlist"), "envoy/authz/nope").unwrap_err();
        assert!(
            err.contains("\"envoy/authz/nope\" is not in the bundle") && err.contains("envoy/authz/allow"),
            "{err}"
        );
        assert!(WasmEngine::compile(&fixture("method_path_allowlist"), "bad path!").is_err());
    }

    fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, bytes) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name.trim_start_matches('/'), *bytes).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn result_sets_fail_closed() {
        assert!(!interpret_result_set("r", serde_json::json!([])).allowed);
        assert!(interpret_result_set("r", serde_json::json!([{"result": true}])).allowed);
        assert!(!interpret_result_set("r", serde_json::json!([{"result": 1}])).allowed);
        assert!(!interpret_result_set("r", serde_json::json!([{"result": true}, {"result": true}])).allowed);
        assert!(!interpret_result_set("r", serde_json::json!({"result": true})).allowed);
    }
}
