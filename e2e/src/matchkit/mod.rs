//! MatchPipeline load and verification: `generate`/`produce` make a
//! realistic stream of match requests (and malformed ones for the dead-letter
//! path) and send it to the request topic; `read`/`check` read the run back
//! and check the pipeline's promises. The `match-loadgen` and `match-check`
//! binaries are thin wrappers; the e2e tests call these functions directly.

pub mod check;
pub mod generate;
pub mod pace;
pub mod population;
pub mod produce;
pub mod read;
pub mod report;

pub use check::{check, classify, CheckConfig, DeadLetterRecord, InputRecord, ResultRecord};
pub use generate::{Generator, LoadOptions, Malformed, Outgoing};
pub use produce::{send_load, send_load_with, LoadError, Sent, SentRequest, SentSummary};
pub use read::{check_topics, check_topics_async, CheckOptions, ReadError};
pub use report::{Figures, Latency, Report, Violation};
