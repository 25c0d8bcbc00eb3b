//! Ctrl-C. A thread waits for SIGINT (no code runs inside a signal handler): while a
//! generation is registered, SIGINT cancels it (the caller decides what follows: `llama
//! run` exits 130, `llama chat` stays in the chat); with nothing registered the process
//! exits 130 at once, unless an idle action was set (the chat prompt).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use llama_host::Canceller;
use signal_hook::consts::SIGINT;
use signal_hook::iterator::Signals;

type IdleAction = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone, Default)]
pub struct Interrupts {
    current: Arc<Mutex<Option<Canceller>>>,
    idle: Arc<Mutex<Option<IdleAction>>>,
    hit: Arc<AtomicBool>,
}

impl Interrupts {
    pub fn install() -> Interrupts {
        let me = Interrupts::default();
        let this = me.clone();
        match Signals::new([SIGINT]) {
            Ok(mut signals) => {
                std::thread::Builder::new()
                    .name("sigint".into())
                    .spawn(move || {
                        for _ in signals.forever() {
                            this.hit.store(true, Ordering::SeqCst);
                            let current = this.current.lock().map(|c| c.clone()).unwrap_or(None);
                            let idle = this.idle.lock().map(|i| i.clone()).unwrap_or(None);
                            match (current, idle) {
                                (Some(c), _) => c.cancel(),
                                (None, Some(idle)) => idle(),
                                (None, None) => std::process::exit(130),
                            }
                        }
                    })
                    .expect("spawn the signal thread");
            }
            Err(e) => tracing::warn!("Ctrl-C handling unavailable: {e}"),
        }
        me
    }

    /// What Ctrl-C does while no generation is registered (instead of exiting).
    pub fn on_idle(&self, action: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut g) = self.idle.lock() {
            *g = Some(Arc::new(action));
        }
    }

    /// Routes Ctrl-C to `c` until `clear`.
    pub fn watch(&self, c: Canceller) {
        self.hit.store(false, Ordering::SeqCst);
        if let Ok(mut g) = self.current.lock() {
            *g = Some(c);
        }
    }

    /// Stops routing Ctrl-C; returns whether one arrived since `watch`.
    pub fn clear(&self) -> bool {
        if let Ok(mut g) = self.current.lock() {
            *g = None;
        }
        self.hit.swap(false, Ordering::SeqCst)
    }
}
