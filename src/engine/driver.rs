//! The engine's own thread, and the handle everyone else uses to talk to it.
//!
//! One thread owns the [`Engine`]: it takes commands (add, abort, shut down) from a channel, runs
//! steps while there is work, and sends each request's outputs down that request's own channel.
//! A request whose receiver is gone (the client left) is aborted, which frees its blocks. The
//! thread publishes a heartbeat and the engine's counters through [`EngineStatus`], so that health
//! checks and admission control never have to wait for a step.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::{Engine, EngineStats, RequestId, RequestOutput, ValidRequest};

/// How long the idle loop sleeps between heartbeats.
const IDLE_WAKE: Duration = Duration::from_millis(500);

/// Sees every step, for metrics. Runs on the engine thread, so it must be quick.
pub trait EngineObserver: Send + 'static {
    /// A request reached the engine.
    fn on_request(&mut self, _request: &ValidRequest) {}
    fn on_step(&mut self, stats: &EngineStats, outputs: &[RequestOutput]);
}

enum Command {
    Add { request: Box<ValidRequest>, outputs: UnboundedSender<RequestOutput> },
    Abort(RequestId),
    Shutdown,
}

/// What the engine thread publishes; read without locks.
pub struct EngineStatus {
    started: Instant,
    /// Milliseconds since `started` at the engine loop's last turn.
    heartbeat_ms: AtomicU64,
    alive: AtomicBool,
    num_running: AtomicUsize,
    num_waiting: AtomicUsize,
    /// Commands sent but not yet taken by the engine thread.
    num_pending: AtomicUsize,
    /// Requests (all their sequences) not yet finished.
    num_unfinished: AtomicUsize,
    /// KV-cache usage in millionths.
    kv_usage_ppm: AtomicU64,
    /// Sequences admitted to the queue and not yet scheduled once: reserved by
    /// [`EngineHandle::submit_all`] before they are sent, released by the engine thread once the
    /// scheduler has run them (or they ended first). `--max-queue` limits this.
    num_queued: AtomicUsize,
}

impl EngineStatus {
    fn new() -> EngineStatus {
        EngineStatus {
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            alive: AtomicBool::new(true),
            num_running: AtomicUsize::new(0),
            num_waiting: AtomicUsize::new(0),
            num_pending: AtomicUsize::new(0),
            num_unfinished: AtomicUsize::new(0),
            kv_usage_ppm: AtomicU64::new(0),
            num_queued: AtomicUsize::new(0),
        }
    }

