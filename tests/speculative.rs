//! Speculative decoding: drafts from the sequence's own context, verified in the ordinary
//! batch, never change a token, a log-probability or a finish; the KV cache ends where it
//! would have ended without them.

use starling::config::SpeculativeConfig;
use starling::engine::resources::EngineLimits;
use starling::engine::scheduler::TenantLimits;
use starling::protocol::{FinishReason, StreamEvent};
use starling::sampler::{SamplerLimits, SamplingConfig, SamplingParams};

use crate::scheduler::{Harness, KV_BYTES, Stream, limits, tokenizer};

/// User turns whose answers copy from them (drafts mostly accepted).
const GROUNDED: [&str; 3] = [
    "Read the passage and answer the question using the passage's words.\n\nPassage: The Eiffel Tower is a \
     wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the engineer Gustave \
     Eiffel, whose company designed and built the tower from 1887 to 1889.\n\nQuestion: Who is the Eiffel Tower \
     named after, and when was it built?",
    "Turn this list into a markdown table with columns Name and Role:\nAlice - Engineer\nBob - Designer\nCarol - \
     Manager\nDave - Tester",
    "Rewrite the following sentence in all capital letters:\nThe meeting will start at nine o'clock in the main \
     conference room.",
];

/// User turns whose answers do not (drafts mostly rejected, or none).
const OPEN: [&str; 2] =
    ["Tell me a story about a dragon who learns to cook.", "What are some good habits for staying healthy?"];

/// A chat turn in SmolLM2's template, as token ids.
fn chat(user: &str) -> Vec<u32> {
    let text = format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
    tokenizer().encode(&text, true).expect("prompt tokenizes")
}

/// Greedy (`temperature` 0) or sampled with top-p and a seed; three alternatives per token.
fn params(temperature: f32, seed: u64, max_tokens: u32) -> SamplingConfig {
    let params = SamplingParams {
        temperature: Some(temperature),
        top_p: Some(0.9),
        seed: Some(seed),
        max_tokens: Some(max_tokens),
        logprobs: Some(3),
        ..Default::default()
    };
    let limits = SamplerLimits { vocab_size: 49152, max_stop_strings: 8, default_max_tokens: 16, max_tokens_cap: 4096 };
    params.validate(&limits).expect("valid sampling")
}

fn spec_limits(on: bool) -> EngineLimits {
    EngineLimits { speculative: on.then(SpeculativeConfig::default), ..limits(16, 512) }
}

/// What a client can see of one request: every token event, and the final event without
/// its timings.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    tokens: Vec<StreamEvent>,
    finish: Option<FinishReason>,
    usage: Option<starling::protocol::Usage>,
    tail: Option<String>,
}

fn seen(s: &Stream) -> Seen {
    let tokens = s.events.iter().filter(|e| matches!(e, StreamEvent::Token { .. })).cloned().collect();
    let done = s.events.iter().find_map(|e| match e {
        StreamEvent::Done { usage, text, .. } => Some((*usage, text.clone())),
        _ => None,
    });
    Seen { tokens, finish: s.finish(), usage: done.as_ref().map(|d| d.0), tail: done.map(|d| d.1) }
}

/// Ticks until every stream is finished.
fn run(h: &mut Harness, streams: &mut [Stream]) {
    for _ in 0..2000 {
        h.run_tick();
        streams.iter_mut().for_each(Stream::drain);
        if streams.iter().all(|s| s.finish().is_some() || s.error().is_some()) {
            return;
        }
    }
    panic!("requests did not finish");
}

