//! Raw bytes from a caller through an HTTP/1 server configured as the inbound sidecar's
//! (`max_buf_size`, `max_headers`), then the sidecar's request handling in its order:
//! `x-palisade-*` headers and disallowed upgrades removed, hop-by-hop headers (and those
//! `Connection` names) stripped, a request id kept or minted, the caller's XFCC replaced by the
//! sidecar's, the path normalized and decided by policy. Checks that nothing a caller sends
//! survives that must not: an `x-palisade-*` header, a hop-by-hop header, a second XFCC.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use libfuzzer_sys::fuzz_target;
use palisade::guard::path::{Normalization, normalize};
use palisade::policy::input::{Input, LiveRequest};
use palisade::policy::set::{PolicySet, Workload};
use palisade::proxy::http::{XFCC, ensure_request_id, sanitize_request, strip_scanned};
use tokio::io::AsyncWriteExt;

const XFCC_VALUE: &str = "By=spiffe://cluster.local/ns/shop/sa/orders;URI=spiffe://cluster.local/ns/shop/sa/web";
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-authorization",
    "proxy-authenticate",
    "keep-alive",
    "proxy-connection",
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fn policies() -> &'static (PolicySet, Workload) {
    static SET: OnceLock<(PolicySet, Workload)> = OnceLock::new();
    SET.get_or_init(|| {
        let text = include_str!("../../examples/policies/orders.yaml");
        let docs = palisade::policy::load::parse_documents(std::path::Path::new("orders.yaml"), text).unwrap();
        let workload = Workload {
            id: "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap(),
            labels: [("app".to_string(), "orders".to_string())].into(),
        };
        let set = PolicySet::new(docs.into_iter().map(|(_, p)| Arc::new(p)), workload.clone(), Default::default());
        (set, workload)
    })
}

fn handle(mut req: Request<Incoming>) -> Response<Empty<Bytes>> {
    let allowed = ["websocket".to_string()];
    let (scan, upgrade) = sanitize_request(&mut req, &allowed);
    if !upgrade {
        strip_scanned(req.headers_mut(), scan);
    }
    ensure_request_id(req.headers_mut());
    req.headers_mut().insert(XFCC.clone(), HeaderValue::from_static(XFCC_VALUE));

    let headers = req.headers();
    for name in headers.keys() {
        assert!(!name.as_str().starts_with("x-palisade-"), "{name} crossed the sidecar");
        if !upgrade {
            assert!(!HOP_BY_HOP.contains(&name.as_str()) && name != header::UPGRADE, "hop-by-hop {name} crossed");
        }
    }
    if let Some(up) = headers.get(header::UPGRADE) {
        assert!(
            up.to_str().is_ok_and(|v| v.split(',').all(|p| p.trim().to_ascii_lowercase().starts_with("websocket")))
        );
    }
    assert_eq!(headers.get_all(&XFCC).iter().count(), 1);
    assert_eq!(headers.get(&XFCC).unwrap(), XFCC_VALUE);

    let (set, workload) = policies();
    if let Ok(path) = normalize(req.uri().path(), Normalization::MergeSlashes) {
        let target = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.into_owned(),
        };
        let Ok(uri) = target.parse::<http::Uri>() else { return Response::new(Empty::new()) };
        let source = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let input = Input::live(LiveRequest {
            source: Some(&source),
            source_ip: None,
            source_port: None,
            destination: &workload.id,
            destination_port: 8080,
            method: req.method(),
            uri: &uri,
            headers: req.headers(),
            scheme: "http",
            protocol: "HTTP/1.1",
            auth: None,
        });
        let _ = set.decide(&input);
    }
    Response::new(Empty::new())
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&data).await;
            let _ = client.shutdown().await;
            // Drain what the server answers so it never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        });
        let svc = hyper::service::service_fn(|req| async move { Ok::<_, std::convert::Infallible>(handle(req)) });
        let _ = hyper::server::conn::http1::Builder::new()
            .max_buf_size(16 * 1024)
            .max_headers(100)
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
            .with_upgrades()
            .await;
        let _ = writer.await;
    });
});
