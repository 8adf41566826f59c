//! The `match` mode's engine (issue 4): everything between "a validated
//! request was read from partition p" and "these results and this changelog
//! delta go into one Kafka transaction", with no Kafka and no HTTP. One
//! [`PartitionEngine`] per input partition.
//!
//! # Semantics
//!
//! **Windows and watermark.** Event-time tumbling windows per segment: a
//! request with event time `t` belongs to the window starting at
//! `floor((t − φ) / w) · w + φ` (`w = window.sizeMillis`), where the phase
//! `φ` ∈ [0, w) is fixed per segment when its first window opens
//! (`window::window_phase`: the k-th segment of partition p to open a window
//! gets the point (p, k) of a two-dimensional Weyl sequence; partition 0's
//! first segment 0), so a worker's windows close spread over the window
//! length rather than all at one watermark (a burst of closes and commits
//! once per window, the last of them waiting for all the others). A restore
//! reads each segment's phase off its state (`closed_until`, or a pending
//! window's start), so pending windows stay on the grid they were opened on.
//! The partition's watermark
//! is `max event time seen − window.outOfOrderMillis` and never goes back.
//! Idle rule: when no request was ingested for `window.idleMillis` of wall
//! time (the `now` the caller passes, ms), the watermark becomes at least
//! `now − idleMillis − outOfOrderMillis`, so the last windows close without
//! new traffic. A window `[s, s + w)` of a segment is due once the watermark
//! is ≥ `s + w`; `close` closes due windows oldest first, per segment in
//! order of start, and a window made due by leftovers carried into it closes
//! in the same call. Each segment remembers the end of its last closed window.
//!
//! **Late requests.** A request whose window is already closed for its
//! segment is `watermark − event_time` late. At most
//! `window.allowedLatenessMillis` late, it joins the segment's earliest open
//! window (the one starting where the last closed one ended); later, it is
//! settled at once as `Expired { reason: TooLate, windows: 0 }` (returned by
//! [`PartitionEngine::ingest`]). A segment that never closed a window has no
//! late requests.
//!
//! **Who takes part.** One request per user per window: the one that has
//! waited most windows, then the earliest ingested. The user's other requests
//! in that window are held back to the next window, and the window counts
//! toward their wait.
//!
//! **Pairs.** `(a, b)` is allowed iff
//! [`mutually_acceptable`](matchfleet_api::matching::mutually_acceptable),
//! the users are not in cooldown (a match of the two users whose deadline
//! — that match's window end + `rematchCooldownSeconds` — is after this
//! window's start) and the score is ≥ `matching.minScore`. Scores come from
//! the scorer the bandit chose for the window, as one batch over the window
//! ([`score_batch`]: cosine of L2-normalised vectors; `complement` is
//! −cosine), or from an HTTP scorer's answer (below); never pair by pair.
//!
//! **Matchmaker** ([`matchmaker`]): maximum total weight, a pair weighing
//! `score − minScore + 10⁻⁶`. Exact (DP over subsets) for windows of at most
//! `matching.exactBelow` (≤ 20) requests; otherwise the greedy matching (½ of
//! the optimum) computed from per-request top-K candidate lists scored in row
//! blocks, never an n × n matrix, with refills so that it equals the greedy
//! matching of the full graph.
//!
//! **Prescoring** ([`prescore`]): when a window's scorer is builtin, the
//! candidate lists are built while the window fills —
//! [`PartitionEngine::prescore`] scores the requests that arrived since its
//! last call against their open window (from 256 members on) — so a close
//! only converts the lists and runs the greedy. Not state: a restore rebuilds
//! them. The matching is exactly the one scored at the close (property-tested
//! against it, restarts, ties and held-back requests included).
//!
//! **Results.** One `Matched` per pair: `match_id` = 128-bit FNV-1a of
//! (segment, window start, the two request ids sorted) in hex; users sorted
//! by (user, request id); `closed_at` = `now`; `scorer` = the scorer
//! actually used; `partition` = the engine's. Unmatched participants (and
//! held-back requests) move to the segment's next window; one that has now
//! waited `matching.maxWaitWindows` windows is settled as
//! `Expired { reason: NoPartner, windows }`. Every ingested request is
//! settled exactly once, as the watermark advances (the idle rule makes sure
//! it does).
//!
//! **Cooldowns** are kept per user pair with their deadline; at the end of
//! each `close`, entries whose deadline is ≤ the watermark are dropped (their
//! changelog keys tombstoned). A window that starts before the watermark —
//! a late request's window in a segment idle for a while — may thus see a pair
//! whose deadline fell between its start and the watermark as free: the TTL's
//! price for bounded state.
//!
//! **Bandit** ([`bandit`]): per segment, Thompson sampling over the
//! configured scorers with Beta(1 + successes, 1 + failures) posteriors; the
//! draw for a window uses a PCG64 seeded from (partition, segment, window
//! start), so a replay picks the same arm. The choice is made when the window
//! opens (its first request, or leftovers carried into it), so that a builtin
//! scorer's window can be prescored, and kept until it closes.
//! [`PartitionEngine::record_reward`] feeds it (the feedback join, below).
//!
//! **HTTP scorers, two phases.** [`PartitionEngine::due`] lists the windows
//! that would close now, each with its [`WindowId`] (segment, start and a
//! digest of its requests), the chosen scorer, and for HTTP scorers the
//! request ids and vectors to send. The caller passes the answers to
//! [`PartitionEngine::close`] as `n × n` row-major scores by `WindowId`; a
//! missing or mis-sized answer, or one computed for another composition of
//! the window, falls back to the first builtin scorer (or cosine).
//!
//! **Feedback join** (with `spec.feedback`, [`feedback`]). Every match is
//! remembered with its deadline = window end + `feedback.ttlSeconds`.
//! Outcome events ([`PartitionEngine::ingest_outcome`], the feedback topic's
//! partition with the same number, in offset order) have their own event-time
//! clock (max event time − `window.outOfOrderMillis`, same idle rule). An
//! outcome joins iff its match is known, its event time is ≤ the deadline and
//! no outcome joined before it; then the bandit gets the reward (0 if
//! skipped, else `min(1, callSeconds / minCallSeconds)`) for the match's
//! scorer and segment, and a labelled [`FeedbackSample`] (good iff the reward
//! is 1) is returned. Any other outcome is only counted: late, duplicate or
//! unknown. [`PartitionEngine::settle_feedback`] drops the matches whose
//! deadline is before the partition's event time — the later of the request
//! and outcome watermarks, so out-of-order outcomes up to the bound still
//! join and state stays bounded without outcome traffic — returning a
//! `noOutcome` sample (no reward) for each that never joined. So every match
//! gets exactly one sample.
//!
//! **Counters** (cumulative, persisted): `requests` (ingested, including
//! too-late ones), `matched` (pairs), `expired` (both reasons),
//! `deadLettered` ([`PartitionEngine::record_dead_letter`]); with feedback:
//! `outcomes` (valid ones read), `joined`, `outcomesLate`,
//! `outcomesDuplicate`, `outcomesUnknown`, `noOutcome`.
//!
//! # Driving it (the Kafka layer)
//!
//! - On acquiring a partition: [`PartitionEngine::restore`] from the
//!   partition's changelog records, then [`Restoring::finish`] with the
//!   pending requests it names, re-read from the request partition
//!   ([`Restoring::replay_range`]), before the first input record.
//! - Per input record: [`PartitionEngine::ingest`] with its offset. `Ok(Some(result))` is a
//!   request settled at once (too late); `Ok(None)` waits for its window;
//!   `Err` (invalid, event time out of range, request id already pending)
//!   goes to the dead-letter topic, then `record_dead_letter`. There is no
//!   separate results buffer: every result is returned by the call that
//!   settled it.
//! - Per outcome record: [`PartitionEngine::ingest_outcome`]; a joined
//!   outcome's sample goes to the rewards topic, `Err` to the dead letters.
//! - Periodically: [`PartitionEngine::due`]`(now)`; call the HTTP scorers of
//!   the windows that name one; then [`PartitionEngine::close`]`(now, answers)`
//!   and [`PartitionEngine::settle_feedback`]`(now)`.
//! - Then [`PartitionEngine::take_changes`] and
//!   [`PartitionEngine::counters`], written with the results and the consumed
//!   offsets in one transaction.
//!
//! # State and changelog
//!
//! [`PartitionEngine::take_changes`] returns the delta since its last call
//! (see [`changelog`] for keys and values); [`PartitionEngine::restore`]
//! rebuilds an engine from all deltas so far (and the pending requests'
//! records) that from then on behaves exactly like the original
//! (property-tested). Pending requests are state by reference: the delta
//! names their offsets, so the request partition must keep its records for
//! at least `maxWaitWindows` windows plus the allowed lateness (any
//! retention in days does). Results are not state: call
//! `take_changes` at the points where the results returned so far are
//! committed with it, in the same transaction.

pub mod bandit;
pub mod changelog;
pub mod config;
pub mod cooldown;
mod digest;
pub mod engine;
mod exact_float;
pub mod feedback;
pub(crate) mod hash;
pub mod matchmaker;
pub mod pairing;
mod pending;
pub mod prescore;
pub mod score;
pub mod users;
pub mod window;

#[cfg(test)]
mod engine_tests;

pub use changelog::RestoreError;
pub use config::{ConfigError, EngineConfig, Scorer, ScorerKind};
pub use engine::{
    DueWindow, HttpScoring, IngestError, OutcomeError, OutcomeFate, PartitionEngine, Restoring,
    WindowId,
};
pub use feedback::FeedbackConfig;

#[cfg(doc)]
use matchfleet_api::feedback::FeedbackSample;
pub use score::{score_batch, score_naive, score_path, FeatureMatrix, ScoreError, ScorePath};
