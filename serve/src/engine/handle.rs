//! A request's side of the engine: its handle (events, cancel on drop), how it ended and
//! its counts. Nothing here touches the model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
    Timeout,
    Error,
}

/// Counts and timings of one request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestStats {
    pub id: u64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub queue_wait: Duration,
    /// From submission to the first token.
    pub time_to_first_token: Option<Duration>,
    pub total: Duration,
    pub finish: Finish,
    /// For `Finish::Error`: what went wrong.
    pub error: Option<String>,
    /// For `Finish::Stop` by a stop string: which one (Anthropic's `stop_sequence`).
    pub stop_sequence: Option<String>,
    /// Speculative decoding: drafted and accepted tokens.
    pub spec: llama_host::spec::SpecStats,
}

/// What a request's handle yields.
#[derive(Debug, Clone)]
pub enum Event {
    Text(String),
    Done(RequestStats),
}

/// A submitted request: iterate it for text, then its `Done`. Dropping it cancels.
pub struct Handle {
    pub(super) id: u64,
    /// The prompt's length in tokens, known at submission.
    pub(super) prompt_tokens: usize,
    pub(super) rx: flume::Receiver<Event>,
    pub(super) cancel: CancelOnDrop,
}

/// Sets a request's cancel flag when dropped: whoever holds the receiving end of a request
/// holds this too, so a consumer that goes away always cancels (a finished request ignores it).
pub(super) struct CancelOnDrop(pub(super) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A request's events as an async stream (see [`Handle::into_stream`]); dropping it cancels.
pub struct EventStream {
    events: flume::r#async::RecvStream<'static, Event>,
    _cancel: CancelOnDrop,
}

impl tokio_stream::Stream for EventStream {
    type Item = Event;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        std::pin::Pin::new(&mut self.events).poll_next(cx)
    }
}

impl Handle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The prompt's length in tokens (what the request's usage will report).
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Cancels the request (also from another thread, via [`Handle::canceller`]).
    pub fn cancel(&self) {
        self.cancel.0.store(true, Ordering::SeqCst);
    }

    pub fn canceller(&self) -> Arc<AtomicBool> {
        self.cancel.0.clone()
    }

    /// The events as an async stream, for a consumer on an async runtime (the HTTP server):
    /// the engine thread wakes the consumer's task directly, no thread waits in between.
    pub fn into_stream(self) -> EventStream {
        EventStream { events: self.rx.into_stream(), _cancel: self.cancel }
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_timeout(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event, awaited on an async runtime (the HTTP server's): no thread waits.
    /// `None` once the request has ended and its events are read.
    pub async fn recv(&self) -> Option<Event> {
        self.rx.recv_async().await.ok()
    }

    /// Reads to the end, asynchronously: all text and the final stats.
    pub async fn collect_async(self) -> (String, RequestStats) {
        let mut text = String::new();
        while let Some(ev) = self.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done(s) => return (text, s),
            }
        }
        (text, self.engine_gone())
    }

    /// Reads to the end: all text and the final stats.
    pub fn collect(self) -> (String, RequestStats) {
        let mut text = String::new();
        for ev in self.rx.iter() {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done(s) => return (text, s),
            }
        }
        let stats = self.engine_gone();
        (text, stats)
    }

    /// The stats of a request whose engine thread went away without a `Done`.
    fn engine_gone(&self) -> RequestStats {
        RequestStats {
            id: self.id,
            prompt_tokens: 0,
            cached_tokens: 0,
            generated_tokens: 0,
            queue_wait: Duration::ZERO,
            time_to_first_token: None,
            total: Duration::ZERO,
            finish: Finish::Error,
            error: Some("the engine stopped".into()),
            stop_sequence: None,
            spec: Default::default(),
        }
    }
}

impl Iterator for Handle {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.rx.recv().ok()
    }
}

