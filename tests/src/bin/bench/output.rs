//! Rows of results, statistics and number formatting.

use std::time::Duration;

use serde_json::{Value, json};

/// Whether a larger value is better (throughput) or worse (latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    Lower,
    Higher,
}

/// One row of the summary.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) id: &'static str,
    pub(crate) what: String,
    pub(crate) unit: &'static str,
    pub(crate) value: f64,
    pub(crate) floor: Option<f64>,
    /// value / floor.
    pub(crate) ratio: Option<f64>,
    pub(crate) goal: String,
    /// Goal on the ratio when there is a floor, else on the value.
    pub(crate) goal_limit: f64,
    pub(crate) better: Better,
    pub(crate) details: serde_json::Map<String, Value>,
}

impl Row {
    pub(crate) fn met(&self) -> bool {
        let x = self.ratio.unwrap_or(self.value);
        match self.better {
            Better::Lower => x <= self.goal_limit,
            Better::Higher => x >= self.goal_limit,
        }
    }

    pub(crate) fn print(&self) {
        let floor = match (self.floor, self.ratio) {
            (Some(f), Some(r)) => {
                format!("   floor {} {}   ratio {:.2}x", fmt_num(f), self.unit, r)
            }
            _ => String::new(),
        };
        say!(
            "  => {:<54} {} {}{}   goal {}  [{}]",
            self.what,
            fmt_num(self.value),
            self.unit,
            floor,
            self.goal,
            if self.met() { "MET" } else { "MISSED" }
        );
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "what": self.what,
            "unit": self.unit,
            "value": round3(self.value),
            "floor": self.floor.map(round3),
            "ratio": self.ratio.map(round3),
            "goal": self.goal,
            "met": self.met(),
            "details": self.details,
        })
    }
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Latency statistics in milliseconds.
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub(crate) n: usize,
    pub(crate) min: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Stats {
    pub(crate) fn of(samples: &[Duration]) -> Stats {
        let mut v: Vec<f64> = samples.iter().copied().map(ms).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1);
        let pct = |p: f64| {
            v.get(((p * n as f64).ceil() as usize).clamp(1, n) - 1)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Stats {
            n: v.len(),
            min: v.first().copied().unwrap_or(f64::NAN),
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
            mean: v.iter().sum::<f64>() / n as f64,
        }
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "n={} min {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  mean {:.3} ms",
            self.n, self.min, self.p50, self.p90, self.p99, self.max, self.mean
        )
    }

    pub(crate) fn json(&self) -> Value {
        json!({"n": self.n, "min_ms": round3(self.min), "p50_ms": round3(self.p50), "p90_ms": round3(self.p90),
               "p99_ms": round3(self.p99), "max_ms": round3(self.max), "mean_ms": round3(self.mean)})
    }
}
