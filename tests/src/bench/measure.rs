//! Statistics over samples. (What /proc says about a process is egress_testbed::procfs.)

use serde::{Deserialize, Serialize};

/// Percentiles of a set of samples, in the samples' unit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Summary {
    pub fn of(samples: &[u32]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let sum: f64 = sorted.iter().map(|&s| s as f64).sum();
        Some(Self {
            n: sorted.len(),
            p10: percentile(&sorted, 10.0),
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            mean: sum / sorted.len() as f64,
        })
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u32> = (1..=100).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!((s.p50, s.p99, s.n), (50.0, 99.0, 100));
        assert_eq!(Summary::of(&[7]).unwrap().p99, 7.0);
        assert!(Summary::of(&[]).is_none());
    }
}
