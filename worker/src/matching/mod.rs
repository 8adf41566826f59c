//! The `match` mode's building blocks (issue 4). First brick: the batch pair
//! scorer that turns a window's request and candidate feature vectors into a
//! score matrix as one small GEMM instead of pair by pair.

pub mod score;

pub use score::{score_batch, score_naive, score_path, FeatureMatrix, ScoreError, ScorePath};
