//! The engine thread: owns the context, admits queued requests into slots, plans and runs
//! one batched decode step at a time, and hands each request its text.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use flume::TrySendError;
use llama_host::spec::{ngram_draft, DraftCap, Drafter, SpecMode, SpecStats};
use llama_host::{BatchToken, ContextOps, GenerateOptions, Model, SampleRequest, TextOutput};

use super::handle::{Event, Finish, RequestStats};
use super::plan::{plan_batch, plan_invariant, Part, SlotState};
use crate::metrics::{Metrics, Outcome};

/// Most tokens of an embedding batch while streams generate (`Worker::embed_turn`).
const EMBED_BUDGET_BESIDE_STREAMS: u32 = 64;
/// Most tokens of an embedding batch otherwise: a stream that arrives waits for at most one
/// such batch (on this machine 256 tokens embed as fast per token as 512, or faster).
const EMBED_BUDGET: u32 = 256;
/// Most tokens of a generation step in batch-invariant mode, padding included: from 64
/// queries on (`GGML_FA_TILE_Q`) llama.cpp's CPU flash attention takes its tiled path,
/// whose sums differ from the one a lone token takes, so drafts stay below it.
const INVARIANT_STEP_TOKENS: usize = 63;

pub(super) struct Job {
    /// `request{id}`: every log line about this request is inside it.
    pub(super) span: tracing::Span,
    pub(super) id: u64,
    pub(super) tokens: Vec<i32>,
    pub(super) opts: GenerateOptions,
    pub(super) deadline: Option<Instant>,
    pub(super) submitted: Instant,
    pub(super) tx: flume::Sender<Event>,
    pub(super) cancel: Arc<AtomicBool>,
}

pub(super) enum Msg {
    Job(Box<Job>),
    Embed(Box<super::embed::EmbedJob>),
    /// Report KV usage as llama.cpp sees it and as the engine accounts for it.
    Inspect(Sender<KvUsage>),
    Shutdown,
}

/// KV cache usage, read on the engine thread between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvUsage {
    /// Positions llama.cpp holds, summed over the sequences.
    pub backend_tokens: usize,
    /// Tokens the engine's slots account for (prefix cache + running requests).
    pub accounted_tokens: usize,
    pub active: usize,
    pub waiting: usize,
}

struct Active {
    job: Job,
    /// Prompt tokens decoded so far (including reused ones).
    prompt_done: usize,
    cached: usize,
    generated: usize,
    last: Option<i32>,
    /// A text piece the consumer has not taken yet (its channel was full).
    pending: Option<Event>,
    /// Since when `pending` has waited: past the stall timeout the request is dropped.
    paused_since: Option<Instant>,
    text: TextOutput,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    order: u64,
    /// Drafted and accepted tokens so far (speculative decoding).
    spec: SpecStats,
    /// How long its next draft may be.
    cap: Option<DraftCap>,
}

struct Slot {
    seq: i32,
    /// Tokens this slot's sequence holds in the KV cache.
    cached: Vec<i32>,
    active: Option<Active>,
}

impl Slot {
    fn new(seq: i32) -> Slot {
        Slot { seq, cached: Vec::new(), active: None }
    }

    fn state(&self) -> SlotState {
        match &self.active {
            None => SlotState::Idle,
            Some(a) if a.prompt_done < a.job.tokens.len() => SlotState::Prefill { remaining: a.job.tokens.len() - a.prompt_done },
            Some(a) => SlotState::Generate { ready: a.pending.is_none() },
        }
    }
}

