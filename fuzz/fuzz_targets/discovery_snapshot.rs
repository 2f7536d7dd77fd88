//! What a sidecar takes from the control plane's Discovery stream (`agent::discovery`,
//! `proxy::view`): any bytes as a full `Snapshot` applied to the sidecar's view, or as a
//! `SnapshotDelta` applied to the snapshot in force. A snapshot the sidecar cannot use is
//! NACKed (an error), never a panic; a delta it refuses leaves the view as it was.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use palisade::policy::set::Workload;
use palisade::proto::discovery::{Snapshot, SnapshotDelta};
use palisade::proxy::view::{SharedView, ViewWriter};
use prost::Message;

struct Fixture {
    view: std::sync::Arc<SharedView>,
    writer: ViewWriter,
    workload: Workload,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let pem = palisade::identity::CaMaterial::generate("cluster.local", 1).unwrap().root_cert_pem;
        let roots = palisade::tls::BundleState::from_pem(&pem).unwrap();
        let (view, writer) = ViewWriter::new(roots);
        let workload = Workload {
            id: "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap(),
            labels: [("app".to_string(), "orders".to_string())].into(),
        };
        Fixture { view, writer, workload }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let f = fixture();
    if mode % 2 == 0 {
        let Ok(snapshot) = Snapshot::decode(rest) else { return };
        let _ = f.writer.apply_snapshot("fuzz", &snapshot, &f.workload);
        return;
    }
    // A delta over a base snapshot: the input holds both, length-delimited.
    let mut buf = rest;
    let Ok(base) = Snapshot::decode_length_delimited(&mut buf) else { return };
    let Ok(delta) = SnapshotDelta::decode(buf) else { return };
    match palisade::agent::discovery::apply_delta("base", &base, &delta) {
        Ok(next) => {
            // What a delta leads to has no duplicate endpoint (address and identity).
            let mut keys: Vec<_> = next.endpoints.iter().map(|e| (&e.address, &e.spiffe_id)).collect();
            let n = keys.len();
            keys.sort();
            keys.dedup();
            assert_eq!(keys.len(), n, "a delta produced a duplicate endpoint");
            let _ = f.writer.apply_snapshot("next", &next, &f.workload);
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
    let _ = f.view.load_full();
});
