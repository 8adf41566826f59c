//! What every fleet worker shares, whatever it does with a message: the
//! lease guard of one partition, the client of the progress service, and the
//! lease keeper that heartbeats and starts, drains or kills partition work.
//! Render and match modes plug in through [`keeper::PartitionWorker`] and
//! live by [`process::run`] (endpoints, signals, drain).

pub mod client;
pub mod clock;
pub mod guard;
pub mod keeper;
pub mod process;
