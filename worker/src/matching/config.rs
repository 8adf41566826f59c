//! The engine's settings, checked once: [`EngineConfig::from_settings`] turns
//! the pipeline's [`MatchSettings`] into plain numbers and a scorer list the
//! engine can use without re-validating on every window.

use std::collections::BTreeSet;

use matchfleet_api::match_pipeline::{BuiltinScorer, MatchSettings};
use thiserror::Error;

use super::feedback::FeedbackConfig;

/// Candidates kept per request in large windows. The greedy matchmaker
/// rescores a request against the still-free ones when its list runs out, so
/// this trades memory and list upkeep for refills, never quality. With
/// prescoring (`benches/matchmaker.rs`, `BENCH_TOP_K`), 24 closes a 5,000
/// window in 17.0 ms and a 10,000 one in 52.3 (48: 19.4 / 49.1; 16: 19.3 /
/// 61.9; 8: 26.5 / 113), its lists cost 14% less upkeep while the window
/// fills than 48's, and half the memory (~6 MB at 10,000 requests).
pub const DEFAULT_TOP_K: usize = 24;

/// Largest `matching.exactBelow`: the exact matchmaker is a DP over the
/// 2^n subsets of the window (8 MB of f64 at n = 20).
pub const MAX_EXACT_BELOW: usize = 20;

/// A setting the engine cannot run with.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    #[error("features.dimension must be 1 to 1024, got {0}")]
    Dimension(i32),
    #[error("window.{field} must be {min} or more, got {got}")]
    WindowTooSmall {
        field: &'static str,
        min: i32,
        got: i32,
    },
    #[error("matching.maxWaitWindows must be at least 1, got {0}")]
    MaxWaitWindows(i32),
    #[error("matching.rematchCooldownSeconds must not be negative, got {0}")]
    Cooldown(i32),
    #[error("matching.exactBelow must be 0 to {MAX_EXACT_BELOW}, got {0}")]
    ExactBelow(i32),
    #[error("matching.minScore must be a finite number, got {0}")]
    MinScore(f64),
    #[error("at least one scorer is needed")]
    NoScorers,
    #[error("scorer name {0:?} is empty or used twice")]
    ScorerName(String),
    #[error("scorer {0:?} needs exactly one of builtin or http")]
    ScorerKind(String),
    #[error("feedback.ttlSeconds must be at least 1 and minCallSeconds not negative, got {ttl} and {min_call}")]
    Feedback { ttl: i32, min_call: i32 },
}

/// How a scorer computes a window's pair scores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScorerKind {
    /// Computed in the engine as one batch over the window's vectors.
    Builtin(BuiltinScorer),
    /// Computed outside the engine (see [`crate::matching::DueWindow`]).
    Http { url: String, timeout_millis: i32 },
}

/// One arm of the bandit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scorer {
    pub name: String,
    pub kind: ScorerKind,
}

/// Validated engine settings; see the module docs of [`crate::matching`]
/// for what each one means.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub(crate) dimension: usize,
    pub(crate) window_millis: i64,
    pub(crate) out_of_order_millis: i64,
    pub(crate) allowed_lateness_millis: i64,
    pub(crate) idle_millis: i64,
    pub(crate) max_wait_windows: u32,
    pub(crate) cooldown_millis: i64,
    pub(crate) exact_below: usize,
    pub(crate) min_score: f64,
    pub(crate) scorers: Vec<Scorer>,
    pub(crate) top_k: usize,
    /// Members an open window needs before it is prescored.
    pub(crate) prescore_from: usize,
    /// Set when the pipeline joins outcome events (`spec.feedback`).
    pub(crate) feedback: Option<FeedbackConfig>,
}

