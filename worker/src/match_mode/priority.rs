//! The partition loops' threads yield the core to the I/O threads.
//!
//! A match worker's core is shared by the runtime thread that runs every
//! partition loop (ingest, prescoring, window closes: CPU-bound, tens of ms
//! at a time) and the threads a transaction hops through (librdkafka's main
//! and broker threads, the blocking thread the commit waits on), which run
//! for microseconds at a time but sit on the results' path. At equal
//! priority each hop can wait out the runtime thread's time slice; with the
//! runtime thread niced those threads win the core as soon as they wake.
//! Nice is per thread on Linux and, in a pod, only weighs against the pod's
//! own threads (each cgroup gets its share first).

use std::cell::Cell;

/// Nice of the partition loops' threads (0 is the default, 19 the lowest).
const LOOP_NICE: i32 = 10;

thread_local! {
    static NICED: Cell<bool> = const { Cell::new(false) };
}

/// Lowers the calling thread's priority, once per thread. Best effort: a
/// refusal changes nothing else.
pub fn lower_this_thread() {
    NICED.with(|done| {
        if done.replace(true) {
            return;
        }
        // SAFETY: two syscalls without pointers, on the calling thread's own id.
        #[allow(unsafe_code)]
        let ok = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, LOOP_NICE) == 0
        };
        if !ok {
            tracing::debug!("could not lower the partition loop thread's priority");
        }
    });
}
