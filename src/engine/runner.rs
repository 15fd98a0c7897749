//! The engine thread: it owns a `World` and a `Schedule` built from a pipeline file, and
//! runs one schedule pass per tick.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bevy_ecs::prelude::*;
use bevy_ecs::schedule::ScheduleConfigs;
use bevy_ecs::system::ScheduleSystem;
use bevy_ecs::system::SystemId;

use crate::engine::components::{Outbox, Phase, Request, SessionCache, StreamTx};
use crate::engine::observe::{self, EngineTelemetry};
use crate::engine::pipeline::{PipelineSpec, Stage};
use crate::engine::resources::*;
use crate::engine::scheduler;
use crate::engine::systems;
use crate::error::{ApiError, ErrorKind};
use crate::kv::cache::KvCache;
use crate::model::runtime::ModelRuntime;
use crate::protocol::{EngineCommand, FinishReason};
use crate::tokenizer::GgufTokenizer;
use crate::types::{MonotonicOrigin, Timestamp};

/// How long an idle engine sleeps between checks of idle-session TTLs.
const IDLE_WAKE: Duration = Duration::from_millis(500);
/// How long a tick that could do nothing (every stream paused) waits before retrying.
const STALLED_WAIT: Duration = Duration::from_millis(2);

/// What an engine needs to run one model.
pub struct EngineParts {
    pub model: Arc<dyn ModelRuntime>,
    pub tokenizer: Arc<GgufTokenizer>,
    pub kv: KvCache,
    pub limits: EngineLimits,
    /// Per-tenant weights and limits (config `tenants`).
    pub tenants: scheduler::TenantLimits,
    pub pipeline: PipelineSpec,
    pub policies: Policies,
    /// Room in the command inbox for commands other than generations (cancel, close
    /// session); generations get `limits.high_watermark` more, so the inbox never fills
    /// before admission says no.
    pub control_capacity: usize,
    pub max_queue_delay: Duration,
    /// Metric handles and liveness heartbeat for this engine.
    pub telemetry: EngineTelemetry,
}

/// The gateway's handle on an engine thread.
pub struct EngineHandle {
    tx: SyncSender<EngineCommand>,
    thread: Option<JoinHandle<()>>,
    pub status: Arc<EngineStatus>,
    /// Generations sent but not yet taken from the inbox by the engine.
    pending: Arc<AtomicUsize>,
    /// Generations queued (in the engine or its inbox) at which new ones are refused.
    high_watermark: usize,
}

impl EngineHandle {
    /// Starts the engine thread. The schedule is built before the thread starts, so a bad
    /// pipeline is reported here.
    pub fn spawn(parts: EngineParts) -> Result<EngineHandle, std::io::Error> {
        let high_watermark = parts.limits.high_watermark;
        let (tx, rx) = mpsc::sync_channel(high_watermark + parts.control_capacity.max(1));
        let status = Arc::new(EngineStatus::default());
        let pending = Arc::new(AtomicUsize::new(0));
        let max_queue_delay = parts.max_queue_delay;
        let pipeline = parts.pipeline.clone();
        let (world, schedule) = build_world(parts, status.clone());
        let inbox = Receiver { rx, pending: pending.clone() };
        let thread = std::thread::Builder::new()
            .name("starling-engine".into())
            .spawn(move || supervise(world, schedule, &inbox, max_queue_delay, &pipeline))?;
        Ok(EngineHandle { tx, thread: Some(thread), status, pending, high_watermark })
    }

    /// Whether a generation sent now would be admitted as far as queue room goes (what
    /// `/readyz` reports as queue pressure).
    pub fn accepting(&self) -> bool {
        let waiting = self.status.queued.load(Ordering::Relaxed) + self.pending.load(Ordering::Relaxed);
        waiting < self.high_watermark && self.status.admission_open.load(Ordering::Relaxed)
    }

