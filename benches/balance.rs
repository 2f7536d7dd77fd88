//! The balancer's own cost per request, as a service route pays it with several endpoints:
//! pick the cheaper of two endpoints (each usable check and cost read takes its lock), count the
//! request outstanding there, and take its latency into the estimate when it is answered. The
//! rest of a service route's request (the mesh connection, the proxying) is what
//! `bench/instructions` measures for a pair; with one endpoint none of this runs.
//!
//! `cargo bench --bench balance -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use palisade::proxy::balance::{self, Decay, Load};

fn per_request(c: &mut Criterion) {
    let decay = Decay::default();
    let mut group = c.benchmark_group("balancer/request");
    for n in [2usize, 3, 10, 100] {
        let loads: Vec<Arc<Load>> = (0..n).map(|_| Load::new(decay)).collect();
        // Some history, as after a while of traffic: each endpoint answered a few requests.
        for l in &loads {
            for _ in 0..4 {
                let _ = l.start().finish(false, decay);
            }
        }
        group.bench_with_input(BenchmarkId::from_parameter(n), &loads, |b, loads| {
            b.iter(|| {
                let now = Instant::now();
                let i = balance::pick(loads.len(), |i| loads[i].available(now), |i| loads[i].cost(now, decay))
                    .expect("an endpoint");
                let inflight = loads[i].start();
                black_box(inflight.finish(false, decay))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
