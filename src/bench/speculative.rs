//! `starling bench --speculative`: decode speed with speculative decoding off and on, on a
//! fixed set of tasks whose answers draw on their prompt (input-grounded) and of open-ended
//! ones, single stream and 16 sequences at once, with the cost of verifying drafts.
//!
//! Requests are greedy chat turns (the model's own template; the bare text for a model
//! without one) of up to [`MAX_TOKENS`] tokens that may end early; speculation never changes a token, so both runs generate the
//! same text; the bench fails if they ever differ.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::common::{BenchError, BenchSettings, Step, median};
use crate::config::{Config, Format};
use crate::engine::load::{LoadedModel, start_model_observed};
use crate::engine::speculate::lookup_ceiling;
use crate::gateway::service::validate_sampling;
use crate::gateway::template::ChatMessage;
use crate::gateway::template::sandbox::RenderJob;
use crate::kv::arena::{BlockTable, KvArena};
use crate::model::transformer::{LogitsWanted, SeqChunk, Transformer};
use crate::protocol::{EngineCommand, GenerateRequest, PromptInput, StreamEvent};
use crate::sampler::{SamplingConfig, SamplingParams};
use crate::telemetry::Observability;
use crate::types::{RequestId, TenantId, TokenId};

/// Tokens a request may generate.
const MAX_TOKENS: u32 = 128;
/// Sequences of the batched figures.
const BATCH: usize = 16;
/// Positions before the verify-cost steps (a short chat prompt).
const VERIFY_CONTEXT: usize = 128;

/// What [`measure_workload`] runs: the tasks, the tokens each request may generate, and
/// the sequences of the batched figures.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    /// (name, input-grounded, user message).
    pub tasks: &'a [(&'a str, bool, &'a str)],
    pub max_tokens: u32,
    pub batch: usize,
}

/// `--speculative`'s workload.
pub const WORKLOAD: Workload<'static> = Workload { tasks: TASKS, max_tokens: MAX_TOKENS, batch: BATCH };

/// The tasks: (name, input-grounded, user message).
pub const TASKS: &[(&str, bool, &str)] = &[
    (
        "summarise",
        true,
        "Summarise this paragraph in one or two sentences:\n\nThe city library will close for renovations from \
         June 1 to August 31. During this time, books can be returned at the community center on Main Street. The \
         renovated library will have a new children's section, more computers, and a larger reading room. Library \
         cards will remain valid during the closure.",
    ),
    (
        "list-change",
        true,
        "Here is a shopping list:\n- 2 red apples\n- 1 loaf of bread\n- 3 green peppers\n- 1 bottle of milk\n- 6 \
         brown eggs\n- 1 bag of rice\n\nRewrite the list exactly, but change the milk to orange juice.",
    ),
    (
        "fix-bug",
        true,
        "This Python function should return the largest number in a list, but it has a bug. Fix it and show the \
         corrected function.\n\n```python\ndef largest(numbers):\n    best = numbers[0]\n    for n in numbers:\n        \
         if n < best:\n            best = n\n    return best\n```",
    ),
    (
        "passage-answer",
        true,
        "Read the passage and answer the question using the passage's words.\n\nPassage: The Eiffel Tower is a \
         wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the engineer Gustave \
         Eiffel, whose company designed and built the tower from 1887 to 1889.\n\nQuestion: Who is the Eiffel Tower \
         named after, and when was it built?",
    ),
    (
        "spelling",
        true,
        "Fix the spelling mistakes in this email and return the corrected email:\n\nHello Tom,\nThank you for your \
         mesage. I will send the documnets tomorow morning. Please let me know if you need anything els.\nBest \
         regards,\nAnna",
    ),
    (
        "rename",
        true,
        "Rewrite this code, renaming the variable `total` to `sum_so_far`:\n\n```python\ndef add_all(items):\n    \
         total = 0\n    for item in items:\n        total = total + item\n    return total\n```",
    ),
    (
        "table",
        true,
        "Turn this list into a markdown table with columns Name and Role:\nAlice - Engineer\nBob - Designer\nCarol \
         - Manager\nDave - Tester",
    ),
    (
        "restate",
        true,
        "Rewrite the following sentence in all capital letters:\nThe meeting will start at nine o'clock in the main \
         conference room.",
    ),
    ("poem", false, "Write a short poem about the sea."),
    ("story", false, "Tell me a story about a dragon who learns to cook."),
    ("advice", false, "What are some good habits for staying healthy?"),
    ("explain", false, "Explain why the sky is blue."),
];