/// Runs each case alone on a fresh engine; returns what each client saw and the engine's
/// (drafted, accepted) counts.
fn alone(on: bool, cases: &[(Vec<u32>, SamplingConfig)]) -> (Vec<Seen>, (f64, f64)) {
    let mut out = vec![];
    let mut counts = (0.0, 0.0);
    for (p, s) in cases {
        let mut h = Harness::new(spec_limits(on), TenantLimits::default(), KV_BYTES);
        let mut streams = vec![h.submit("a", p.clone(), s.clone(), 1024)];
        run(&mut h, &mut streams);
        out.push(seen(&streams[0]));
        counts.0 += h.metric("starling_spec_draft_tokens_total");
        counts.1 += h.metric("starling_spec_accepted_tokens_total");
        assert_eq!(h.kv_used(), 0, "every block returned");
    }
    (out, counts)
}

/// Every prompt, greedy and sampled (each sampled case with its own seed).
fn cases(prompts: &[&str], max_tokens: u32) -> Vec<(Vec<u32>, SamplingConfig)> {
    let mut out = vec![];
    for (i, user) in prompts.iter().enumerate() {
        out.push((chat(user), params(0.0, 1, max_tokens)));
        out.push((chat(user), params(0.8, 100 + i as u64, max_tokens)));
    }
    out
}

#[test]
fn drafts_change_no_token_logprob_or_finish_alone_or_in_a_batch_of_16() {
    let grounded = cases(&GROUNDED, 64);
    let open = cases(&OPEN, 64);
    let (off_g, _) = alone(false, &grounded);
    let (on_g, (drafted_g, accepted_g)) = alone(true, &grounded);
    let (off_o, _) = alone(false, &open);
    let (on_o, (drafted_o, accepted_o)) = alone(true, &open);
    for (i, (off, on)) in off_g.iter().zip(&on_g).chain(off_o.iter().zip(&on_o)).enumerate() {
        assert_eq!(off, on, "case {i} changed with speculation");
        assert!(off.finish.is_some() && off.tokens.len() > 8, "case {i}: {off:?}");
    }
    // The grounded prompts are mostly accepted, the open ones mostly rejected.
    assert!(drafted_g > 40.0 && accepted_g > 0.6 * drafted_g, "grounded: {accepted_g} of {drafted_g} accepted");
    assert!(drafted_o > 0.0 && accepted_o < 0.5 * drafted_o, "open: {accepted_o} of {drafted_o} accepted");

    // All sixteen at once (ten cases, six of them twice) on an engine that speculates, with
    // `max_tokens` from 8 to 64, so the batch shrinks as they end and drafts come back
    // (a full batch drafts little: see `speculate::threshold`). Each output is the start of
    // the case's output alone.
    let all: Vec<_> = grounded.iter().chain(&open).cloned().collect();
    let want: Vec<&Seen> = off_g.iter().chain(&off_o).collect();
    let mut h = Harness::new(spec_limits(true), TenantLimits::default(), KV_BYTES);
    let order: Vec<(usize, u32)> = (0..16).map(|i| (i % all.len(), (8 + 4 * i as u32).min(64))).collect();
    let mut streams: Vec<Stream> = order
        .iter()
        .map(|&(i, max_tokens)| {
            let mut sampling = all[i].1.clone();
            sampling.max_tokens = max_tokens;
            h.submit("a", all[i].0.clone(), sampling, 1024)
        })
        .collect();
    run(&mut h, &mut streams);
    for (s, &(i, max_tokens)) in streams.iter().zip(&order) {
        let (got, alone) = (seen(s), want[i]);
        let n = alone.tokens.len().min(max_tokens as usize);
        assert_eq!(got.tokens, alone.tokens[..n], "case {i} differs in the batch");
        let finish = if n < alone.tokens.len() { Some(FinishReason::Length) } else { alone.finish };
        assert_eq!(got.finish, finish, "case {i}");
    }
    let accepted = h.metric("starling_spec_accepted_tokens_total");
    assert!(accepted > 10.0, "the batch speculated: {accepted} accepted");
    assert_eq!(h.kv_used(), 0, "every block returned");
}

