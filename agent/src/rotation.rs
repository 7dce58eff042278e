//! When to renew an SVID: at about half its lifetime, minus up to a tenth of the
//! lifetime of random jitter so a fleet that started together does not renew together.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in milliseconds since the Unix epoch, injectable for tests.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// The instant (Unix ms) at which an SVID received at `received_ms` and valid until
/// `not_after` (Unix seconds) should be renewed, for a jitter draw `jitter` in `[0, 1)`:
/// half of the lifetime left at receipt, minus up to a tenth of it. The lifetime is
/// measured from receipt, not from notBefore, because the server backdates notBefore
/// (10 s) and a short SVID would otherwise be due the moment it arrives. Never sooner
/// than 1 s after receipt (or half the remainder, for an SVID about to expire).
pub fn renew_at_ms(received_ms: i64, not_after: i64, jitter: f64) -> i64 {
    let remaining = (not_after * 1000 - received_ms).max(0);
    let jitter_ms = (remaining as f64 * 0.1 * jitter.clamp(0.0, 1.0)) as i64;
    let earliest = received_ms + (remaining / 2).min(1000);
    (received_ms + remaining / 2 - jitter_ms).max(earliest)
}

/// Capped exponential backoff after `failures` consecutive failures: 1 s doubling to 30 s.
pub fn retry_delay(failures: u32) -> Duration {
    let secs = 1u64 << failures.min(5);
    Duration::from_secs(secs.min(30))
}

/// Converts a Unix-ms deadline into a tokio instant relative to `clock`.
pub fn instant_at(clock: &dyn Clock, at_ms: i64) -> tokio::time::Instant {
    let delta = (at_ms - clock.now_ms()).max(0) as u64;
    tokio::time::Instant::now() + Duration::from_millis(delta)
}

/// A clock that follows tokio's (pausable) time from a fixed start, so tests under
/// `start_paused` see wall-clock time move exactly as tokio's timers do.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TokioClock {
    start_ms: i64,
    start: tokio::time::Instant,
}

#[cfg(test)]
impl TokioClock {
    pub(crate) fn starting_at(start_ms: i64) -> Self {
        TokioClock {
            start_ms,
            start: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
impl Clock for TokioClock {
    fn now_ms(&self) -> i64 {
        self.start_ms + self.start.elapsed().as_millis() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_life_from_receipt_with_bounded_jitter() {
        assert_eq!(renew_at_ms(1_000_000, 1100, 0.0), 1_050_000);
        assert_eq!(renew_at_ms(1_000_000, 1100, 0.5), 1_045_000);
        // A 10 s SVID (notBefore backdated by the server) renews 4 to 5 s after receipt.
        let at = renew_at_ms(0, 10, 0.999);
        assert!((4000..=5000).contains(&at), "{at}");
        // Jitter draws outside [0, 1) are clamped, never pushing renewal past half-life.
        assert_eq!(renew_at_ms(0, 10, -3.0), 5000);
        assert_eq!(renew_at_ms(0, 10, 7.0), 4000);
        // Nearly expired: half the remainder, not a busy loop; already expired: now.
        assert_eq!(renew_at_ms(0, 1, 1.0), 500);
        assert_eq!(renew_at_ms(5000, 1, 0.0), 5000);
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(retry_delay(0), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(8));
        assert_eq!(retry_delay(40), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn timer_fires_at_renewal_time_not_before() {
        let clock = TokioClock::starting_at(1_000_000);
        // An SVID received now, valid for 60 s, no jitter: renew 30 s from now.
        let at = renew_at_ms(clock.now_ms(), 1060, 0.0);
        let deadline = instant_at(&clock, at);
        let sleeper = tokio::time::sleep_until(deadline);
        tokio::pin!(sleeper);
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert!(futures_poll(&mut sleeper).is_pending(), "fired early");
        assert!(clock.now_ms() < at);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            futures_poll(&mut sleeper).is_ready(),
            "did not fire at half-life"
        );
        assert_eq!(clock.now_ms(), at);
    }

    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        std::pin::Pin::new(f).poll(&mut cx)
    }
}
