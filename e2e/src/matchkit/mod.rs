//! MatchPipeline load and verification: `generate`/`produce` make a
//! realistic stream of match requests (and malformed ones for the dead-letter
//! path) and send it to the request topic; `read`/`check` read the run back
//! and check the pipeline's promises. `feedback` draws outcome events for a
//! run's matches and computes the rewards and samples the feedback join must
//! write. The `match-loadgen` and `match-check` binaries are thin wrappers;
//! the e2e tests call these functions directly.

pub mod check;
pub mod feedback;
pub mod generate;
pub mod pace;
pub mod population;
pub mod produce;
pub mod read;
pub mod report;

pub use check::{check, classify, CheckConfig, DeadLetterRecord, InputRecord, ResultRecord};
pub use feedback::{
    compare, expected_samples, matches_in, plan_outcomes, FeedbackMatch, FeedbackReport, JoinRules,
    OutcomeKind, OutcomeOptions, OutcomePlan, PlanFigures, PlannedOutcome, RewardRecord,
};
pub use generate::{Generator, LoadOptions, Malformed, Outgoing};
pub use produce::{
    send_load, send_load_with, send_outcomes, LoadError, OutcomeSendError, Sent, SentOutcomes,
    SentRequest, SentSummary,
};
pub use read::{
    check_topics, check_topics_async, check_topics_keeping_results,
    check_topics_keeping_results_async, read_rewards, read_rewards_async, CheckOptions, ReadError,
    RewardsOptions,
};
pub use report::{Figures, Latency, Report, Violation};
