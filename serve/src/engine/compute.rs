//! One thread in the process runs every engine's decode steps.
//!
//! llama.cpp's CPU backend computes a graph on an OpenMP team owned by the thread that calls
//! it, and its barriers are OpenMP barriers. Each engine decoding on its own thread gave each
//! loaded model a team of its own; libgomp counts every team's threads, and once there are
//! more than cores it stops spinning at barriers almost at once and sleeps instead, so one
//! model decoded at 0.6x of its speed as soon as a second model had decoded once, even while
//! that second model sat idle. With every step on this thread there is one team whatever is
//! loaded, steps of different models take turns in arrival order (a FIFO channel), and an
//! idle model holds no thread that computes. A step costs two channel hand-offs more.

use std::sync::OnceLock;

type Job = Box<dyn FnOnce() + Send>;

/// The compute thread's queue; `None` when the thread could not be started (steps then run
/// on their caller's thread, as before).
static QUEUE: OnceLock<Option<crossbeam_channel::Sender<Job>>> = OnceLock::new();

fn queue() -> Option<&'static crossbeam_channel::Sender<Job>> {
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<Job>();
            match std::thread::Builder::new().name("llama-compute".into()).spawn(move || {
                for job in rx {
                    job();
                }
            }) {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::warn!("cannot start the compute thread ({e}): each engine decodes on its own thread");
                    None
                }
            }
        })
        .as_ref()
}

/// Runs `f` on the compute thread and returns its result; a panic in `f` is resumed here.
/// Owned in and out (`'static`), so the caller lends what the step needs by moving it.
pub(super) fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let Some(tx) = queue() else { return f() };
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let job: Job = Box::new(move || {
        let _ = done_tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    if let Err(crossbeam_channel::SendError(job)) = tx.send(job) {
        // The thread is gone (it never exits while the process runs): run here instead.
        job();
    }
    match done_rx.recv() {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => unreachable!("the compute thread always sends a job's result"),
    }
}
