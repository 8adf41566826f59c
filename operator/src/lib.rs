//! The matchfleet operator: reconciles `RenderJob`s into a progress service,
//! a fleet of partition-pinned worker pods and an assignment, and reports
//! what it sees in their status (DESIGN.md §6).
//!
//! The reconcile is observe -> plan -> act: [`observe`] reads the API server,
//! Kafka ([`kafka`]) and the progress service ([`progress_client`]); [`plan`]
//! is a pure function over what was observed, built from [`names`],
//! [`resources`], [`assign`], [`backlog`] and [`conditions`]; [`reconcile`] acts on the plan.
//! [`leader`] makes sure only one replica acts; [`http`] and [`metrics`]
//! serve the admin endpoints.

pub mod assign;
pub mod backlog;
pub mod conditions;
pub mod duration;
pub mod http;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod observe;
pub mod plan;
pub mod progress_client;
pub mod reconcile;
pub mod resources;
