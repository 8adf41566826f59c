//! The partition loops' threads yield the core to the I/O threads.
//!
//! A match worker's core is shared by the runtime thread that runs every
//! partition loop (ingest, prescoring, window closes: CPU-bound, tens of ms
//! at a time) and the threads a transaction hops through (librdkafka's main
//! and broker threads, the thread the commit waits on), which run for
//! microseconds at a time but sit on the results' path. At equal priority
//! each hop can wait out the runtime thread's time slice; with the runtime
//! thread niced those threads win the core as soon as they wake.
//! Nice is per thread on Linux and, in a pod, only weighs against the pod's
//! own threads (each cgroup gets its share first).
//!
//! A new thread starts with its creator's nice, so a client created on the
//! niced runtime thread would run its librdkafka threads niced too (before
//! this module had a launcher, half of a worker's clients did: every one
//! created after the first partition loop ran). Clients and the
//! transactions' threads are therefore created through [`at_default`], on a
//! thread that is never niced.

use std::cell::Cell;
use std::sync::mpsc;
use std::sync::OnceLock;

/// Nice of the partition loops' threads (0 is the default, 19 the lowest).
const LOOP_NICE: i32 = 10;

thread_local! {
    static NICED: Cell<bool> = const { Cell::new(false) };
}

type Job = Box<dyn FnOnce() + Send>;

/// Lowers the calling thread's priority, once per thread. Best effort: a
/// refusal changes nothing else.
pub fn lower_this_thread() {
    NICED.with(|done| {
        if done.replace(true) {
            return;
        }
        // Before the first thread is niced, so the launcher never is.
        launcher();
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

/// A thread of its own that runs the jobs handed to it, in order.
pub struct JobThread {
    jobs: mpsc::Sender<Job>,
}

impl JobThread {
    /// Starts the thread from the launcher, so it runs at the process's
    /// priority whoever asks for it.
    pub async fn start(name: String) -> anyhow::Result<JobThread> {
        at_default(move || JobThread::spawn(name)).await?
    }

    /// Runs `f` on this thread and returns what it returns.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        run_on(&self.jobs, f).await
    }

    fn spawn(name: String) -> anyhow::Result<JobThread> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new().name(name).spawn(move || {
            // Ends when every sender is gone. A job that panics drops its
            // answer (its caller gets an error) and the thread goes on.
            for job in queue {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })?;
        Ok(JobThread { jobs })
    }
}

/// Runs `f` on the launcher, a thread that is never niced: threads `f`
/// starts (a client's librdkafka threads, a [`JobThread`]) run at the
/// process's priority, not at the partition loop's.
pub async fn at_default<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    match launcher() {
        Some(launcher) => launcher.run(f).await,
        None => Ok(f()),
    }
}

/// The launcher, started on first use (None if the thread could not start:
/// jobs then run where they are asked for).
fn launcher() -> Option<&'static JobThread> {
    static LAUNCHER: OnceLock<Option<JobThread>> = OnceLock::new();
    LAUNCHER
        .get_or_init(|| JobThread::spawn("default-priority".into()).ok())
        .as_ref()
}

async fn run_on<T: Send + 'static>(
    jobs: &mpsc::Sender<Job>,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    // The caller's runtime, entered for the job: creating a StreamConsumer
    // spawns a task on it.
    let runtime = tokio::runtime::Handle::try_current().ok();
    jobs.send(Box::new(move || {
        let _entered = runtime.as_ref().map(|r| r.enter());
        let _ = done.send(f());
    }))
    .map_err(|_| anyhow::anyhow!("the job thread has stopped"))?;
    result
        .await
        .map_err(|_| anyhow::anyhow!("the job thread stopped before finishing the job"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        // SAFETY: one syscall without pointers, on the calling thread's own id.
        #[allow(unsafe_code)]
        unsafe {
            libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
        }
    }

    #[test]
    fn threads_started_by_the_launcher_keep_the_process_priority() {
        // A fresh thread plays the runtime thread: niced by its first loop.
        std::thread::spawn(|| {
            let before = nice_of_this_thread();
            lower_this_thread();
            let niced = nice_of_this_thread();
            if niced == before {
                // Already at the loop's nice or lower (a niced test run):
                // nothing to tell apart.
                return;
            }
            assert_eq!(niced, LOOP_NICE);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let inherited = std::thread::spawn(nice_of_this_thread).join().unwrap();
            let launched = runtime
                .block_on(at_default(|| {
                    std::thread::spawn(nice_of_this_thread).join().unwrap()
                }))
                .unwrap();
            let job_thread = runtime.block_on(async {
                let t = JobThread::start("test-job".into()).await.unwrap();
                t.run(nice_of_this_thread).await.unwrap()
            });
            assert_eq!(
                inherited, LOOP_NICE,
                "a thread starts with its creator's nice"
            );
            assert_eq!(launched, before);
            assert_eq!(job_thread, before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn jobs_run_in_the_caller_s_runtime_and_a_panic_does_not_stop_the_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Creating a StreamConsumer spawns a task on the current runtime.
            let consumer = at_default(|| {
                rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", "127.0.0.1:9")
                    .set("group.id", "priority-test")
                    .create::<rdkafka::consumer::StreamConsumer>()
            })
            .await;
            assert!(matches!(consumer, Ok(Ok(_))));
            let t = JobThread::start("test-jobs".into()).await.unwrap();
            assert!(t.run(|| panic!("a job panics")).await.is_err());
            assert_eq!(t.run(|| 7).await.unwrap(), 7);
        });
    }
}
