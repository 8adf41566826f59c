//! The MatchPipeline controller: a progress service, partition-pinned
//! `matchfleet-worker match` pods behind a `NAME-workers` Service, the
//! assignment, and a status with the pipeline's counters and match rate
//! (DESIGN.md §4). It runs on the fleet code RenderJob uses; what is its own
//! is here: the worker template ([`resources`]), the spec checks
//! ([`validate`]), the counters and rate ([`rate`]), the pure [`plan`], and
//! the [`reconcile`] that acts on it.

pub mod plan;
pub mod rate;
pub mod reconcile;
pub mod resources;
pub mod validate;
