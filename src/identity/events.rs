//! Certificate events (issued, renewal failed) waiting for the agent's next telemetry report.

use parking_lot::Mutex;

use crate::proto::telemetry::CertificateEvent;

/// Most events kept between two reports; the oldest go first, so a control plane that is
/// away for long still hears what happened last.
const CAPACITY: usize = 256;

/// Certificate events waiting for the next report.
#[derive(Default)]
pub struct CertEvents {
    queue: Mutex<Vec<CertificateEvent>>,
}

impl CertEvents {
    /// Queues an event (bounded: the oldest are dropped past 256).
    pub fn push(&self, event: CertificateEvent) {
        let mut q = self.queue.lock();
        if q.len() >= CAPACITY {
            q.remove(0);
        }
        q.push(event);
    }

    /// Takes every queued event, oldest first.
    pub fn drain(&self) -> Vec<CertificateEvent> {
        std::mem::take(&mut *self.queue.lock())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_and_drains_them_in_order() {
        let events = CertEvents::default();
        for n in 0..(CAPACITY as i64 + 10) {
            events.push(CertificateEvent { not_after: n, ..Default::default() });
        }
        let drained = events.drain();
        assert_eq!(drained.len(), CAPACITY);
        assert_eq!(drained.first().map(|e| e.not_after), Some(10));
        assert_eq!(drained.last().map(|e| e.not_after), Some(CAPACITY as i64 + 9));
        assert!(events.drain().is_empty());
    }
}