/// Every figure of `--speculative`.
#[derive(Clone, Debug, Serialize)]
pub struct SpeculativeFigures {
    /// Milliseconds of one decode step of a single sequence at [`VERIFY_CONTEXT`] positions,
    /// by positions run (1 = plain decode, 1 + k = verifying k draft tokens).
    pub verify_ms: Vec<(usize, f64)>,
    /// Each task alone, speculation off and on.
    pub tasks: Vec<TaskFigure>,
    /// Single-stream decode over each set (generated tokens over decode time, summed).
    pub grounded_single: SetFigure,
    pub open_single: SetFigure,
    /// Tokens a request may generate, and sequences of the batched figures.
    pub max_tokens: u32,
    pub batch: usize,
    /// `batch` sequences at once: each set's tasks repeated, sent together.
    pub grounded_batch: SetFigure,
    pub open_batch: SetFigure,
}

/// One task alone.
#[derive(Clone, Debug, Serialize)]
pub struct TaskFigure {
    pub name: String,
    pub grounded: bool,
    pub tokens: usize,
    pub off_tok_s: f64,
    pub on_tok_s: f64,
    /// Draft tokens run, and those accepted (in one run with speculation on).
    pub drafted: u64,
    pub accepted: u64,
    /// The most any prompt-lookup drafter could gain on this output at the measured step
    /// costs (`speculate::lookup_ceiling`): plain decode time over the oracle's.
    pub ceiling: f64,
}

/// Decode throughput of a set, off and on.
#[derive(Clone, Debug, Serialize)]
pub struct SetFigure {
    pub off_tok_s: f64,
    pub on_tok_s: f64,
    /// `on / off`.
    pub speedup: f64,
    /// Accepted over drafted tokens with speculation on.
    pub acceptance: f64,
    /// Single stream: the prompt-lookup ceiling over the set's outputs (their plain decode
    /// time over the oracle's, each summed); none for the batches.
    pub ceiling: Option<f64>,
}

/// One request's outcome: its tokens and when its first token and its end arrived.
struct Outcome {
    tokens: Vec<TokenId>,
    first: Instant,
    done: Instant,
    /// Arrival time of each token.
    times: Vec<Instant>,
}

/// An engine for the bench's model, speculation off or on, with its metrics.
struct Bench {
    loaded: LoadedModel,
    obs: Observability,
    sampling: SamplingConfig,
}

impl Bench {
    fn start(settings: &BenchSettings, speculative: bool, w: Workload) -> Result<Bench, BenchError> {
        let batch = w.batch.max(1);
        let mut model = serde_json::json!({"id": "bench", "path": settings.model, "threads": settings.threads,
                                           "max_batch": batch, "max_batch_tokens": 512});
        if speculative {
            model["speculative"] = serde_json::json!({"method": "ngram"});
        }
        let json = serde_json::json!({
            "tenants": [{"name": "bench", "max_concurrent": batch, "max_queued": batch}],
            "models": [model],
        });
        let config =
            Config::from_str(&json.to_string(), Format::Json).map_err(|e| BenchError::Engine(e.to_string()))?;
        let obs = Observability::new().map_err(|e| BenchError::Engine(e.to_string()))?;
        let loaded = start_model_observed(&config, 0, &obs).map_err(|e| BenchError::Engine(e.to_string()))?;
        let params = SamplingParams { temperature: Some(0.0), max_tokens: Some(w.max_tokens), ..Default::default() };
        let sampling =
            validate_sampling(&config.limits, &loaded, &params).map_err(|e| BenchError::Engine(e.message))?;
        Ok(Bench { loaded, obs, sampling })
    }

