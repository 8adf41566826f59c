//! The matchfleet operator: reconciles `RenderJob`s and `MatchPipeline`s
//! into a progress service, a fleet of partition-pinned worker pods and an
//! assignment, and reports what it sees in their status (DESIGN.md §6).
//!
//! Each reconcile is observe -> plan -> act: [`observe`] reads the API
//! server, Kafka ([`kafka`]) and the progress service ([`progress_client`]);
//! a plan is a pure function over what was observed - [`plan`] for a
//! RenderJob, [`pipeline::plan`] for a MatchPipeline - built from what every
//! fleet shares ([`fleet`], [`names`], [`resources`], [`assign`],
//! [`conditions`]) and what is the kind's own ([`backlog`],
//! [`pipeline::resources`], [`pipeline::rate`]); [`reconcile`] and
//! [`pipeline::reconcile`] act on it through [`controller`], which also
//! runs both controllers. [`leader`] makes sure only one replica acts;
//! [`http`] and [`metrics`] serve the admin endpoints.

pub mod assign;
pub mod backlog;
pub mod conditions;
pub mod controller;
pub mod duration;
pub mod fleet;
pub mod http;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod observe;
pub mod pipeline;
pub mod plan;
pub mod progress_client;
pub mod reconcile;
pub mod resources;
