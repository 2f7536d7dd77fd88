//! Wall-clock time as Unix seconds: the unit of certificate validity, the ledger and telemetry.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 for a time before it).
pub fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Now, in seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    unix(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn counts_whole_seconds_from_the_epoch_and_clamps_earlier_times_to_zero() {
        assert_eq!(super::unix(super::UNIX_EPOCH + Duration::from_millis(1_700_000_000_999)), 1_700_000_000);
        assert_eq!(super::unix(super::UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
