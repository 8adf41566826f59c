//! What every fleet worker shares, whatever it does with a message: the
//! lease guard of one partition, the client of the progress service, and the
//! lease keeper that heartbeats and starts, drains or kills partition work.
//! Render mode plugs in through [`keeper::PartitionWorker`]; match mode will too.

pub mod client;
pub mod clock;
pub mod guard;
pub mod keeper;