/// Stop strings, `max_tokens`, logit bias, penalties and `min_tokens` each end or steer a
/// copying answer exactly as without drafts.
#[test]
fn stops_lengths_bias_and_penalties_behave_as_without_drafts() {
    let base =
        || SamplingParams { temperature: Some(0.0), max_tokens: Some(64), logprobs: Some(2), ..Default::default() };
    let eiffel = tokenizer().encode(" Eiffel", false).unwrap();
    let variants = [
        ("stop string", SamplingParams { stop: Some(vec!["1889".into()]), ..base() }),
        ("stop string mid-token", SamplingParams { stop: Some(vec!["Gust".into()]), ..base() }),
        ("max_tokens", SamplingParams { max_tokens: Some(13), ..base() }),
        ("logit bias", SamplingParams { logit_bias: Some(vec![(eiffel[0], -100.0)]), ..base() }),
        (
            "penalties",
            SamplingParams {
                repetition_penalty: Some(1.3),
                presence_penalty: Some(0.5),
                frequency_penalty: Some(0.3),
                ..base()
            },
        ),
        ("min_tokens", SamplingParams { min_tokens: Some(40), ..base() }),
        ("sampled", SamplingParams { temperature: Some(1.0), top_k: Some(5), seed: Some(3), ..base() }),
    ];
    let limits = SamplerLimits { vocab_size: 49152, max_stop_strings: 8, default_max_tokens: 16, max_tokens_cap: 4096 };
    let prompt = chat(GROUNDED[0]);
    for (name, p) in variants {
        let case = (prompt.clone(), p.validate(&limits).unwrap());
        let (off, _) = alone(false, std::slice::from_ref(&case));
        let (on, (drafted, _)) = alone(true, std::slice::from_ref(&case));
        assert_eq!(off, on, "{name} changed with speculation");
        assert!(drafted > 0.0, "{name}: nothing was drafted, so nothing was tested");
        if name.starts_with("stop string") {
            assert_eq!(off[0].finish, Some(FinishReason::Stop), "{name}: {off:?}");
        }
        if name == "max_tokens" {
            assert_eq!((off[0].finish, off[0].tokens.len()), (Some(FinishReason::Length), 13));
        }
    }
}

/// A session's second turn reuses what the first left in the cache, to the same position
/// with and without drafts, and the parked blocks are the same.
#[test]
fn session_turns_and_the_kv_cache_end_where_they_would_without_drafts() {
    let outcome = |on: bool| {
        let mut h = Harness::new(spec_limits(on), TenantLimits::default(), KV_BYTES);
        let first = chat(GROUNDED[1]);
        let mut s1 = h.submit_in_session("a", "chat", first.clone(), params(0.0, 1, 48));
        run(&mut h, std::slice::from_mut(&mut s1));
        let mut second = first;
        second.extend(s1.tokens());
        second.extend(chat("Now add a row for Erin - Writer."));
        let known = second.len();
        let mut s2 = h.submit_in_session("a", "chat", second, params(0.0, 1, 48));
        run(&mut h, std::slice::from_mut(&mut s2));
        let drafted = h.metric("starling_spec_draft_tokens_total");
        // The parked session holds the blocks of its positions (all but its last token), no more.
        let positions = known + s2.tokens().len() - 1;
        assert_eq!(h.kv_used(), positions.div_ceil(16), "on = {on}");
        (seen(&s1), seen(&s2), h.kv_used(), drafted)
    };
    let (off1, off2, off_kv, _) = outcome(false);
    let (on1, on2, on_kv, drafted) = outcome(true);
    assert!(drafted > 0.0);
    assert_eq!((off1, off2), (on1, on2.clone()));
    assert!(on2.usage.is_some_and(|u| u.cached_tokens > 40), "the second turn reused the first: {:?}", on2.usage);
    assert_eq!(off_kv, on_kv, "the parked session holds the same blocks");
}

