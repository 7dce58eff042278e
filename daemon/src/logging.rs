//! The log subscriber both daemons install, and a limiter for log lines that a caller
//! could otherwise make the daemon write as fast as it can send requests.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The log levels a config may name.
pub const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// Whether `level` is one of [`LOG_LEVELS`].
pub fn is_level(level: &str) -> bool {
    LOG_LEVELS.contains(&level)
}

/// Installs the global subscriber on stderr; `RUST_LOG` overrides `level` when set.
/// Audit events use the `audit` target so they can be routed apart. JSON lines carry the
/// event's fields at the top level (`{"level":..,"target":..,"message":..,"agent":..}`),
/// which is what log pipelines index.
pub fn init(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},h2=warn,hyper=warn,sqlx=warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never into log files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Allows one log line per key per interval, and counts what it held back, so a caller
/// that is refused a thousand times a second costs one line a minute.
#[derive(Debug)]
pub struct RateLimit<K> {
    interval: Duration,
    capacity: usize,
    seen: Mutex<HashMap<K, (Instant, u64)>>,
}

impl<K: Hash + Eq + Clone> RateLimit<K> {
    /// At most one line per `interval` for each of up to `capacity` distinct keys (beyond
    /// that, the oldest keys are forgotten).
    pub fn new(interval: Duration, capacity: usize) -> Self {
        RateLimit {
            interval,
            capacity: capacity.max(1),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` when a line for `key` may be written now, with how many were
    /// held back since the last one; `None` when it must be dropped.
    pub fn check(&self, key: &K) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.get_mut(key) {
            Some((last, suppressed)) if now.duration_since(*last) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let held = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(held)
            }
            None => {
                if seen.len() >= self.capacity {
                    // Forget the key logged longest ago; a bounded map cannot be grown
                    // by a caller that invents keys.
                    if let Some(oldest) = seen
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(k, _)| k.clone())
                    {
                        seen.remove(&oldest);
                    }
                }
                seen.insert(key.clone(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_per_key_with_a_count_of_the_rest() {
        let limit = RateLimit::new(Duration::from_secs(60), 2);
        assert_eq!(limit.check(&1), Some(0));
        assert_eq!(limit.check(&1), None);
        assert_eq!(limit.check(&1), None);
        assert_eq!(limit.check(&2), Some(0), "other keys are independent");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(limit.check(&1), Some(2), "two lines were held back");
        // A third key evicts the oldest instead of growing the map.
        assert_eq!(limit.check(&3), Some(0));
        assert_eq!(limit.seen.lock().expect("lock").len(), 2);
    }

    #[test]
    fn levels() {
        assert!(is_level("debug"));
        assert!(!is_level("verbose"));
    }
}