pub(super) struct Worker {
    model: Arc<Model>,
    ctx: Ctx,
    slots: Vec<Slot>,
    waiting: VecDeque<Job>,
    rx: Receiver<Msg>,
    in_flight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    n_batch: u32,
    slot_ctx: u32,
    prefix_cache: bool,
    /// Final events of finished requests whose consumer has not made room yet.
    draining: Vec<(flume::Sender<Event>, VecDeque<Event>, Instant)>,
    /// How long a consumer may leave its text untaken before its request is dropped.
    stall_timeout: Duration,
    /// Batch-invariant mode: (padding sequence, padding token).
    pad: Option<(i32, i32)>,
    /// Embedding requests and their context.
    embeds: super::embed::EmbedQueue,
    /// Time spent on embedding batches and on generation steps while both had work: an
    /// embedding batch runs only while it has had no more than generation (see
    /// `embed_turn`).
    embed_us: u64,
    gen_us: u64,
    /// The draft model's context, for requests speculating with it.
    drafter: Option<Drafter>,
}

fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Worker {
    pub(super) fn new(
        model: Arc<Model>,
        ctx: Box<dyn ContextOps>,
        drafter: Option<Drafter>,
        config: &super::EngineConfig,
        rx: Receiver<Msg>,
        in_flight: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
        slot_ctx: u32,
        embeds: super::embed::EmbedQueue,
    ) -> Worker {
        let slots = config.slots;
        Worker {
            pad: config.batch_invariant.then(|| (slots as i32, model.info().bos.max(0))),
            model,
            ctx: Ctx::new(ctx),
            slots: (0..slots).map(|i| Slot::new(i as i32)).collect(),
            waiting: VecDeque::new(),
            rx,
            in_flight,
            metrics,
            n_batch: config.size.n_batch.min(config.size.n_ctx).max(1),
            slot_ctx,
            prefix_cache: config.prefix_cache,
            draining: Vec::new(),
            stall_timeout: config.stall_timeout,
            embeds,
            embed_us: 0,
            gen_us: 0,
            drafter,
        }
    }

    pub(super) fn run(mut self) {
        let mut order_counter = 0u64;
        let mut shutting_down = false;
        loop {
            // 1. Take new requests; block only when there is nothing to do.
            if shutting_down {
                self.cancel_everything();
                return;
            }
            let busy = self.slots.iter().any(|s| s.active.is_some()) || !self.waiting.is_empty() || !self.embeds.is_empty();
            if !busy && !self.draining.is_empty() {
                // Only final events wait for slow consumers: poll for them and for new work.
                if let Ok(m) = self.rx.recv_timeout(Duration::from_millis(5)) {
                    self.handle(m, &mut shutting_down);
                }
                self.flush_draining();
                continue;
            }
            let first = if busy {
                match self.rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        shutting_down = true;
                        None
                    }
                }
            } else {
                match self.rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                }
            };
            let mut msgs: Vec<Msg> = first.into_iter().collect();
            while let Ok(m) = self.rx.try_recv() {
                msgs.push(m);
            }
            for m in msgs {
                self.handle(m, &mut shutting_down);
            }
            if shutting_down {
                continue;
            }

            // 2. Drop what was cancelled or timed out; deliver pending text.
            self.expire();

            // Embedding batches take turns with generation steps (see `embed.rs`).
            self.embeds.expire();
            self.embed_turn();

            // 3. Give free slots to waiting requests, oldest first.
            while let Some(free) = self.pick_slot() {
                let Some(job) = self.waiting.pop_front() else { break };
                order_counter += 1;
                self.assign(free, job, order_counter);
            }

            // 4. One batched decode step.
            let states: Vec<SlotState> = self.slots.iter().map(Slot::state).collect();
            let mut order: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].active.is_some()).collect();
            order.sort_by_key(|&i| self.slots[i].active.as_ref().map_or(0, |a| a.order));
            let plan = match self.pad {
                None => plan_batch(&states, &order, self.n_batch as usize),
                Some(_) => plan_invariant(&states, &order, self.n_batch as usize - 1),
            };
            if plan.is_empty() {
                // A slot that could run but was planned nothing would spin here forever (a
                // zero budget, say): fail it rather than loop.
                let stuck: Vec<usize> =
                    (0..states.len()).filter(|&i| matches!(states[i], SlotState::Prefill { .. } | SlotState::Generate { ready: true })).collect();
                for i in stuck {
                    self.finish(i, Finish::Error, Some("the engine could not schedule this request (batch size too small)".into()));
                }
                if self.slots.iter().any(|s| s.active.is_some()) {
                    // Everyone is paused on a slow consumer: wait a little, or for a new request.
                    if let Ok(m) = self.rx.recv_timeout(Duration::from_millis(2)) {
                        self.handle(m, &mut shutting_down);
                    }
                }
                continue;
            }
            let t = Instant::now();
            self.step(&plan);
            if !self.embeds.is_empty() {
                self.gen_us += t.elapsed().as_micros() as u64;
            }
        }
    }

    /// Runs an embedding batch when it is embeddings' turn. With no stream generating, every
    /// loop runs one of up to the context's size. While streams generate, batches are
    /// smaller ([`EMBED_BUDGET_BESIDE_STREAMS`] tokens) and run only while embeddings have
    /// had no more time than generation: a large embedding request slows the streams to
    /// about half their speed at worst, never to a stop, and still progresses.
    fn embed_turn(&mut self) {
        if self.embeds.is_empty() {
            self.embed_us = 0;
            self.gen_us = 0;
            return;
        }
        // Streams that can step now; one paused on a slow reader does not count (it would
        // never add generation time, and embeddings would wait for its stall timeout).
        let streams = self.slots.iter().any(|s| matches!(s.state(), SlotState::Prefill { .. } | SlotState::Generate { ready: true }));
        if !streams {
            self.embed_us = 0;
            self.gen_us = 0;
            self.embeds.step(EMBED_BUDGET);
            return;
        }
        if self.embed_us > self.gen_us {
            return;
        }
        let t = Instant::now();
        self.embeds.step(EMBED_BUDGET_BESIDE_STREAMS);
        self.embed_us += t.elapsed().as_micros() as u64;
    }

    /// Shutdown: every queued and running request ends `Cancelled` (paused ones too), and
    /// what can be delivered of their final events is, without waiting for anyone.
    fn cancel_everything(&mut self) {
        self.embeds.cancel_all();
        for job in &self.waiting {
            job.cancel.store(true, Ordering::SeqCst);
        }
        // Ends the queued ones (each gets its Done) and delivers pending text.
        self.expire();
        for i in 0..self.slots.len() {
            self.finish(i, Finish::Cancelled, None);
        }
        self.flush_draining();
    }

    /// The KV-tokens gauge: what the slots hold (prefix caches and running requests).
    fn publish_kv(&self) {
        let kv: usize = self.slots.iter().map(|s| s.cached.len()).sum();
        self.metrics.kv_tokens.store(kv as i64, Ordering::Relaxed);
    }

    fn handle(&mut self, m: Msg, shutting_down: &mut bool) {
        match m {
            Msg::Job(job) => self.waiting.push_back(*job),
            Msg::Embed(job) => self.embeds.push(*job),
            Msg::Shutdown => *shutting_down = true,
            Msg::Inspect(reply) => {
                let backend_tokens = self.slots.iter().map(|s| (self.ctx.seq_pos_max(s.seq) + 1).max(0) as usize).sum();
                let accounted_tokens = self.slots.iter().map(|s| s.cached.len()).sum();
                let active = self.slots.iter().filter(|s| s.active.is_some()).count();
                let _ = reply.try_send(KvUsage { backend_tokens, accounted_tokens, active, waiting: self.waiting.len() });
            }
        }
    }

    /// A free slot, preferring the one whose cache shares the longest prefix with the next
    /// waiting prompt.
    fn pick_slot(&self) -> Option<usize> {
        let next = self.waiting.front()?;
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .max_by_key(|(i, s)| (if self.prefix_cache { common_prefix(&s.cached, &next.tokens) } else { 0 }, usize::MAX - i))
            .map(|(i, _)| i)
    }

    fn assign(&mut self, i: usize, job: Job, order: u64) {
        self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        self.metrics.active_sequences.fetch_add(1, Ordering::Relaxed);
        let wait = job.submitted.elapsed();
        self.metrics.queue_wait.observe(wait.as_secs_f64());
        self.metrics.prompt_tokens.fetch_add(job.tokens.len() as u64, Ordering::Relaxed);
        let slot = &mut self.slots[i];
        let seq = slot.seq;
        // Reuse the shared prefix (at least one prompt token is decoded, for logits).
        let mut keep = if self.prefix_cache { common_prefix(&slot.cached, &job.tokens).min(job.tokens.len() - 1) } else { 0 };
        if !(self.ctx.seq_remove(seq, keep as i32, -1) && self.ctx.seq_can_continue(seq, keep as i32)) {
            self.ctx.seq_remove(seq, 0, -1);
            keep = 0;
        }
        slot.cached.truncate(keep);
        self.metrics.cached_prompt_tokens.fetch_add(keep as u64, Ordering::Relaxed);
        let sampler = self.ctx.set_seq_sampling(seq, &job.opts.sampling, &job.tokens);
        job.span.in_scope(|| tracing::info!(slot = i, queue_wait_ms = wait.as_secs_f64() * 1e3, cached = keep, "prefill"));
        let text = TextOutput::new(&job.opts.stop);
        let cap = job.opts.spec.as_ref().map(DraftCap::new);
        slot.active = Some(Active {
            job,
            prompt_done: keep,
            cached: keep,
            generated: 0,
            last: None,
            pending: None,
            paused_since: None,
            text,
            started: Instant::now(),
            first_token: None,
            last_token: None,
            order,
            spec: SpecStats::default(),
            cap,
        });
        if let Err(e) = sampler {
            self.finish(i, Finish::Error, Some(e.to_string()));
        } else if self.slots[i].active.as_ref().is_some_and(|a| a.job.opts.max_tokens == Some(0)) {
            // Nothing to generate: the request ends here, as `max_tokens` says, rather than
            // after the one token a decode step would sample.
            self.finish(i, Finish::Length, None);
        }
    }

    fn flush_draining(&mut self) {
        let stall = self.stall_timeout;
        self.draining.retain_mut(|(tx, events, since)| {
            if since.elapsed() >= stall {
                // A consumer that never took its final events: drop them (its channel
                // disconnects, which it reads as the end).
                return false;
            }
            while let Some(ev) = events.pop_front() {
                match tx.try_send(ev) {
                    Ok(()) => {}
                    Err(TrySendError::Full(ev)) => {
                        events.push_front(ev);
                        return true;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            }
            false
        });
    }

    /// Finishes cancelled, timed-out and disconnected requests; flushes pending text.
    fn expire(&mut self) {
        self.flush_draining();
        let now = Instant::now();
        let metrics = self.metrics.clone();
        let in_flight = self.in_flight.clone();
        self.waiting.retain(|job| {
            let timed_out = job.deadline.is_some_and(|d| now >= d);
            if job.cancel.load(Ordering::SeqCst) || timed_out {
                let finish = if timed_out { Finish::Timeout } else { Finish::Cancelled };
                // Accounting before the Done, as in `finish`.
                metrics.count(if timed_out { Outcome::Timeout } else { Outcome::Cancelled });
                metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let _ = job.tx.try_send(Event::Done(RequestStats {
                    id: job.id,
                    prompt_tokens: job.tokens.len(),
                    cached_tokens: 0,
                    generated_tokens: 0,
                    queue_wait: job.submitted.elapsed(),
                    time_to_first_token: None,
                    total: job.submitted.elapsed(),
                    finish,
                    error: None,
                    stop_sequence: None,
                    spec: Default::default(),
                }));
                job.span.in_scope(|| tracing::info!(?finish, "ended while queued"));
                false
            } else {
                true
            }
        });
        for i in 0..self.slots.len() {
            let Some(a) = self.slots[i].active.as_mut() else { continue };
            if let Some(ev) = a.pending.take() {
                match a.job.tx.try_send(ev) {
                    Ok(()) => a.paused_since = None,
                    Err(TrySendError::Full(ev)) => a.pending = Some(ev),
                    Err(TrySendError::Disconnected(_)) => a.job.cancel.store(true, Ordering::SeqCst),
                }
            }
            let timed_out = a.job.deadline.is_some_and(|d| now >= d);
            let stalled = a.paused_since.is_some_and(|t| now.duration_since(t) >= self.stall_timeout);
            if timed_out {
                self.finish(i, Finish::Timeout, None);
            } else if a.job.cancel.load(Ordering::SeqCst) {
                self.finish(i, Finish::Cancelled, None);
            } else if stalled {
                a.job.span.in_scope(|| tracing::warn!(stall_timeout_s = self.stall_timeout.as_secs_f64(), "the consumer took no text for the stall timeout: cancelled"));
                self.finish(i, Finish::Cancelled, None);
            }
        }
    }

    /// The drafts of every generating slot of `plan` that speculates, within what the
    /// batch has left after the plan (`drafts[k]` for `plan[k]`).
    fn drafts(&mut self, plan: &[(usize, Part)]) -> Vec<Vec<i32>> {
        let mut drafts = vec![Vec::new(); plan.len()];
        let planned: usize = plan.iter().map(|(_, p)| match p {
            Part::Token => 1,
            Part::Prompt(n) => *n,
        }).sum();
        let mut spare = match self.pad {
            None => (self.n_batch as usize).saturating_sub(planned),
            // The padding token counts, and the step stays under flash attention's tile.
            Some(_) => (self.n_batch as usize - 1).min(INVARIANT_STEP_TOKENS - 1).saturating_sub(planned),
        };
        // Draft-model requests: (plan index, sequence, history, most drafts, its settings).
        let mut wanted = Vec::new();
        for (k, &(i, part)) in plan.iter().enumerate() {
            if part != Part::Token || spare == 0 {
                continue;
            }
            let slot = &self.slots[i];
            let a = slot.active.as_ref().expect("planned slots are active");
            let Some(spec) = a.job.opts.spec else { continue };
            // Position of the token to decode (`last`); the drafts follow it. One cell stays
            // for the token sampled after them, and the token limit's last token is always
            // sampled, never drafted, so no draft reaches past the limit.
            let pos = slot.cached.len();
            let left = a.job.opts.max_tokens.map(|m| (m as usize).saturating_sub(a.generated));
            let room = spec.room(a.cap, (self.slot_ctx as usize).saturating_sub(pos + 1), spare, left);
            if room == 0 {
                continue;
            }
            let mut history = Vec::with_capacity(pos + 1);
            history.extend_from_slice(&slot.cached);
            history.push(a.last.expect("a generating slot has a token"));
            match spec.mode {
                SpecMode::Ngram => {
                    let d = spec.usable(ngram_draft(&history, spec.ngram_n as usize, room));
                    spare -= d.len();
                    drafts[k] = d;
                }
                SpecMode::Draft => {
                    spare -= room;
                    wanted.push((k, slot.seq, history, room as u32, spec));
                }
            }
        }
        let drafter = if wanted.is_empty() { None } else { self.drafter.take() };
        if let Some(drafter) = drafter {
            // Drafting decodes on the draft model's context: on the compute thread, as steps.
            let (drafter, results) = super::compute::run(move || {
                let mut drafter = drafter;
                let results: Vec<_> = wanted.into_iter().map(|(k, seq, history, n, spec)| (k, spec, drafter.draft(seq, &history, n, spec.p_min))).collect();
                (drafter, results)
            });
            self.drafter = Some(drafter);
            for (k, spec, r) in results {
                match r {
                    Ok(d) => drafts[k] = spec.usable(d),
                    // Drafting is an optimisation: a failure costs speed, never the request.
                    Err(e) => tracing::warn!(error = %e, "drafting failed; this step verifies no drafts"),
                }
            }
        }
        drafts
    }

    fn step(&mut self, plan: &[(usize, Part)]) {
        let drafts = self.drafts(plan);
        let mut batch = Vec::new();
        let mut samples = Vec::new();
        // The slot each sample request is for, in the same order as `samples`, and the
        // drafts it carries.
        let mut sampled_slots = Vec::new();
        for (k, &(i, part)) in plan.iter().enumerate() {
            let slot = &self.slots[i];
            let a = slot.active.as_ref().expect("planned slots are active");
            match part {
                Part::Token => {
                    let pos = (a.job.tokens.len() + a.generated - 1) as i32;
                    batch.push(BatchToken { token: a.last.expect("a generating slot has a token"), pos, seq: slot.seq, logits: true });
                    let index = batch.len() as i32 - 1;
                    let d = &drafts[k];
                    batch.extend(d.iter().enumerate().map(|(j, &token)| BatchToken { token, pos: pos + 1 + j as i32, seq: slot.seq, logits: true }));
                    samples.push(SampleRequest { seq: slot.seq, index, n_draft: d.len() as u32 });
                    sampled_slots.push((i, k));
                }
                Part::Prompt(n) => {
                    let start = a.prompt_done;
                    let end = start + n;
                    for (k, &t) in a.job.tokens[start..end].iter().enumerate() {
                        let last = end == a.job.tokens.len() && start + k + 1 == end;
                        batch.push(BatchToken { token: t, pos: (start + k) as i32, seq: slot.seq, logits: last });
                    }
                    if end == a.job.tokens.len() {
                        samples.push(SampleRequest::new(slot.seq, batch.len() as i32 - 1));
                        sampled_slots.push((i, k));
                    }
                }
            }
        }
        if let Some((seq, token)) = self.pad {
            // Last in the batch, so its KV cell is the newest and is freed right after.
            batch.push(BatchToken { token, pos: 0, seq, logits: true });
        }
        let t = Instant::now();
        // The step runs on the process's compute thread (`compute.rs`): the context and the
        // batch are lent to it and come back with the result.
        let mut ctx = self.ctx.lend();
        let (ctx, samples, result) = super::compute::run(move || {
            let result = ctx.step(&batch, &samples);
            (ctx, samples, result)
        });
        self.ctx.give_back(ctx);
        if let Some((seq, _)) = self.pad {
            self.ctx.seq_remove(seq, 0, -1);
        }
        self.metrics.busy_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        let sampled = match result {
            Ok(s) if s.len() == samples.len() => s,
            // A backend that breaks the step's contract fails the step's requests, not the
            // engine thread.
            Ok(s) => return self.fail_step(plan, format!("the backend returned {} sampled tokens for {} requests", s.len(), samples.len())),
            // A remote device lost: the model cannot compute any more (the registry unloads
            // and reloads it); clients are not told the operator's addresses.
            Err(e @ llama_host::BackendError::Rpc { .. }) => {
                tracing::error!(error = %e, "the model lost a remote device");
                return self.fail_step(plan, "an RPC server the model is placed on was lost (the server's log names it); the model loads again for the next request".into());
            }
            // A failed step fails the requests in it; the others carry on.
            Err(e) => return self.fail_step(plan, e.to_string()),
        };
        // Account for what landed in each slot's cache.
        for &(i, part) in plan {
            let slot = &mut self.slots[i];
            let a = slot.active.as_mut().expect("planned slots are active");
            match part {
                Part::Token => slot.cached.push(a.last.expect("token")),
                Part::Prompt(n) => {
                    slot.cached.extend_from_slice(&a.job.tokens[a.prompt_done..a.prompt_done + n]);
                    a.prompt_done += n;
                }
            }
        }
        for ((i, k), s) in sampled_slots.into_iter().zip(sampled) {
            match s {
                Ok(s) => {
                    // The accepted drafts are in the cache after `last`; the backend removed
                    // the rejected ones.
                    let d = &drafts[k];
                    let accepted = &d[..(s.accepted as usize).min(d.len())];
                    self.slots[i].cached.extend_from_slice(accepted);
                    if !d.is_empty() {
                        self.metrics.spec_draft_tokens.fetch_add(d.len() as u64, Ordering::Relaxed);
                        self.metrics.spec_accepted_tokens.fetch_add(accepted.len() as u64, Ordering::Relaxed);
                        if let Some(a) = self.slots[i].active.as_mut() {
                            a.spec.drafted += d.len();
                            a.spec.accepted += accepted.len();
                            if let Some(cap) = &mut a.cap {
                                cap.update(d.len(), accepted.len());
                            }
                        }
                    }
                    self.accept(i, accepted.to_vec(), s)
                }
                // One sequence's sampling failed (its grammar reached a dead end): only its
                // request ends; the others of the step got their tokens and carry on.
                Err(e) => {
                    let slot = &self.slots[i];
                    if let Some(a) = &slot.active {
                        a.job.span.in_scope(|| tracing::info!(error = %e, "sampling failed"));
                    }
                    self.finish(i, Finish::Error, Some(e.to_string()));
                }
            }
        }
        self.publish_kv();
    }

    /// Ends every request of a failed step with `Finish::Error` and the reason.
    fn fail_step(&mut self, plan: &[(usize, Part)], msg: String) {
        tracing::warn!(error = %msg, "decode step failed");
        for &(i, _) in plan {
            self.finish(i, Finish::Error, Some(msg.clone()));
        }
    }

    /// Handles the accepted drafts and then the sampled token of slot `i`, each as if it
    /// had been its own step: the first stop string, the token limit or a full slot ends
    /// the output exactly where it would have without drafts. The text of the step goes to
    /// the consumer as one piece.
    fn accept(&mut self, i: usize, accepted: Vec<i32>, s: llama_host::Sampled) {
        let mut text = String::new();
        for token in accepted {
            if let Some((finish, error)) = self.take(i, llama_host::Sampled { token, is_eog: false, accepted: 0 }, &mut text) {
                return self.end_with(i, text, finish, error);
            }
        }
        match self.take(i, s, &mut text) {
            Some((finish, error)) => self.end_with(i, text, finish, error),
            None => self.emit(i, text),
        }
    }

    fn end_with(&mut self, i: usize, text: String, finish: Finish, error: Option<String>) {
        self.emit(i, text);
        self.finish(i, finish, error);
    }

    /// One output token of slot `i`: its text is appended to `text`; `Some` when the
    /// request ends with it.
    fn take(&mut self, i: usize, s: llama_host::Sampled, text: &mut String) -> Option<(Finish, Option<String>)> {
        let now = Instant::now();
        let slot_ctx = self.slot_ctx as usize;
        let a = self.slots[i].active.as_mut().expect("active");
        if a.first_token.is_none() {
            a.first_token = Some(now);
            let ttft = now.duration_since(a.job.submitted).as_secs_f64();
            self.metrics.time_to_first_token.observe(ttft);
            a.job.span.in_scope(|| tracing::debug!(ttft_ms = ttft * 1e3, "decode"));
        } else if let Some(prev) = a.last_token {
            self.metrics.inter_token_latency.observe(now.duration_since(prev).as_secs_f64());
        }
        a.last_token = Some(now);
        if s.is_eog {
            text.push_str(&a.text.flush());
            return Some((Finish::Stop, None));
        }
        a.generated += 1;
        a.last = Some(s.token);
        self.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let bytes = match self.model.token_bytes(s.token, false) {
            Ok(b) => b,
            Err(e) => return Some((Finish::Error, Some(e.to_string()))),
        };
        let a = self.slots[i].active.as_mut().expect("active");
        let (piece, stopped) = a.text.push(&bytes);
        text.push_str(&piece);
        if stopped {
            return Some((Finish::Stop, None));
        }
        let at_limit = a.job.opts.max_tokens.is_some_and(|m| a.generated >= m as usize);
        let full = a.job.tokens.len() + a.generated >= slot_ctx;
        if at_limit || full {
            text.push_str(&a.text.flush());
            return Some((Finish::Length, None));
        }
        None
    }

    /// Hands text to the consumer, or parks it (pausing the sequence) if it is not reading.
    fn emit(&mut self, i: usize, text: String) {
        if text.is_empty() {
            return;
        }
        let a = self.slots[i].active.as_mut().expect("active");
        match a.job.tx.try_send(Event::Text(text)) {
            Ok(()) => {}
            Err(TrySendError::Full(ev)) => {
                a.pending = Some(ev);
                a.paused_since.get_or_insert_with(Instant::now);
            }
            Err(TrySendError::Disconnected(_)) => a.job.cancel.store(true, Ordering::SeqCst),
        }
    }

    /// Ends slot `i`'s request, frees the slot, and for cancelled, timed-out or failed
    /// requests also its KV cells.
    fn finish(&mut self, i: usize, finish: Finish, error: Option<String>) {
        let slot = &mut self.slots[i];
        let Some(mut a) = slot.active.take() else { return };
        if matches!(finish, Finish::Cancelled | Finish::Timeout | Finish::Error) || !self.prefix_cache {
            self.ctx.seq_remove(slot.seq, 0, -1);
            slot.cached.clear();
        }
        let stats = RequestStats {
            id: a.job.id,
            prompt_tokens: a.job.tokens.len(),
            cached_tokens: a.cached,
            generated_tokens: a.generated,
            queue_wait: a.started.duration_since(a.job.submitted),
            time_to_first_token: a.first_token.map(|t| t.duration_since(a.job.submitted)),
            total: a.job.submitted.elapsed(),
            finish,
            error,
            stop_sequence: a.text.stopped_by().map(str::to_string),
            spec: a.spec,
        };
        a.job.span.in_scope(|| {
            tracing::info!(
                ?finish,
                generated = stats.generated_tokens,
                drafted = stats.spec.drafted,
                accepted = stats.spec.accepted,
                total_ms = stats.total.as_secs_f64() * 1e3,
                "finished"
            )
        });
        // Accounting first: a consumer that has read its Done may submit again at once and
        // must find the admission slot free.
        self.metrics.count(match finish {
            Finish::Stop => Outcome::Stop,
            Finish::Length => Outcome::Length,
            Finish::Cancelled => Outcome::Cancelled,
            Finish::Timeout => Outcome::Timeout,
            Finish::Error => Outcome::Error,
        });
        self.metrics.active_sequences.fetch_sub(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.publish_kv();
        // The final text and Done go out as the consumer makes room, without holding up
        // the others; a consumer that is gone is dropped.
        let mut rest: VecDeque<Event> = a.pending.take().into_iter().collect();
        rest.push_back(Event::Done(stats));
        self.draining.push((a.job.tx.clone(), rest, Instant::now()));
        self.flush_draining();
    }
}


/// The engine's context, lent to the compute thread for each decode step (`compute.rs`)
/// and used in place for everything else (sequence edits, samplers).
pub(super) struct Ctx(Option<Box<dyn ContextOps>>);

impl Ctx {
    pub(super) fn new(ctx: Box<dyn ContextOps>) -> Ctx {
        Ctx(Some(ctx))
    }

    fn lend(&mut self) -> Box<dyn ContextOps> {
        self.0.take().expect("the context is lent only for a step, which returns it")
    }

    fn give_back(&mut self, ctx: Box<dyn ContextOps>) {
        self.0 = Some(ctx);
    }
}

impl std::ops::Deref for Ctx {
    type Target = dyn ContextOps;
    fn deref(&self) -> &Self::Target {
        self.0.as_deref().expect("the context is lent only for a step, which returns it")
    }
}

impl std::ops::DerefMut for Ctx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_deref_mut().expect("the context is lent only for a step, which returns it")
    }
}