#[test]
fn a_cancelled_speculating_request_frees_its_blocks_within_one_tick() {
    let mut h = Harness::new(spec_limits(true), TenantLimits::default(), KV_BYTES);
    let params =
        SamplingParams { temperature: Some(0.0), max_tokens: Some(1000), ignore_eos: Some(true), ..Default::default() };
    let limits = SamplerLimits { vocab_size: 49152, max_stop_strings: 8, default_max_tokens: 16, max_tokens_cap: 4096 };
    let mut s = h.submit("a", chat(GROUNDED[1]), params.validate(&limits).unwrap(), 4096);
    while h.metric("starling_spec_accepted_tokens_total") < 20.0 {
        h.run_tick();
        s.drain();
        assert!(s.finish().is_none() && s.tokens().len() < 900, "still generating");
    }
    assert!(h.kv_used() > 0);
    let mut reply = h.cancel("a", &s.name);
    h.run_tick();
    assert!(reply.try_recv().is_ok_and(|r| r.is_ok()), "the cancel was answered in the tick");
    assert_eq!(h.kv_used(), 0, "its blocks, drafted positions included, are free after one tick");
    s.drain();
    assert_eq!(s.finish(), Some(FinishReason::Cancelled));
}

#[test]
fn a_request_may_opt_out() {
    let mut case = (chat(GROUNDED[1]), params(0.0, 1, 48));
    let (on, (drafted, _)) = alone(true, std::slice::from_ref(&case));
    assert!(drafted > 0.0);
    case.1.speculative = false;
    let (opted_out, (none, _)) = alone(true, std::slice::from_ref(&case));
    assert_eq!((on, none), (opted_out, 0.0));
}

/// Over HTTP: the native and OpenAI routes take `speculative: false`; only requests that
/// allow it draft, and the output is the same either way.
#[test]
fn the_http_routes_take_the_opt_out() {
    use crate::support::{TestServer, get_as, post_json};
    use serde_json::json;
    let server = TestServer::start(|c| c.models[0].speculative = Some(SpeculativeConfig::default()));
    let drafted = || {
        let text = get_as(server.addr, None, "/metrics").text();
        let line = text.lines().find(|l| l.starts_with("starling_spec_draft_tokens_total{"));
        line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
    };
    let prompt = "one two three four five six seven eight. ".repeat(4);
    let body = |speculative: bool| {
        json!({"prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": true, "stream": false,
               "speculative": speculative})
    };
    let off = post_json(server.addr, "/v1/generate", &body(false));
    assert_eq!(off.status, 200, "{}", off.text());
    assert_eq!(drafted(), 0.0, "an opted-out request drafts nothing");
    let on = post_json(server.addr, "/v1/generate", &body(true));
    assert_eq!(on.status, 200, "{}", on.text());
    assert!(drafted() > 0.0, "a request that allows it drafts");
    assert_eq!(off.json()["text"], on.json()["text"]);
    assert_eq!(off.json()["tokens"], on.json()["tokens"]);

    let chat = json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "speculative": false});
    assert_eq!(post_json(server.addr, "/v1/chat/completions", &chat).status, 200);
    let bad = post_json(server.addr, "/v1/generate", &json!({"prompt": "x", "speculative": "no"}));
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("speculative"), "{}", bad.text());
}