    /// Reserves `n` places in a queue of `max`: all or none, in one atomic step.
    fn reserve(&self, n: usize, max: usize) -> bool {
        self.num_queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |queued| (queued + n <= max).then_some(queued + n))
            .is_ok()
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.num_queued.fetch_sub(n, Ordering::SeqCst);
        }
    }

    /// Sequences admitted and not yet scheduled (what `--max-queue` limits).
    pub fn num_queued(&self) -> usize {
        self.num_queued.load(Ordering::SeqCst)
    }

    fn beat(&self) {
        self.heartbeat_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the engine thread is running and turned its loop within `stall`.
    pub fn is_healthy(&self, stall: Duration) -> bool {
        // The heartbeat may be newer than this reading of the clock.
        let since =
            (self.started.elapsed().as_millis() as u64).saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed));
        self.alive.load(Ordering::Relaxed) && since <= stall.as_millis() as u64
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Sequences waiting to run, counting requests still in the command channel.
    pub fn num_waiting(&self) -> usize {
        self.num_waiting.load(Ordering::Relaxed) + self.num_pending.load(Ordering::Relaxed)
    }

    pub fn num_running(&self) -> usize {
        self.num_running.load(Ordering::Relaxed)
    }

    pub fn num_unfinished(&self) -> usize {
        self.num_unfinished.load(Ordering::Relaxed)
    }

    pub fn kv_cache_usage(&self) -> f64 {
        self.kv_usage_ppm.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// The outputs of one submitted request, in order; ends after every sequence has finished.
pub struct OutputStream {
    rx: UnboundedReceiver<RequestOutput>,
}

impl OutputStream {
    pub fn new(rx: UnboundedReceiver<RequestOutput>) -> OutputStream {
        OutputStream { rx }
    }

    pub async fn next(&mut self) -> Option<RequestOutput> {
        self.rx.recv().await
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the engine has stopped")]
pub struct EngineStopped;

/// Why [`EngineHandle::submit_all`] queued nothing.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full")]
    QueueFull,
    #[error(transparent)]
    Stopped(#[from] EngineStopped),
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    status: Arc<EngineStatus>,
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn(
        engine: Engine,
        observer: Option<Box<dyn EngineObserver>>,
    ) -> (EngineHandle, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let status = Arc::new(EngineStatus::new());
        let thread_status = status.clone();
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // If the loop panics, health checks must see it.
                struct MarkDeadOnExit(Arc<EngineStatus>);
                impl Drop for MarkDeadOnExit {
                    fn drop(&mut self) {
                        self.0.alive.store(false, Ordering::Relaxed);
                    }
                }
                let _mark = MarkDeadOnExit(thread_status.clone());
                run(engine, rx, &thread_status, observer);
            })
            .expect("the engine thread starts");
        (EngineHandle { commands: tx, status }, thread)
    }

    pub fn status(&self) -> &Arc<EngineStatus> {
        &self.status
    }

    /// Queues a checked request, with no queue limit.
    pub fn submit(&self, request: ValidRequest) -> Result<OutputStream, EngineStopped> {
        let (tx, rx) = unbounded_channel();
        match self.submit_all(vec![request], tx, usize::MAX) {
            Ok(()) => Ok(OutputStream { rx }),
            Err(SubmitError::Stopped(e)) => Err(e),
            Err(SubmitError::QueueFull) => unreachable!("an unlimited queue is never full"),
        }
    }

    /// Queues `requests` if their sequences fit in a queue of `max_queue` (sequences admitted and
    /// not yet scheduled): all of them or none, the check and the reservation one atomic step, so
    /// that concurrent submissions never overfill it. Their outputs go to `outputs` (they carry
    /// their ids); dropping its receiver cancels all of them.
    pub fn submit_all(
        &self,
        requests: Vec<ValidRequest>,
        outputs: UnboundedSender<RequestOutput>,
        max_queue: usize,
    ) -> Result<(), SubmitError> {
        let total: usize = requests.iter().map(|r| r.params().n).sum();
        if !self.status.reserve(total, max_queue) {
            return Err(SubmitError::QueueFull);
        }
        let mut left = total;
        for request in requests {
            let n = request.params().n;
            self.status.num_pending.fetch_add(n, Ordering::Relaxed);
            self.status.num_unfinished.fetch_add(1, Ordering::Relaxed);
            if self.commands.send(Command::Add { request: Box::new(request), outputs: outputs.clone() }).is_err() {
                self.status.num_pending.fetch_sub(n, Ordering::Relaxed);
                self.status.num_unfinished.fetch_sub(1, Ordering::Relaxed);
                self.status.release(left);
                return Err(EngineStopped.into());
            }
            left -= n;
        }
        Ok(())
    }

    pub fn abort(&self, id: RequestId) {
        let _ = self.commands.send(Command::Abort(id));
    }

    /// Asks the thread to abort everything and stop.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

struct InFlightRequest {
    outputs: UnboundedSender<RequestOutput>,
    num_unfinished_seqs: usize,
}

fn run(
    mut engine: Engine,
    commands: mpsc::Receiver<Command>,
    status: &EngineStatus,
    mut observer: Option<Box<dyn EngineObserver>>,
) {
    let mut live: HashMap<RequestId, InFlightRequest> = HashMap::new();
    // Queued sequences (`EngineStatus::num_queued`) that the engine holds, not yet scheduled.
    let mut queued_in_engine = 0;
    loop {
        status.beat();
        // Take every waiting command; block (briefly, to keep the heartbeat) only when idle.
        let mut next = if engine.has_unfinished() {
            commands.try_recv().ok()
        } else {
            match commands.recv_timeout(IDLE_WAKE) {
                Ok(command) => Some(command),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                // Every handle is gone and nothing is left to do.
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        let mut outputs = Vec::new();
        while let Some(command) = next.take() {
            match command {
                Command::Add { request, outputs: tx } => {
                    if let Some(observer) = observer.as_mut() {
                        observer.on_request(&request);
                    }
                    queued_in_engine += add(&mut engine, status, &mut live, *request, tx)
                }
                Command::Abort(id) => {
                    outputs.extend(engine.abort_request(&id));
                    finish_request(status, &mut live, &id);
                }
                Command::Shutdown => {
                    for out in engine.abort_all() {
                        if let Some(l) = live.get(&out.request_id) {
                            let _ = l.outputs.send(out);
                        }
                    }
                    status.num_unfinished.fetch_sub(live.len(), Ordering::Relaxed);
                    publish(status, &engine.stats());
                    return;
                }
            }
            next = commands.try_recv().ok();
        }

        // Requests whose client has gone are cancelled before they cost another step.
        outputs.extend(abort_abandoned(&mut engine, status, &mut live));

        if engine.has_unfinished() {
            match engine.step() {
                Ok(step_outputs) => outputs.extend(step_outputs),
                Err(err) => {
                    // A failed forward pass leaves the batch's KV in doubt: fail what was running.
                    tracing::error!(%err, "engine step failed; aborting all requests");
                    outputs.extend(engine.recover_from_failed_step(&err.to_string()));
                }
            }
        }
        let stats = engine.stats();
        publish(status, &stats);
        // Only after the counts are published, so that a request admitted in the room this
        // makes is never counted twice by a reader of the old counts.
        let unstarted = engine.num_unstarted();
        status.release(queued_in_engine - unstarted);
        queued_in_engine = unstarted;
        if let Some(observer) = observer.as_mut() {
            observer.on_step(&stats, &outputs);
        }
        deliver(outputs, status, &mut live);
    }
}

/// Queues a checked request and starts tracking where its outputs go. Returns how many queued
/// sequences the engine now holds for it (none when refused: their places are released).
fn add(
    engine: &mut Engine,
    status: &EngineStatus,
    live: &mut HashMap<RequestId, InFlightRequest>,
    request: ValidRequest,
    outputs: UnboundedSender<RequestOutput>,
) -> usize {
    let (id, n) = (request.id().clone(), request.params().n);
    status.num_pending.fetch_sub(n, Ordering::Relaxed);
    match engine.add_request(request) {
        Ok(()) => {
            live.insert(id, InFlightRequest { outputs, num_unfinished_seqs: n });
            n
        }
        Err(err) => {
            // Only a request id already running is refused: a bug in the caller.
            tracing::error!(request_id = %id, %err, "engine refused a request");
            status.num_unfinished.fetch_sub(1, Ordering::Relaxed);
            status.release(n);
            0
        }
    }
}

/// Aborts the requests whose receiver is gone (the client left); returns their final outputs.
fn abort_abandoned(
    engine: &mut Engine,
    status: &EngineStatus,
    live: &mut HashMap<RequestId, InFlightRequest>,
) -> Vec<RequestOutput> {
    let gone: Vec<RequestId> = live.iter().filter(|(_, l)| l.outputs.is_closed()).map(|(id, _)| id.clone()).collect();
    let mut outputs = Vec::new();
    for id in gone {
        tracing::debug!(request_id = %id, "client gone: request aborted");
        outputs.extend(engine.abort_request(&id));
        finish_request(status, live, &id);
    }
    outputs
}

/// Sends each output to its request's receiver.
fn deliver(outputs: Vec<RequestOutput>, status: &EngineStatus, live: &mut HashMap<RequestId, InFlightRequest>) {
    for out in outputs {
        let id = out.request_id.clone();
        let Some(request) = live.get_mut(&id) else { continue };
        if out.finished() {
            request.num_unfinished_seqs -= 1;
        }
        // A request's last output leaves the status count before it is sent, so whoever receives
        // it never sees the request still counted. A closed receiver is noticed at the top of the
        // next turn.
        if request.num_unfinished_seqs == 0 {
            if let Some(request) = finish_request(status, live, &id) {
                let _ = request.outputs.send(out);
            }
        } else {
            let _ = request.outputs.send(out);
        }
    }
}

/// Forgets a request and takes it out of the status count; hands back its entry.
fn finish_request(
    status: &EngineStatus,
    live: &mut HashMap<RequestId, InFlightRequest>,
    id: &RequestId,
) -> Option<InFlightRequest> {
    let l = live.remove(id)?;
    status.num_unfinished.fetch_sub(1, Ordering::Relaxed);
    Some(l)
}

fn publish(status: &EngineStatus, stats: &EngineStats) {
    status.num_running.store(stats.num_running, Ordering::Relaxed);
    status.num_waiting.store(stats.num_waiting, Ordering::Relaxed);
    status.kv_usage_ppm.store((stats.kv_cache_usage * 1e6).round() as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineRequest, MaxTokens, SamplingParams};
    use crate::launch::{EngineOptions, load_engine};

    #[test]
    fn the_status_follows_the_engine_thread_and_outputs_arrive_in_order() {
        let loaded =
            load_engine(&EngineOptions { num_gpu_blocks_override: Some(64), ..EngineOptions::default() }).unwrap();
        let limits = loaded.engine.limits();
        let (handle, thread) = EngineHandle::spawn(loaded.engine, None);
        assert!(handle.status().is_healthy(Duration::from_secs(5)));
        let params = SamplingParams { max_tokens: MaxTokens::Exact(5), ignore_eos: true, ..SamplingParams::greedy() };
        let request = EngineRequest {
            id: RequestId("r".into()),
            prompt_token_ids: vec![0, 5, 6],
            params,
            arrival: Instant::now(),
        };
        let mut stream = handle.submit(request.validate(&limits).unwrap()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let outputs: Vec<RequestOutput> = runtime.block_on(async {
            let mut all = Vec::new();
            while let Some(out) = stream.next().await {
                all.push(out);
            }
            all
        });
        assert_eq!(outputs.iter().map(|o| o.num_output_tokens).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert!(outputs.last().unwrap().finished());
        assert_eq!(handle.status().num_unfinished(), 0);
        // A dead engine thread is unhealthy, and submitting to it fails.
        handle.shutdown();
        thread.join().unwrap();
        assert!(!handle.status().is_alive());
        assert!(!handle.status().is_healthy(Duration::from_secs(5)));
        let params = SamplingParams::greedy();
        let request =
            EngineRequest { id: RequestId("late".into()), prompt_token_ids: vec![0], params, arrival: Instant::now() };
        assert!(handle.submit(request.validate(&limits).unwrap()).is_err());
    }
}