    /// Hands a command to the engine without blocking. A generation is refused with 429
    /// `queue_full` when the engine's published queue plus what waits in its inbox is at the
    /// high watermark (or admission is closed): the inbox, sized past that, never fills
    /// with generations, so overload always reads as 429, never as a dead engine.
    pub fn send(&self, cmd: EngineCommand) -> Result<(), ApiError> {
        let generation = matches!(cmd, EngineCommand::Generate(_));
        if generation {
            let waiting = self.status.queued.load(Ordering::Relaxed) + self.pending.fetch_add(1, Ordering::AcqRel);
            if waiting >= self.high_watermark || !self.status.admission_open.load(Ordering::Relaxed) {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(queue_full(waiting));
            }
        }
        self.tx.try_send(cmd).map_err(|e| {
            if generation {
                self.pending.fetch_sub(1, Ordering::AcqRel);
            }
            match e {
                TrySendError::Full(_) => queue_full(self.high_watermark),
                TrySendError::Disconnected(_) => {
                    ApiError::new(ErrorKind::Unavailable, "the engine has stopped").with_code("engine_stopped")
                }
            }
        })
    }

    /// Asks the engine to stop and waits for its thread to end.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.tx.try_send(EngineCommand::Shutdown);
        if let Some(t) = self.thread.take() {
            // Wake a blocked `recv` even if the inbox was full: dropping our sender is not
            // possible while the handle lives, so retry the shutdown command until taken.
            while !t.is_finished() {
                let _ = self.tx.try_send(EngineCommand::Shutdown);
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = t.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Builds the world with every resource the stages read, and the schedule from the pipeline.
pub fn build_world(parts: EngineParts, status: Arc<EngineStatus>) -> (World, Schedule) {
    let mut world = World::new();
    status.kv_blocks_total.store(parts.kv.n_blocks(), Ordering::Relaxed);
    status.admission_open.store(true, Ordering::Relaxed);
    world.insert_resource(Inbox::default());
    world.insert_resource(TickClock::default());
    world.insert_resource(Model(parts.model));
    world.insert_resource(TokenizerRes(parts.tokenizer));
    world.insert_resource(Kv(parts.kv));
    world.insert_resource(parts.limits);
    world.insert_resource(parts.tenants);
    world.insert_resource(scheduler::FairShare::default());
    world.insert_resource(scheduler::SchedulerStats::default());
    world.insert_resource(BatchPlan::default());
    world.insert_resource(Logits::default());
    world.insert_resource(SpecStats::default());
    world.insert_resource(SessionIndex::default());
    world.insert_resource(AdmissionGate { open: true });
    world.insert_resource(parts.policies);
    world.insert_resource(StageLog::default());
    world.insert_resource(TickReport::default());
    world.insert_resource(Status(status));
    observe::install(&mut world, parts.telemetry);
    let schedule = build_schedule(&parts.pipeline, &mut world);
    (world, schedule)
}

/// The tick schedule: every stage of the pipeline, in file order, as one chained list.
pub fn build_schedule(spec: &PipelineSpec, world: &mut World) -> Schedule {
    let configs: Vec<ScheduleConfigs<ScheduleSystem>> = spec
        .stages
        .iter()
        .map(|(stage, _)| {
            let (stage, id) = (*stage, register_stage(world, *stage));
            IntoScheduleConfigs::into_configs(move |world: &mut World| run_stage(world, stage, id))
        })
        .collect();
    let mut schedule = Schedule::default();
    schedule.add_systems(
        ScheduleConfigs::Configs { configs, collective_conditions: vec![], metadata: Default::default() }.chain(),
    );
    schedule
}

fn register_stage(world: &mut World, stage: Stage) -> SystemId {
    match stage {
        Stage::Admit => world.register_system(systems::admit_requests),
        Stage::Tokenize => world.register_system(systems::tokenize_prompts),
        Stage::InputPolicy => world.register_system(systems::check_input_policy),
        Stage::Batch => world.register_system(systems::assemble_batch),
        Stage::Forward => world.register_system(systems::run_forward),
        Stage::Constrain => world.register_system(systems::constrain_logits),
        Stage::Sample => world.register_system(systems::sample_next_tokens),
        Stage::OutputPolicy => world.register_system(systems::check_output_policy),
        Stage::Emit => world.register_system(systems::emit_events),
        Stage::Evict => world.register_system(systems::evict_finished),
    }
}

/// Runs one stage inside its own span (so a Chrome trace shows every stage of every tick).
fn run_stage(world: &mut World, stage: Stage, id: SystemId) {
    let span = observe::stage_span(world, stage);
    let _g = span.enter();
    let started = Instant::now();
    if let Err(e) = world.run_system(id) {
        tracing::error!(stage = stage.name(), error = %e, "stage failed to run");
    }
    observe::after_stage(world, stage, &span, started);
    let mut log = world.resource_mut::<StageLog>();
    if log.enabled {
        log.stages.push(stage);
    }
}

/// 429 `queue_full`: the engine has `waiting` requests queued.
fn queue_full(waiting: usize) -> ApiError {
    ApiError::new(ErrorKind::RateLimited, format!("the request queue is full ({waiting} waiting); retry later"))
        .with_code("queue_full")
        .with_retry_after(1)
}

/// The engine's end of its inbox: takes commands and keeps the handle's count of pending
/// generations.
struct Receiver {
    rx: mpsc::Receiver<EngineCommand>,
    pending: Arc<AtomicUsize>,
}

impl Receiver {
    fn taken(&self, cmd: EngineCommand) -> EngineCommand {
        if matches!(cmd, EngineCommand::Generate(_)) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        cmd
    }

    fn recv_timeout(&self, wait: Duration) -> Result<EngineCommand, RecvTimeoutError> {
        self.rx.recv_timeout(wait).map(|cmd| self.taken(cmd))
    }

    fn try_recv(&self) -> Option<EngineCommand> {
        self.rx.try_recv().ok().map(|cmd| self.taken(cmd))
    }
}

/// Whether any request is alive (queued, running, or with events still to deliver).
fn has_work(world: &mut World) -> bool {
    !world.resource::<Inbox>().0.is_empty() || world.query::<&Request>().iter(world).next().is_some()
}

/// Marks the engine stopped when its thread ends, however it ends, so `/healthz` sees it.
struct StoppedOnDrop(Arc<EngineStatus>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Relaxed);
    }
}

/// Runs the tick loop; if it panics, fails every request the engine held (their clients
/// get an error event), rebuilds the world on an emptied KV cache, and runs again. While
/// it restarts, `EngineStatus::restarting` is set (`/healthz` answers 503).
fn supervise(
    mut world: World,
    mut schedule: Schedule,
    rx: &Receiver,
    max_queue_delay: Duration,
    pipeline: &PipelineSpec,
) {
    let status = world.resource::<Status>().0.clone();
    let _stopped = StoppedOnDrop(status.clone());
    // One clock for the engine's whole life: requests that waited across a restart keep
    // their true arrival time, and deadlines stay where they were.
    let origin = MonotonicOrigin(Instant::now());
    loop {
        let ran = catch_unwind(AssertUnwindSafe(|| run_loop(&mut world, &mut schedule, rx, max_queue_delay, origin)));
        let Err(panic) = ran else { return };
        status.restarting.store(true, Ordering::Relaxed);
        status.restarts.fetch_add(1, Ordering::Relaxed);
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %reason, "the engine thread panicked; failing its requests and restarting it");
        fail_everything(&mut world);
        (world, schedule) = rebuild(world, pipeline, status.clone());
        status.restarting.store(false, Ordering::Relaxed);
    }
}