/// A stop string matched by a token in the middle of a step (tokens sampled after it in
/// the same step are dropped): the client sees what plain decoding gives.
#[test]
fn a_stop_string_inside_a_step_drops_the_tokens_sampled_after_it() {
    let limits = SamplerLimits { vocab_size: 49152, max_stop_strings: 8, default_max_tokens: 16, max_tokens_cap: 4096 };
    let prompt = chat(GROUNDED[0]);
    let (plain, _) = alone(false, &[(prompt.clone(), params(0.0, 1, 64))]);
    let text: String = plain[0]
        .tokens
        .iter()
        .map(|e| if let StreamEvent::Token { text, .. } = e { text.as_str() } else { "" })
        .collect();
    let mut exercised = 0;
    // Each longer word of the plain answer as the stop string.
    for word in text.split_whitespace().filter(|w| w.len() >= 4).take(12) {
        let p = SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(64),
            stop: Some(vec![word.into()]),
            ..Default::default()
        };
        let case = (prompt.clone(), p.validate(&limits).unwrap());
        let (off, _) = alone(false, std::slice::from_ref(&case));
        let mut h = Harness::new(spec_limits(true), TenantLimits::default(), KV_BYTES);
        let mut s = h.submit("a", case.0.clone(), case.1.clone(), 1024);
        while s.finish().is_none() {
            let (accepted, before) = (h.metric("starling_spec_accepted_tokens_total"), s.tokens().len());
            h.run_tick();
            s.drain();
            if s.finish().is_some() {
                // The last step sampled its token plus the draft tokens it kept; the client
                // got them up to the one that completed the stop string.
                let sampled = 1 + (h.metric("starling_spec_accepted_tokens_total") - accepted) as usize;
                exercised += usize::from(s.tokens().len() - before < sampled);
            }
        }
        assert_eq!(seen(&s), off[0], "stop {word:?}");
        assert_eq!(h.kv_used(), 0);
    }
    assert!(exercised > 0, "no stop string landed inside a multi-token step");
}

/// When the KV cache is too small for every sequence, speculating sequences are preempted
/// and recomputed like any other, with the same output; drafts never take blocks that a
/// plain step needs.
#[test]
fn speculating_sequences_survive_preemption_unchanged() {
    let block_bytes = crate::scheduler::model().kv_layout(16).block_bytes() as u64;
    let cases = cases(&GROUNDED, 48);
    let (want, _) = alone(false, &cases);
    let mut h = Harness::new(spec_limits(true), TenantLimits::default(), block_bytes * 14);
    let mut streams: Vec<Stream> = cases.iter().map(|(p, s)| h.submit("a", p.clone(), s.clone(), 1024)).collect();
    run(&mut h, &mut streams);
    for (i, (s, want)) in streams.iter().zip(&want).enumerate() {
        assert_eq!(&seen(s), want, "case {i} after preemption");
    }
    assert!(h.stats().preempted > 0, "the cap forced preemption");
    assert!(h.metric("starling_spec_accepted_tokens_total") > 0.0, "and they speculated");
    assert_eq!(h.kv_used(), 0);
}

/// A token budget that leaves little beyond one token per sequence: every decoding
/// sequence still gets its step each tick (drafts take only what is left), and a context
/// limit cuts a speculating sequence exactly where plain decoding stops.
#[test]
fn drafts_take_only_spare_budget_and_stop_at_the_context_end() {
    let cases = cases(&GROUNDED, 40);
    let (want, _) = alone(false, &cases);
    let mut h = Harness::new(
        EngineLimits { speculative: Some(SpeculativeConfig::default()), ..limits(16, 8) },
        TenantLimits::default(),
        KV_BYTES,
    );
    let mut streams: Vec<Stream> = cases.iter().map(|(p, s)| h.submit("a", p.clone(), s.clone(), 1024)).collect();
    for _ in 0..2000 {
        h.run_tick();
        streams.iter_mut().for_each(Stream::drain);
        let decoding = h
            .world
            .query::<&starling::engine::components::Phase>()
            .iter(&h.world)
            .filter(|p| **p == starling::engine::components::Phase::Decode)
            .count();
        let plan = h.world.resource::<starling::engine::resources::BatchPlan>();
        let steps = plan.items.iter().filter(|i| i.samples).count();
        assert!(plan.total_tokens() <= 8, "the budget holds drafts");
        if steps > 0 && plan.items.iter().all(|i| i.samples) {
            assert!(steps >= decoding.min(8), "every decoding sequence stepped: {steps} of {decoding}");
        }
        if streams.iter().all(|s| s.finish().is_some()) {
            break;
        }
    }
    for (i, (s, want)) in streams.iter().zip(&want).enumerate() {
        assert_eq!(&seen(s), want, "case {i} with a tight budget");
    }

    let prompt = chat(GROUNDED[2]);
    let n_ctx = prompt.len() + 9;
    let case = (prompt, params(0.0, 1, 64));
    let outcome = |on: bool| {
        let limits = EngineLimits { n_ctx, speculative: on.then(SpeculativeConfig::default), ..limits(16, 512) };
        let mut h = Harness::new(limits, TenantLimits::default(), KV_BYTES);
        let mut s = vec![h.submit("a", case.0.clone(), case.1.clone(), 1024)];
        run(&mut h, &mut s);
        (seen(&s[0]), h.metric("starling_spec_draft_tokens_total"))
    };
    let (off, _) = outcome(false);
    let (on, drafted) = outcome(true);
    assert_eq!(off, on);
    assert_eq!((off.finish, off.tokens.len()), (Some(FinishReason::Length), 9));
    assert!(drafted > 0.0);
}