    /// The chat prompt of one task, in the model's template; a model without one (a base
    /// model) gets the task's text followed by a blank line.
    fn prompt(&self, user: &str) -> Result<String, BenchError> {
        if self.loaded.tokenizer.chat_template().is_none() {
            return Ok(format!("{user}\n\n"));
        }
        let message =
            ChatMessage { role: "user".into(), content: user.into(), tool_calls: None, tool_call_id: None, name: None };
        RenderJob::new("bench", &self.loaded.tokenizer, vec![message])
            .render_here()
            .map_err(|e| BenchError::Engine(format!("chat template: {e}")))
    }

    /// Sends every prompt at once and waits for all.
    fn run(&self, prompts: &[String]) -> Result<Vec<Outcome>, BenchError> {
        let mut waiting = vec![];
        for prompt in prompts {
            let (tx, rx) = tokio::sync::mpsc::channel(4 * self.sampling.max_tokens as usize + 8);
            let request = GenerateRequest {
                constraint: None,
                keep_special: false,
                id: RequestId::next(),
                client_id: None,
                tenant: TenantId::from("bench"),
                session: None,
                input: PromptInput::Text { text: prompt.clone(), parse_special: true },
                sampling: self.sampling.clone(),
                timeout: Duration::from_secs(600),
                received_at: Instant::now(),
                events: tx,
            };
            self.loaded
                .engine
                .send(EngineCommand::Generate(Box::new(request)))
                .map_err(|e| BenchError::Engine(e.message))?;
            waiting.push(std::thread::spawn(move || collect(rx)));
        }
        waiting.into_iter().map(|t| t.join().map_err(|_| BenchError::Engine("a reader panicked".into()))?).collect()
    }

    /// (drafted, accepted) so far.
    fn counts(&self) -> (u64, u64) {
        let text = self.obs.metrics.render();
        let value = |name: &str| {
            let prefix = format!("{name}{{model=\"bench\"}} ");
            text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
                as u64
        };
        (value("starling_spec_draft_tokens_total"), value("starling_spec_accepted_tokens_total"))
    }
}

/// Reads one request's events to its end.
fn collect(mut rx: tokio::sync::mpsc::Receiver<StreamEvent>) -> Result<Outcome, BenchError> {
    let (mut tokens, mut times) = (vec![], vec![]);
    while let Some(event) = rx.blocking_recv() {
        match event {
            StreamEvent::Token { id, .. } => {
                tokens.push(id);
                times.push(Instant::now());
            }
            StreamEvent::Done { .. } => {
                let done = Instant::now();
                let first = times.first().copied().unwrap_or(done);
                return Ok(Outcome { tokens, first, done, times });
            }
            StreamEvent::Error(e) => return Err(BenchError::Engine(e.message)),
            StreamEvent::Started { .. } => {}
        }
    }
    Err(BenchError::Engine("the engine closed a stream before it was done".into()))
}

/// Decode tokens per second of requests run one at a time: tokens after the first over
/// the time from the first token to the end, summed over the requests.
fn single_rate(outcomes: &[&Outcome]) -> f64 {
    let tokens: usize = outcomes.iter().map(|o| o.tokens.len().saturating_sub(1)).sum();
    let secs: f64 = outcomes.iter().map(|o| o.done.saturating_duration_since(o.first).as_secs_f64()).sum();
    if secs > 0.0 { tokens as f64 / secs } else { 0.0 }
}

