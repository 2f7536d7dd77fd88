//! Issue 16, rate limits end to end: `RateLimitPolicy` resources from a control plane's
//! directory, enforced by a real server sidecar on requests from real caller sidecars.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};

/// Per caller: 20/s after a burst of 5 on `/limited/*`. Per caller IP: 5 an hour on
/// `/by-ip/*`. A dry run of 1 an hour on `/dry/*`.
const LIMITS: &str = r#"apiVersion: palisade.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: api-limits, namespace: test}
spec:
  selector: {matchLabels: {app: api}}
  limits:
  - {requestsPerUnit: 20, unit: SECOND, burst: 5, perSource: true, paths: ["/limited/*"]}
  - {requestsPerUnit: 5, unit: HOUR, key: {remoteAddress: {}}, paths: ["/by-ip/*"]}
  - {requestsPerUnit: 1, unit: HOUR, dryRun: true, paths: ["/dry/*"]}
"#;

/// A new limit on `/live/*`, added while the sidecars run.
const LIVE: &str = r#"---
apiVersion: palisade.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: live, namespace: test}
spec:
  selector: {matchLabels: {app: api}}
  limits:
  - {requestsPerUnit: 2, unit: HOUR, paths: ["/live/*"]}
"#;

struct Mesh {
    _dir: PathBuf,
    _cp: ControlPlane,
    resources: PathBuf,
    app: EchoApp,
    api: Sidecar,
    /// Base URLs of the two callers' routes to the api.
    web: String,
    batch: String,
    _callers: (Sidecar, Sidecar),
}

async fn mesh(tag: &str) -> Mesh {
    let dir = tempdir(tag);
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    write_atomically(&resources.join("limits.yaml"), LIMITS);
    let res = resources.display().to_string();
    let cp = ControlPlane::start(&dir, &["--resources", &res]).await;
    let app = EchoApp::start().await;
    // Ready means its first snapshot, with the limits, is in force.
    let api = Sidecar::spawn(&cp, "api", Some(app.addr), &[], &["--label", "app=api"]);
    api.wait_ready().await;
    let (web_route, batch_route) = (free_addr(), free_addr());
    let target = api.inbound.unwrap();
    let web = Sidecar::start(&cp, "web", None, &[format!("{web_route}={target}@{}", id("api"))]).await;
    let batch = Sidecar::start(&cp, "batch", None, &[format!("{batch_route}={target}@{}", id("api"))]).await;
    Mesh {
        _dir: dir,
        _cp: cp,
        resources,
        app,
        api,
        web: format!("http://{web_route}"),
        batch: format!("http://{batch_route}"),
        _callers: (web, batch),
    }
}