/// Sends an error to every request the world holds, queued commands included.
fn fail_everything(world: &mut World) {
    let error = || {
        ApiError::new(ErrorKind::Internal, "the engine restarted after an internal error; retry the request")
            .with_code("engine_restarted")
    };
    for tx in world.query::<&StreamTx>().iter(world) {
        let _ = tx.0.try_send(crate::protocol::StreamEvent::Error(error()));
    }
    let inbox = std::mem::take(&mut world.resource_mut::<Inbox>().0);
    for cmd in inbox {
        match cmd {
            EngineCommand::Generate(req) => {
                let _ = req.events.try_send(crate::protocol::StreamEvent::Error(error()));
            }
            EngineCommand::Cancel { reply, .. } | EngineCommand::CloseSession { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            EngineCommand::Shutdown => {}
        }
    }
}

/// A fresh world and schedule for the same model, limits and telemetry, on the old KV
/// arena emptied (no block table from before the panic can be trusted).
fn rebuild(mut old: World, pipeline: &PipelineSpec, status: Arc<EngineStatus>) -> (World, Schedule) {
    let mut kv = old.remove_resource::<Kv>().expect("the world has its KV cache").0;
    kv.reset();
    let parts = EngineParts {
        model: old.resource::<Model>().0.clone(),
        tokenizer: old.resource::<TokenizerRes>().0.clone(),
        kv,
        limits: old.resource::<EngineLimits>().clone(),
        tenants: old.resource::<scheduler::TenantLimits>().clone(),
        pipeline: pipeline.clone(),
        policies: old.resource::<Policies>().clone(),
        control_capacity: 0,
        max_queue_delay: Duration::ZERO,
        telemetry: old.remove_resource::<EngineTelemetry>().expect("the world has its telemetry").for_new_world(),
    };
    build_world(parts, status)
}

fn run_loop(
    world: &mut World,
    schedule: &mut Schedule,
    rx: &Receiver,
    max_queue_delay: Duration,
    origin: MonotonicOrigin,
) {
    let mut tick = 0u64;
    loop {
        let busy = has_work(world);
        let stalled = {
            let r = world.resource::<TickReport>();
            busy && r.planned_tokens == 0 && r.events_sent == 0
        };
        let wait = if !busy {
            Some(IDLE_WAKE)
        } else if stalled {
            Some(STALLED_WAIT)
        } else {
            None
        };
        if let Some(wait) = wait {
            match rx.recv_timeout(wait) {
                Ok(cmd) => {
                    world.resource_mut::<Inbox>().0.push_back(cmd);
                    if !busy && !max_queue_delay.is_zero() {
                        // An idle engine waits a moment to gather a batch.
                        std::thread::sleep(max_queue_delay);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Some(cmd) = rx.try_recv() {
            world.resource_mut::<Inbox>().0.push_back(cmd);
        }
        tick += 1;
        let now = origin.now();
        *world.resource_mut::<TickClock>() = TickClock { now, tick, live: Some(origin) };
        {
            let mut r = world.resource_mut::<TickReport>();
            r.planned_tokens = 0;
            r.events_sent = 0;
        }
        let (span, started) = (tracing::info_span!("tick", tick), Instant::now());
        span.in_scope(|| schedule.run(world));
        publish_status(world, now);
        observe::after_tick(world, started);
        if world.resource::<TickReport>().stop_requested {
            cancel_all(world, schedule);
            break;
        }
    }
}

/// Ends every live request (`cancelled`) and runs one more tick to deliver final events.
fn cancel_all(world: &mut World, schedule: &mut Schedule) {
    let mut q = world.query::<(&mut Phase, &mut Outbox)>();
    for (mut phase, _) in q.iter_mut(world) {
        if !matches!(*phase, Phase::Finished(_)) {
            *phase = Phase::Finished(FinishReason::Cancelled);
        }
    }
    schedule.run(world);
}

fn publish_status(world: &mut World, now: Timestamp) {
    let (mut queued, mut running) = (0, 0);
    for phase in world.query::<&Phase>().iter(world) {
        match phase {
            Phase::Queued => queued += 1,
            Phase::Prefill | Phase::Decode => running += 1,
            Phase::Finished(_) => {}
        }
    }
    let sessions = world.query::<&SessionCache>().iter(world).count();
    let (used, forward_calls) = (world.resource::<Kv>().0.n_referenced(), world.resource::<TickReport>().forward_calls);
    let status = world.resource::<Status>().0.clone();
    status.ticks.fetch_add(1, Ordering::Relaxed);
    status.last_tick_ms.store(now.0 / 1000, Ordering::Relaxed);
    status.queued.store(queued, Ordering::Relaxed);
    status.running.store(running, Ordering::Relaxed);
    status.sessions.store(sessions, Ordering::Relaxed);
    status.kv_blocks_used.store(used, Ordering::Relaxed);
    status.forward_calls.store(forward_calls, Ordering::Relaxed);
}