/// `bench --speculative` on a small workload: paired runs, the same tokens off and on,
/// figures for each task and set, and step times for 1 to 9 positions.
#[test]
fn the_speculative_bench_measures_a_small_workload() {
    use starling::bench::BenchSettings;
    use starling::bench::speculative::{TASKS, Workload, measure_workload};
    let settings = BenchSettings {
        model: crate::model::model_path(),
        threads: 2,
        reps: 1,
        engine_concurrency: vec![],
        contexts: vec![],
        json_schemas: vec![],
        speculative: true,
        kv_dtype: starling::config::KvDtype::F32,
    };
    let tasks = [TASKS[3], TASKS[7], TASKS[9]];
    let w = Workload { tasks: &tasks, max_tokens: 24, batch: 4 };
    let mut phases = vec![];
    let f = measure_workload(&settings, w, &mut |s| phases.push(s.phase.to_owned())).expect("the bench runs");
    assert_eq!(f.verify_ms.iter().map(|(rows, _)| *rows).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
    assert!(f.verify_ms[8].1 > f.verify_ms[0].1, "nine positions cost more than one: {:?}", f.verify_ms);
    assert_eq!(
        f.tasks.iter().map(|t| (t.name.as_str(), t.grounded)).collect::<Vec<_>>(),
        [("passage-answer", true), ("restate", true), ("story", false)]
    );
    assert!(f.tasks.iter().all(|t| t.tokens > 0 && t.off_tok_s > 0.0 && t.on_tok_s > 0.0), "{:?}", f.tasks);
    assert!(f.tasks[..2].iter().any(|t| t.accepted > 0), "the grounded tasks kept drafts: {:?}", f.tasks);
    for set in [&f.grounded_single, &f.open_single, &f.grounded_batch, &f.open_batch] {
        assert!(set.off_tok_s > 0.0 && set.on_tok_s > 0.0 && (set.speedup - set.on_tok_s / set.off_tok_s).abs() < 1e-9);
    }
    // The prompt-lookup ceiling: never below plain decoding; above it where the grounded
    // outputs copied their prompts (they kept drafts); given for single streams only.
    assert!(f.tasks.iter().all(|t| t.ceiling.is_finite() && t.ceiling >= 1.0), "{:?}", f.tasks);
    assert!(f.tasks.iter().any(|t| t.grounded && t.accepted > 0 && t.ceiling > 1.0), "{:?}", f.tasks);
    assert!(f.grounded_single.ceiling.is_some_and(|c| c > 1.0) && f.open_single.ceiling.is_some_and(|c| c >= 1.0));
    assert!(f.grounded_batch.ceiling.is_none() && f.open_batch.ceiling.is_none());
    assert!(phases.iter().any(|p| p.contains("4 grounded sequences")), "{phases:?}");
}