fn header(headers: &http::HeaderMap, name: &str) -> String {
    headers.get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

/// `palisade_rate_limited_total` summed over the series that carry every one of `labels`.
fn rate_limited(metrics: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("palisade_rate_limited_total{") && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// How many of `n` GETs of `url`, one after another, were answered 200 and 429.
async fn burst(url: &str, n: usize, headers: &[(&str, &str)]) -> (usize, usize) {
    let client = http_client();
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..n {
        match get(&client, url, headers).await.unwrap().0 {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("{url}: unexpected {other}"),
        }
    }
    (ok, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_caller_limit_holds_under_steady_load_and_spares_another_caller() {
    const RATE: f64 = 20.0;
    const BURST: f64 = 5.0;
    let m = mesh("rate-steady").await;
    let hits_before = m.app.hits.load(Ordering::SeqCst);

    // Four clients of web offer up to 800 requests a second for 10 s; batch calls the same
    // path 10 times a second, under its own limit, all the while.
    let (ok, limited, batch_ok) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let refusal = Arc::new(parking_lot::Mutex::new(None));
    let started = Instant::now();
    let until = started + Duration::from_secs(10);
    let mut load = Vec::new();
    for _ in 0..4 {
        let (ok, limited, refusal, url) =
            (ok.clone(), limited.clone(), refusal.clone(), format!("{}/limited/x", m.web));
        load.push(tokio::spawn(async move {
            let client = http_client();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < until {
                tick.tick().await; // the offered load's pace, not synchronisation
                let (status, headers, body) = get(&client, &url, &[]).await.unwrap();
                match status {
                    200 => ok.fetch_add(1, Ordering::SeqCst),
                    429 => {
                        refusal.lock().get_or_insert((headers, body));
                        limited.fetch_add(1, Ordering::SeqCst)
                    }
                    other => panic!("unexpected {other}: {body}"),
                };
            }
        }));
    }
    let (batch_url, batch_count) = (format!("{}/limited/x", m.batch), batch_ok.clone());
    load.push(tokio::spawn(async move {
        let client = http_client();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while Instant::now() < until {
            tick.tick().await;
            let (status, _, body) = get(&client, &batch_url, &[]).await.unwrap();
            assert_eq!(status, 200, "the second caller was limited: {body}");
            batch_count.fetch_add(1, Ordering::SeqCst);
        }
    }));
    for t in load {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (ok, limited, batch_ok) =
        (ok.load(Ordering::SeqCst), limited.load(Ordering::SeqCst), batch_ok.load(Ordering::SeqCst));

    // The load was well above the limit, and what got through is the limit within 10 %.
    assert!(ok + limited > 4 * (RATE * elapsed) as u64, "load too light: {ok} + {limited} in {elapsed:.1} s");
    let rate = (ok as f64 - BURST) / elapsed;
    eprintln!("web: {ok} admitted, {limited} refused in {elapsed:.2} s ({rate:.2}/s); batch: {batch_ok} admitted");
    assert!((rate - RATE).abs() <= RATE * 0.1, "{ok} admitted in {elapsed:.2} s: {rate:.1}/s against {RATE}/s");
    assert!(batch_ok >= 90, "batch ran alongside: {batch_ok}");
    // Nothing refused reached the app.
    assert_eq!(m.app.hits.load(Ordering::SeqCst) - hits_before, ok + batch_ok);

    // The refusal says when to come back, in both header forms.
    let (headers, body) = refusal.lock().take().expect("a refusal was seen");
    let retry: u64 = header(&headers, "retry-after").parse().unwrap();
    assert_eq!(retry, 1, "a token comes within 50 ms, said as the 1 s minimum");
    assert_eq!(header(&headers, "ratelimit-policy"), r#""test/api-limits";q=20;w=1"#);
    assert_eq!(header(&headers, "ratelimit"), r#""test/api-limits";r=0;t=1"#);
    assert_eq!(header(&headers, "x-request-id").len(), 32);
    assert!(body.contains("rate limited by test/api-limits"), "{body}");

    let metrics = m.api.metrics().await;
    let counted = rate_limited(&metrics, &["policy=\"test/api-limits\"", "key=\"source\"", "dry_run=\"false\""]);
    assert_eq!(counted, limited, "{metrics}");
    let refused = metric(&metrics, "palisade_guard_refusals_total", r#"reason="test/api-limits""#);
    assert_eq!(refused as u64, limited, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_cannot_dodge_an_address_limit_and_a_dry_run_only_counts() {
    let m = mesh("rate-xff").await;
    // Every request claims another client address; with no trusted hops the sidecar counts the
    // connection's peer, so the fifth request empties the one bucket.
    let client = http_client();
    let (mut ok, mut limited) = (0, 0);
    for n in 0..30 {
        let xff = format!("198.51.100.{n}, 203.0.113.{n}");
        let (status, _, body) =
            get(&client, &format!("{}/by-ip/x", m.web), &[("x-forwarded-for", &xff)]).await.unwrap();
        match status {
            200 => {
                assert!(body.contains(&xff), "the header reached the server sidecar and the app: {body}");
                ok += 1;
            }
            429 => limited += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((ok, limited), (5, 25));
    // Another caller sidecar on the same address shares it.
    assert_eq!(burst(&format!("{}/by-ip/x", m.batch), 3, &[]).await, (0, 3));

    // A gRPC caller is told RESOURCE_EXHAUSTED.
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let req = http::Request::post(format!("{}/by-ip/pkg.Service/Method", m.web))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let _ = resp.into_body().collect().await;
    assert_eq!(header(&headers, "grpc-status"), "8", "{headers:?}");
    assert!(header(&headers, "grpc-message").contains("rate limited by test/api-limits"));

    // The dry run lets every request through and counts the 19 over its limit.
    assert_eq!(burst(&format!("{}/dry/x", m.web), 20, &[]).await, (20, 0));
    let metrics = m.api.metrics().await;
    assert_eq!(rate_limited(&metrics, &["dry_run=\"true\""]), 19, "{metrics}");
    assert_eq!(rate_limited(&metrics, &["key=\"remote_address\"", "dry_run=\"false\""]), 25 + 3 + 1, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_limit_applies_live_and_a_removed_one_stops() {
    let m = mesh("rate-live").await;
    let live = format!("{}/live/x", m.web);
    assert_eq!(burst(&live, 5, &[]).await, (5, 0), "no limit on /live yet");

    let file = m.resources.join("limits.yaml");
    write_atomically(&file, &format!("{LIMITS}{LIVE}"));
    wait_for("the new limit refuses", Duration::from_secs(10), || async {
        get(&http_client(), &live, &[]).await.unwrap().0 == 429
    })
    .await;
    let (status, headers, _) = get(&http_client(), &live, &[]).await.unwrap();
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "ratelimit-policy"), r#""test/live";q=2;w=3600"#);
    // An hour's limit says so: retry in about half an hour.
    let retry: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((1700..=1800).contains(&retry), "retry-after {retry}");
    // The limits that were there still apply (counting afresh: the set of limits changed).
    assert_eq!(burst(&format!("{}/by-ip/x", m.batch), 6, &[]).await, (5, 1));

    write_atomically(&file, LIMITS);
    wait_for("the removed limit stops refusing", Duration::from_secs(10), || async {
        get(&http_client(), &live, &[]).await.unwrap().0 == 200
    })
    .await;
    assert_eq!(burst(&live, 5, &[]).await, (5, 0));
}
