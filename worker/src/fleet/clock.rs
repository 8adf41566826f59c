//! A monotonic millisecond clock for lease deadlines. Wall time can jump;
//! `Instant` does not, and it keeps running while the process is stopped
//! (SIGSTOP), so a frozen worker sees on waking that its leases ran out.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Milliseconds since this process first asked.
pub fn now() -> u64 {
    origin().elapsed().as_millis() as u64
}

/// The `Instant` of a reading of [`now`].
pub fn instant(millis: u64) -> Instant {
    origin() + Duration::from_millis(millis)
}