impl EngineConfig {
    pub fn from_settings(s: &MatchSettings) -> Result<Self, ConfigError> {
        let dim = s.features.dimension;
        if !(1..=1024).contains(&dim) {
            return Err(ConfigError::Dimension(dim));
        }
        let w = &s.window;
        for (field, min, got) in [
            ("sizeMillis", 1, w.size_millis),
            ("outOfOrderMillis", 0, w.out_of_order_millis),
            ("allowedLatenessMillis", 0, w.allowed_lateness_millis),
            ("idleMillis", 1, w.idle_millis),
        ] {
            if got < min {
                return Err(ConfigError::WindowTooSmall { field, min, got });
            }
        }
        let m = &s.matching;
        let max_wait_windows = u32::try_from(m.max_wait_windows)
            .map_err(|_| ConfigError::MaxWaitWindows(m.max_wait_windows))?;
        if max_wait_windows == 0 {
            return Err(ConfigError::MaxWaitWindows(m.max_wait_windows));
        }
        if m.rematch_cooldown_seconds < 0 {
            return Err(ConfigError::Cooldown(m.rematch_cooldown_seconds));
        }
        let exact_below = usize::try_from(m.exact_below)
            .ok()
            .filter(|&e| e <= MAX_EXACT_BELOW)
            .ok_or(ConfigError::ExactBelow(m.exact_below))?;
        if !m.min_score.is_finite() {
            return Err(ConfigError::MinScore(m.min_score));
        }
        if s.scorers.is_empty() {
            return Err(ConfigError::NoScorers);
        }
        let mut names = BTreeSet::new();
        let mut scorers = Vec::with_capacity(s.scorers.len());
        for spec in &s.scorers {
            if spec.name.is_empty() || !names.insert(spec.name.as_str()) {
                return Err(ConfigError::ScorerName(spec.name.clone()));
            }
            let kind = match (&spec.builtin, &spec.http) {
                (Some(b), None) => ScorerKind::Builtin(*b),
                (None, Some(h)) => ScorerKind::Http {
                    url: h.url.clone(),
                    timeout_millis: h.timeout_millis,
                },
                _ => return Err(ConfigError::ScorerKind(spec.name.clone())),
            };
            scorers.push(Scorer {
                name: spec.name.clone(),
                kind,
            });
        }
        let feedback = match &s.feedback {
            None => None,
            Some(f) => {
                let bad = || ConfigError::Feedback {
                    ttl: f.ttl_seconds,
                    min_call: f.min_call_seconds,
                };
                if f.ttl_seconds < 1 {
                    return Err(bad());
                }
                Some(FeedbackConfig {
                    ttl_millis: i64::from(f.ttl_seconds) * 1000,
                    min_call_seconds: u32::try_from(f.min_call_seconds).map_err(|_| bad())?,
                })
            }
        };
        Ok(EngineConfig {
            dimension: dim as usize,
            window_millis: i64::from(w.size_millis),
            out_of_order_millis: i64::from(w.out_of_order_millis),
            allowed_lateness_millis: i64::from(w.allowed_lateness_millis),
            idle_millis: i64::from(w.idle_millis),
            max_wait_windows,
            cooldown_millis: i64::from(m.rematch_cooldown_seconds) * 1000,
            exact_below,
            min_score: m.min_score,
            scorers,
            top_k: DEFAULT_TOP_K,
            prescore_from: crate::matching::prescore::PRESCORE_FROM,
            feedback,
        })
    }