/// Decode tokens per second of requests run together: tokens that arrived once every
/// request had its first token (all prompts done), over the time from then to the last end.
fn batch_rate(outcomes: &[Outcome]) -> f64 {
    let Some(start) = outcomes.iter().map(|o| o.first).max() else { return 0.0 };
    let Some(end) = outcomes.iter().map(|o| o.done).max() else { return 0.0 };
    let tokens: usize = outcomes.iter().map(|o| o.times.iter().filter(|&&t| t > start).count()).sum();
    let secs = end.saturating_duration_since(start).as_secs_f64();
    if secs > 0.0 { tokens as f64 / secs } else { 0.0 }
}

/// Milliseconds of one step of 1..=`max_rows` positions for one sequence.
fn verify_cost(model: &Transformer, reps: usize, max_rows: usize) -> Result<Vec<(usize, f64)>, BenchError> {
    let mut kv = KvArena::new(model.kv_layout(16), 64 << 20).map_err(|e| BenchError::Kv(e.to_string()))?;
    let mut table = BlockTable::default();
    table.reserve(&mut kv, VERIFY_CONTEXT + max_rows).map_err(|e| BenchError::Kv(e.to_string()))?;
    let vocab = model.desc.n_vocab as TokenId;
    let token = |i: usize| (1000 + i as TokenId * 7) % vocab;
    let prompt: Vec<TokenId> = (0..VERIFY_CONTEXT).map(token).collect();
    let mut logits = vec![];
    let chunk =
        |tokens: Vec<TokenId>, start_pos, logits| SeqChunk { tokens, start_pos, blocks: table.blocks.clone(), logits };
    model.forward(&[chunk(prompt, 0, LogitsWanted::Last)], &mut kv, &mut logits)?;
    let mut out = vec![];
    for rows in 1..=max_rows {
        let wanted = if rows == 1 { LogitsWanted::Last } else { LogitsWanted::All };
        let mut times = vec![];
        for _ in 0..reps.max(1) * 8 {
            let step = chunk((0..rows).map(token).collect(), VERIFY_CONTEXT, wanted);
            let t = Instant::now();
            model.forward(&[step], &mut kv, &mut logits)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out.push((rows, median(times)));
    }
    Ok(out)
}

/// Runs every `--speculative` measurement.
pub fn measure(settings: &BenchSettings, observe: &mut dyn FnMut(Step)) -> Result<SpeculativeFigures, BenchError> {
    measure_workload(settings, WORKLOAD, observe)
}

/// [`measure`] with another workload (tests run a small one).
pub fn measure_workload(
    settings: &BenchSettings,
    w: Workload,
    observe: &mut dyn FnMut(Step),
) -> Result<SpeculativeFigures, BenchError> {
    let reps = settings.reps;
    observe(Step { phase: "speculative: verify cost", rep: 1, reps: 1 });
    let verify_ms = {
        let model = Transformer::load(&settings.model, settings.threads)?;
        verify_cost(&model, reps, 1 + crate::config::SpeculativeConfig::default().max_draft)?
    };
    let mut single: [Vec<Vec<Outcome>>; 2] = [vec![], vec![]];
    let mut batch: [Vec<f64>; 2] = [vec![], vec![]];
    let mut open_batch: [Vec<f64>; 2] = [vec![], vec![]];
    let mut per_task_counts = vec![(0, 0); w.tasks.len()];
    let mut identical = true;
    let mut reference: Option<Vec<Vec<TokenId>>> = None;
    // Both engines stay up (the idle one blocks on its inbox), and every run with
    // speculation follows the same run without it, so drift of the machine's speed over the
    // bench falls on both alike.
    let benches = [Bench::start(settings, false, w)?, Bench::start(settings, true, w)?];
    let prompts: Vec<String> = w.tasks.iter().map(|(_, _, user)| benches[0].prompt(user)).collect::<Result<_, _>>()?;
    let tokenizer = &benches[0].loaded.tokenizer;
    let prompt_ids: Vec<Vec<TokenId>> = prompts
        .iter()
        .map(|p| tokenizer.encode_prompt(p, true).map_err(|e| BenchError::Engine(format!("tokenizing a task: {e}"))))
        .collect::<Result<_, _>>()?;
    for rep in 1..=reps {
        observe(Step { phase: "speculative: each task alone, off then on", rep, reps });
        let mut outcomes: [Vec<Outcome>; 2] = [vec![], vec![]];
        for (i, p) in prompts.iter().enumerate() {
            for (k, bench) in benches.iter().enumerate() {
                let before = bench.counts();
                outcomes[k].push(bench.run(std::slice::from_ref(p))?.remove(0));
                let after = bench.counts();
                if k == 1 && rep == 1 {
                    per_task_counts[i] = (after.0 - before.0, after.1 - before.1);
                }
            }
        }
        for (k, outcomes) in outcomes.into_iter().enumerate() {
            let tokens: Vec<Vec<TokenId>> = outcomes.iter().map(|o| o.tokens.clone()).collect();
            identical &= *reference.get_or_insert(tokens.clone()) == tokens;
            single[k].push(outcomes);
        }
        let reference = reference.as_ref().expect("set above");
        for set in [true, false] {
            let chosen: Vec<(&String, &Vec<TokenId>)> = w
                .tasks
                .iter()
                .zip(prompts.iter().zip(reference.iter()))
                .filter(|((_, grounded, _), _)| *grounded == set)
                .map(|(_, pair)| pair)
                .collect();
            let group: Vec<(&String, &Vec<TokenId>)> = chosen.iter().cycle().take(w.batch).copied().collect();
            let name = if set { "grounded" } else { "open-ended" };
            observe(Step { phase: &format!("speculative: {} {name} sequences, off then on", w.batch), rep, reps });
            let texts: Vec<String> = group.iter().map(|(p, _)| (*p).clone()).collect();
            for (k, bench) in benches.iter().enumerate() {
                let outcomes = bench.run(&texts)?;
                identical &= group.iter().zip(&outcomes).all(|((_, want), o)| **want == o.tokens);
                let rate = batch_rate(&outcomes);
                if set { batch[k].push(rate) } else { open_batch[k].push(rate) }
            }
        }
    }
    for bench in benches {
        bench.loaded.engine.shutdown();
    }
    if !identical {
        return Err(BenchError::Engine("speculative decoding changed the output of a request".into()));
    }
    // Per task and per set: the median over repetitions of each.
    let task_rate = |k: usize, i: usize| median(single[k].iter().map(|run| single_rate(&[&run[i]])).collect());
    let set_rate = |k: usize, grounded: bool| {
        median(
            single[k]
                .iter()
                .map(|run| {
                    let chosen: Vec<&Outcome> =
                        run.iter().zip(w.tasks).filter(|(_, (_, g, _))| *g == grounded).map(|(o, _)| o).collect();
                    single_rate(&chosen)
                })
                .collect(),
        )
    };
    // The oracle's times for each task's output (plain, best), at the measured step costs.
    let step_ms: Vec<f64> = verify_ms.iter().map(|(_, ms)| *ms).collect();
    let oracle: Vec<(f64, f64)> = prompt_ids
        .iter()
        .zip(&single[0][0])
        .map(|(prompt, outcome)| lookup_ceiling(prompt, &outcome.tokens, &step_ms))
        .collect();
    let ratio = |(plain, best): (f64, f64)| if best > 0.0 { plain / best } else { 1.0 };
    let set_ceiling = |grounded: bool| {
        let sum = w.tasks.iter().zip(&oracle).filter(|((_, g, _), _)| *g == grounded).map(|(_, o)| *o);
        Some(ratio(sum.fold((0.0, 0.0), |(p, b), (tp, tb)| (p + tp, b + tb))))
    };
    let tasks: Vec<TaskFigure> = w
        .tasks
        .iter()
        .enumerate()
        .map(|(i, (name, grounded, _))| TaskFigure {
            name: name.to_string(),
            grounded: *grounded,
            tokens: single[0][0][i].tokens.len(),
            off_tok_s: task_rate(0, i),
            on_tok_s: task_rate(1, i),
            drafted: per_task_counts[i].0,
            accepted: per_task_counts[i].1,
            ceiling: ratio(oracle[i]),
        })
        .collect();
    let acceptance = |grounded: bool| {
        let (d, a) =
            tasks.iter().filter(|t| t.grounded == grounded).fold((0, 0), |(d, a), t| (d + t.drafted, a + t.accepted));
        if d == 0 { 0.0 } else { a as f64 / d as f64 }
    };
    let figure = |off: f64, on: f64, acceptance: f64, ceiling: Option<f64>| SetFigure {
        off_tok_s: off,
        on_tok_s: on,
        speedup: if off > 0.0 { on / off } else { 0.0 },
        acceptance,
        ceiling,
    };
    Ok(SpeculativeFigures {
        verify_ms,
        max_tokens: w.max_tokens,
        batch: w.batch,
        grounded_single: figure(set_rate(0, true), set_rate(1, true), acceptance(true), set_ceiling(true)),
        open_single: figure(set_rate(0, false), set_rate(1, false), acceptance(false), set_ceiling(false)),
        grounded_batch: figure(median(batch[0].clone()), median(batch[1].clone()), acceptance(true), None),
        open_batch: figure(median(open_batch[0].clone()), median(open_batch[1].clone()), acceptance(false), None),
        tasks,
    })
}

/// The table `starling bench --speculative` prints.
pub fn write_table(f: &mut std::fmt::Formatter<'_>, s: &SpeculativeFigures) -> std::fmt::Result {
    let steps: Vec<String> = s.verify_ms.iter().map(|(rows, ms)| format!("{rows}: {ms:.2}")).collect();
    writeln!(f, "speculative decoding (n-gram drafts), greedy chat turns of up to {} tokens", s.max_tokens)?;
    writeln!(f, "  step ms by positions verified: {}", steps.join(", "))?;
    writeln!(
        f,
        "  {:<16} {:>6} {:>9} {:>9} {:>8} {:>9} {:>8}",
        "task", "tokens", "off tok/s", "on tok/s", "speedup", "accepted", "ceiling"
    )?;
    for t in &s.tasks {
        let accepted = format!("{}/{}", t.accepted, t.drafted);
        let speedup = if t.off_tok_s > 0.0 { t.on_tok_s / t.off_tok_s } else { 0.0 };
        let name = format!("{}{}", t.name, if t.grounded { "" } else { " (open)" });
        writeln!(
            f,
            "  {name:<16} {:>6} {:>9.1} {:>9.1} {speedup:>7.2}x {accepted:>9} {:>7.2}x",
            t.tokens, t.off_tok_s, t.on_tok_s, t.ceiling
        )?;
    }
    for (name, set) in [
        ("grounded, single stream", &s.grounded_single),
        ("open-ended, single stream", &s.open_single),
        (&*format!("grounded, {} sequences", s.batch), &s.grounded_batch),
        (&*format!("open-ended, {} sequences", s.batch), &s.open_batch),
    ] {
        let ceiling = set.ceiling.map(|c| format!(", ceiling {c:.2}x")).unwrap_or_default();
        writeln!(
            f,
            "  {name:<30} {:>8.1} -> {:>8.1} tok/s  {:.2}x  (acceptance {:.0}%{ceiling})",
            set.off_tok_s,
            set.on_tok_s,
            set.speedup,
            set.acceptance * 100.0
        )?;
    }
    writeln!(f, "  every request gave the same tokens with and without speculation")?;
    writeln!(
        f,
        "  ceiling: the most any prompt-lookup drafter could gain on these outputs, knowing them in advance, at these step costs"
    )
}
