//! A request body that must keep arriving.
//!
//! A caller that trickles its body (one byte every few seconds) would otherwise hold a
//! sidecar-to-sidecar connection and an app connection for as long as it likes: the header
//! timeout covers only the request head. [`RequestBody`] fails the body once it falls behind a
//! minimum average rate after a grace period (`--request-body-min-rate`,
//! `--request-body-grace`): the upstream request is aborted and the caller gets 408.
//!
//! Requests without a body (most of them) carry no timer and cost one branch per poll.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::http::BoxError;

/// The pace a request body must keep: after `grace`, at least `min_rate` bytes per second on
/// average since it started. `min_rate` 0 turns the check off.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub min_rate: u64,
    pub grace: Duration,
}

/// The body passed the workload's size limit; the request is answered 413.
#[derive(Debug, thiserror::Error)]
#[error("request body over {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The body fell behind its pace; the request is answered 408.
#[derive(Debug, thiserror::Error)]
#[error("request body arrived slower than {min_rate} bytes/s after {grace:?}")]
pub struct BodyTooSlow {
    pub min_rate: u64,
    pub grace: Duration,
}

/// A caller's request body on its way upstream.
pub struct RequestBody {
    /// `None`: no body (a bodiless request sent again, on a retry).
    inner: Option<Incoming>,
    pacer: Option<Box<Pacer>>,
    /// Bytes still allowed, when the workload limits bodies.
    allowance: Option<(u64, u64)>,
}

struct Pacer {
    pace: Pace,
    started: Instant,
    received: u64,
    deadline: Pin<Box<Sleep>>,
}

impl Pacer {
    /// When the bytes received so far stop being enough.
    fn due(&self) -> Instant {
        let covered = Duration::from_secs_f64(self.received as f64 / self.pace.min_rate as f64);
        self.started + self.pace.grace + covered
    }
}

impl RequestBody {
    /// Paces `inner` unless it is empty or pacing is off, and cuts it off past `limit` bytes.
    pub fn guarded(inner: Incoming, pace: Pace, limit: Option<u64>) -> Self {
        let mut body = Self::paced(inner, pace);
        body.allowance = limit.map(|l| (l, l));
        body
    }

    /// Paces `inner` unless it is empty or pacing is off.
    pub fn paced(inner: Incoming, pace: Pace) -> Self {
        let pacer = (pace.min_rate > 0 && !inner.is_end_stream()).then(|| {
            let started = Instant::now();
            Box::new(Pacer {
                pace,
                started,
                received: 0,
                deadline: Box::pin(tokio::time::sleep_until(started + pace.grace)),
            })
        });
        RequestBody { inner: Some(inner), pacer, allowance: None }
    }

    /// `inner` as it is, with no pace (tests, and bodies already bounded elsewhere).
    pub fn unpaced(inner: Incoming) -> Self {
        RequestBody { inner: Some(inner), pacer: None, allowance: None }
    }

    /// No body at all: a bodiless request sent again.
    pub fn empty() -> Self {
        RequestBody { inner: None, pacer: None, allowance: None }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some((limit, left)), Some(data)) = (this.allowance.as_mut(), frame.data_ref()) {
                    match left.checked_sub(data.len() as u64) {
                        Some(l) => *left = l,
                        None => return Poll::Ready(Some(Err(BodyTooLarge { limit: *limit }.into()))),
                    }
                }
                if let (Some(p), Some(data)) = (this.pacer.as_mut(), frame.data_ref()) {
                    p.received += data.len() as u64;
                    let due = p.due();
                    p.deadline.as_mut().reset(due);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.pacer = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(p) = this.pacer.as_mut() else { return Poll::Pending };
                if p.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let Pace { min_rate, grace } = p.pace;
                Poll::Ready(Some(Err(BodyTooSlow { min_rate, grace }.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// Whether an upstream failure was a request body that fell behind its pace.
pub fn too_slow(e: &(dyn std::error::Error + 'static)) -> bool {
    in_chain::<BodyTooSlow>(e)
}

/// Whether an upstream failure was a request body over the workload's limit.
pub fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    in_chain::<BodyTooLarge>(e)
}

fn in_chain<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_body_is_found_in_an_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("sending: {0}")]
        struct Outer(#[source] BoxError);
        let e = Outer(BodyTooSlow { min_rate: 1024, grace: Duration::from_secs(10) }.into());
        assert!(too_slow(&e));
        assert!(!too_slow(&std::io::Error::other("x")));
    }
}