    /// Candidates kept per request in greedy windows (at least 1).
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k.max(1);
        self
    }

    /// Prescores open windows from `n` members on (benchmarks and tests).
    pub fn with_prescore_from(mut self, n: usize) -> Self {
        self.prescore_from = n;
        self
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Whether any scorer is an HTTP service (only then do windows need
    /// [`crate::matching::PartitionEngine::due`] before they close).
    pub fn has_http_scorers(&self) -> bool {
        self.scorers
            .iter()
            .any(|s| matches!(s.kind, ScorerKind::Http { .. }))
    }

    pub fn window_millis(&self) -> i64 {
        self.window_millis
    }

    pub fn scorers(&self) -> &[Scorer] {
        &self.scorers
    }

    pub fn feedback(&self) -> Option<&FeedbackConfig> {
        self.feedback.as_ref()
    }

    /// The scorer a window falls back to when its HTTP scores are missing:
    /// the first builtin one, else cosine under that name.
    pub(crate) fn fallback_scorer(&self) -> (String, BuiltinScorer) {
        self.scorers
            .iter()
            .find_map(|s| match s.kind {
                ScorerKind::Builtin(b) => Some((s.name.clone(), b)),
                ScorerKind::Http { .. } => None,
            })
            .unwrap_or_else(|| ("cosine".to_string(), BuiltinScorer::Cosine))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use matchfleet_api::match_pipeline::{
        FeatureSpec, HttpScorerSpec, MatchingSpec, ScorerSpec, WindowSpec,
    };

    pub(crate) fn settings() -> MatchSettings {
        MatchSettings {
            features: FeatureSpec { dimension: 2 },
            window: WindowSpec {
                size_millis: 1000,
                out_of_order_millis: 200,
                allowed_lateness_millis: 3000,
                idle_millis: 1000,
            },
            matching: MatchingSpec {
                max_wait_windows: 3,
                rematch_cooldown_seconds: 10,
                exact_below: 8,
                min_score: -1.0,
            },
            scorers: vec![ScorerSpec {
                name: "cosine".into(),
                builtin: Some(BuiltinScorer::Cosine),
                http: None,
            }],
            feedback: None,
        }
    }

    #[test]
    fn defaults_convert() {
        let c = EngineConfig::from_settings(&settings()).unwrap();
        assert_eq!(c.window_millis, 1000);
        assert_eq!(c.cooldown_millis, 10_000);
        assert_eq!(c.top_k, DEFAULT_TOP_K);
        assert_eq!(c.fallback_scorer().0, "cosine");
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        let mut s = settings();
        s.features.dimension = 0;
        assert_eq!(
            EngineConfig::from_settings(&s),
            Err(ConfigError::Dimension(0))
        );

        let mut s = settings();
        s.window.size_millis = 0;
        assert!(matches!(
            EngineConfig::from_settings(&s),
            Err(ConfigError::WindowTooSmall {
                field: "sizeMillis",
                ..
            })
        ));

        let mut s = settings();
        s.matching.max_wait_windows = 0;
        assert_eq!(
            EngineConfig::from_settings(&s),
            Err(ConfigError::MaxWaitWindows(0))
        );

        let mut s = settings();
        s.matching.exact_below = 21;
        assert_eq!(
            EngineConfig::from_settings(&s),
            Err(ConfigError::ExactBelow(21))
        );

        let mut s = settings();
        s.matching.min_score = f64::NAN;
        assert!(matches!(
            EngineConfig::from_settings(&s),
            Err(ConfigError::MinScore(_))
        ));

        let mut s = settings();
        s.scorers.clear();
        assert_eq!(EngineConfig::from_settings(&s), Err(ConfigError::NoScorers));

        let mut s = settings();
        s.scorers.push(s.scorers[0].clone());
        assert_eq!(
            EngineConfig::from_settings(&s),
            Err(ConfigError::ScorerName("cosine".into()))
        );

        let mut s = settings();
        s.scorers[0].http = Some(HttpScorerSpec {
            url: "http://x".into(),
            timeout_millis: 5,
        });
        assert_eq!(
            EngineConfig::from_settings(&s),
            Err(ConfigError::ScorerKind("cosine".into()))
        );
    }

    #[test]
    fn fallback_is_the_first_builtin_or_cosine() {
        let mut s = settings();
        s.scorers = vec![
            ScorerSpec {
                name: "remote".into(),
                builtin: None,
                http: Some(HttpScorerSpec {
                    url: "http://x".into(),
                    timeout_millis: 5,
                }),
            },
            ScorerSpec {
                name: "opposites".into(),
                builtin: Some(BuiltinScorer::Complement),
                http: None,
            },
        ];
        let c = EngineConfig::from_settings(&s).unwrap();
        assert_eq!(
            c.fallback_scorer(),
            ("opposites".to_string(), BuiltinScorer::Complement)
        );
        s.scorers.truncate(1);
        let c = EngineConfig::from_settings(&s).unwrap();
        assert_eq!(
            c.fallback_scorer(),
            ("cosine".to_string(), BuiltinScorer::Cosine)
        );
    }
}
