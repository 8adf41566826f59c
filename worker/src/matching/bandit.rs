//! The scorer bandit: Thompson sampling per segment over the configured
//! scorers, each arm a Beta(1 + successes, 1 + failures) posterior.
//!
//! Rewards are fractions in [0, 1] (the feedback join's call-length score),
//! so successes and failures are sums of fractions, not counts. The sample
//! for a window is drawn from a PCG64 seeded by (partition, segment, window
//! start): a replay of the same window with the same posteriors picks the
//! same arm, on any machine and any later build (both PCG64 and
//! `seed_from_u64` are specified algorithms).

use rand::SeedableRng;
use rand_distr::{Beta, Distribution};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

use super::digest::Digest;

/// One arm's posterior.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArmStats {
    #[serde(with = "super::exact_float::f64_text")]
    pub successes: f64,
    #[serde(with = "super::exact_float::f64_text")]
    pub failures: f64,
}

impl ArmStats {
    /// Adds a reward in [0, 1] (clamped); a NaN reward is ignored.
    pub fn reward(&mut self, reward: f64) -> bool {
        if reward.is_nan() {
            return false;
        }
        let r = reward.clamp(0.0, 1.0);
        self.successes += r;
        self.failures += 1.0 - r;
        true
    }

    fn sample(&self, rng: &mut Pcg64) -> f64 {
        // Both parameters are ≥ 1 and finite unless the sums overflowed to
        // infinity; such an arm is then sampled at its mean.
        let (a, b) = (1.0 + self.successes, 1.0 + self.failures);
        match Beta::new(a, b) {
            Ok(beta) => beta.sample(rng),
            Err(_) => a / (a + b),
        }
    }
}

/// The seed of a window's draw.
pub fn seed(partition: i32, segment: &str, window_start: i64) -> u64 {
    Digest::new()
        .i64(i64::from(partition))
        .str(segment)
        .i64(window_start)
        .finish64()
}

/// The arm with the largest posterior sample (the first on a tie). One arm
/// needs no draw.
pub fn choose(arms: &[ArmStats], seed: u64) -> usize {
    if arms.len() <= 1 {
        return 0;
    }
    let mut rng = Pcg64::seed_from_u64(seed);
    let mut best = (0, f64::NEG_INFINITY);
    for (i, arm) in arms.iter().enumerate() {
        let x = arm.sample(&mut rng);
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewards_are_clamped_fractions() {
        let mut a = ArmStats::default();
        assert!(a.reward(0.25));
        assert!(a.reward(7.0));
        assert!(a.reward(-1.0));
        assert!(!a.reward(f64::NAN));
        assert_eq!(
            a,
            ArmStats {
                successes: 1.25,
                failures: 1.75
            }
        );
    }

    #[test]
    fn the_same_seed_picks_the_same_arm() {
        let arms = vec![ArmStats::default(); 3];
        for start in 0..50 {
            let s = seed(3, "eu", start * 1000);
            assert_eq!(choose(&arms, s), choose(&arms, s));
        }
        assert_ne!(seed(3, "eu", 0), seed(4, "eu", 0));
        assert_ne!(seed(3, "eu", 0), seed(3, "us", 0));
        assert_ne!(seed(3, "eu", 0), seed(3, "eu", 1000));
    }

    #[test]
    fn uninformed_arms_are_explored_and_a_rewarded_arm_wins() {
        let mut arms = vec![ArmStats::default(); 2];
        let picks = |arms: &[ArmStats]| {
            (0..1000)
                .filter(|&w| choose(arms, seed(0, "s", w * 1000)) == 1)
                .count()
        };
        let even = picks(&arms);
        assert!(
            (350..650).contains(&even),
            "no evidence: about half each, got {even}"
        );
        for _ in 0..30 {
            arms[0].reward(0.2);
            arms[1].reward(0.8);
        }
        let good = picks(&arms);
        assert!(
            good > 950,
            "the rewarded arm is chosen {good} of 1000 times"
        );
    }

    #[test]
    fn a_single_arm_needs_no_draw_and_overflow_does_not_panic() {
        assert_eq!(choose(&[ArmStats::default()], 1), 0);
        let huge = ArmStats {
            successes: f64::INFINITY,
            failures: 0.0,
        };
        let _ = choose(&[huge, ArmStats::default()], 1);
    }
}
