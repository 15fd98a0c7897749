//! Sampler: validation, each step with fixed logits, the default chain at a fixed seed,
//! properties of every step, stop strings and the content policy.

use std::sync::Arc;

use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starling::error::ErrorKind;
use starling::sampler::steps::{self, Candidates};
use starling::sampler::{
    GateEnd, PolicyError, PolicyRules, SamplerLimits, SamplerState, SamplerStep, SamplingConfig, SamplingParams,
    TextGate, TokenFinish,
};
use starling::types::TokenId;

fn limits() -> SamplerLimits {
    SamplerLimits { vocab_size: 8, max_stop_strings: 4, default_max_tokens: 16, max_tokens_cap: 64 }
}

fn config(params: SamplingParams) -> SamplingConfig {
    params.validate(&limits()).expect("valid params")
}

/// Plain sampling from the softmax: every truncation off.
fn plain(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: Some(temperature),
        top_k: Some(0),
        top_p: Some(1.0),
        min_p: Some(0.0),
        seed: Some(seed),
        ..Default::default()
    }
}

fn greedy() -> SamplingParams {
    plain(0.0, 0)
}

fn sample_once(
    params: SamplingParams,
    logits: &[f32],
    history: &[TokenId],
    n_generated: usize,
    eog: &[TokenId],
) -> starling::sampler::Sampled {
    let mut state = SamplerState::new(config(params));
    state.sample(&mut logits.to_vec(), history, n_generated, eog)
}

fn ids(c: &Candidates) -> Vec<TokenId> {
    c.as_slice().iter().map(|x| x.id).collect()
}

fn ln_probs(p: &[f32]) -> Vec<f32> {
    p.iter().map(|x| x.ln()).collect()
}

// ---------- validation ----------

fn rejects(params: SamplingParams, field: &str, range: &str) {
    let err = params.validate(&limits()).expect_err(field);
    assert_eq!(err.kind, ErrorKind::InvalidParameter);
    assert_eq!(err.status(), 422);
    assert_eq!(err.param.as_deref(), Some(field));
    assert!(err.message.contains(&format!("`{field}`")), "{}", err.message);
    assert!(err.message.contains(range), "{} lacks {range}", err.message);
}

#[test]
fn every_out_of_range_parameter_is_a_422_naming_field_and_range() {
    let p = SamplingParams::default;
    rejects(SamplingParams { temperature: Some(-0.1), ..p() }, "temperature", "[0, 2]");
    rejects(SamplingParams { temperature: Some(2.5), ..p() }, "temperature", "[0, 2]");
    rejects(SamplingParams { temperature: Some(f32::NAN), ..p() }, "temperature", "[0, 2]");
    rejects(SamplingParams { top_p: Some(0.0), ..p() }, "top_p", "(0, 1]");
    rejects(SamplingParams { top_p: Some(1.01), ..p() }, "top_p", "(0, 1]");
    rejects(SamplingParams { min_p: Some(1.0), ..p() }, "min_p", "[0, 1)");
    rejects(SamplingParams { min_p: Some(-0.1), ..p() }, "min_p", "[0, 1)");
    rejects(SamplingParams { repetition_penalty: Some(0.0), ..p() }, "repetition_penalty", "> 0");
    rejects(SamplingParams { frequency_penalty: Some(2.1), ..p() }, "frequency_penalty", "[-2, 2]");
    rejects(SamplingParams { presence_penalty: Some(-2.1), ..p() }, "presence_penalty", "[-2, 2]");
    rejects(SamplingParams { logit_bias: Some(vec![(8, 1.0)]), ..p() }, "logit_bias", "[0, 8)");
    rejects(SamplingParams { logit_bias: Some(vec![(1, 101.0)]), ..p() }, "logit_bias", "[-100, 100]");
    rejects(SamplingParams { max_tokens: Some(0), ..p() }, "max_tokens", "[1, 64]");
    rejects(SamplingParams { max_tokens: Some(65), ..p() }, "max_tokens", "[1, 64]");
    rejects(SamplingParams { max_tokens: Some(4), min_tokens: Some(5), ..p() }, "min_tokens", "[0, max_tokens = 4]");
    rejects(SamplingParams { stop: Some(vec!["a".into(); 5]), ..p() }, "stop", "at most 4");
    rejects(SamplingParams { stop: Some(vec![String::new()]), ..p() }, "stop", "empty");
    rejects(SamplingParams { stop_token_ids: Some(vec![9]), ..p() }, "stop_token_ids", "[0, 8)");
    rejects(SamplingParams { logprobs: Some(21), ..p() }, "logprobs", "[0, 20]");
    rejects(SamplingParams { samplers: Some(vec!["top_q".into()]), ..p() }, "samplers", "top_q");
    rejects(
        SamplingParams { samplers: Some(vec!["top_k".into(), "top_k".into()]), ..p() },
        "samplers",
        "more than once",
    );
}

#[test]
fn banning_the_whole_vocabulary_is_rejected() {
    let all: Vec<_> = (0..8).map(|id| (id, -100.0)).collect();
    rejects(SamplingParams { logit_bias: Some(all), ..Default::default() }, "logit_bias", "at least one");
}

#[test]
fn defaults_follow_llama_cpp_server() {
    let c = config(SamplingParams { seed: Some(5), ..Default::default() });
    assert_eq!((c.temperature, c.top_k, c.top_p, c.min_p), (0.8, 40, 0.95, 0.05));
    assert_eq!((c.repetition_penalty, c.repeat_last_n), (1.0, 64));
    assert_eq!((c.frequency_penalty, c.presence_penalty), (0.0, 0.0));
    assert_eq!((c.max_tokens, c.min_tokens, c.logprobs, c.ignore_eos), (16, 0, 0, false));
    assert_eq!(c.order, SamplerStep::DEFAULT_ORDER.to_vec());
    assert_eq!(c.seed, 5);
}

#[test]
fn samplers_order_is_parsed_and_pipeline_default_applies_without_it() {
    let names = vec!["top_k".to_string(), "temp".to_string(), "penalties".to_string()];
    let c = config(SamplingParams { samplers: Some(names), ..Default::default() });
    assert_eq!(c.order, vec![SamplerStep::TopK, SamplerStep::Temperature, SamplerStep::Penalties]);
    let pipeline = [SamplerStep::MinP, SamplerStep::Temperature];
    let c = SamplingParams::default().validate_with_order(&limits(), &pipeline).unwrap();
    assert_eq!(c.order, pipeline.to_vec());
}

#[test]
fn missing_seed_is_random_and_reported() {
    let a = config(SamplingParams::default());
    let b = config(SamplingParams::default());
    assert_ne!(a.seed, b.seed, "two random seeds collided");
    assert_eq!(SamplerState::new(a.clone()).seed(), a.seed);
}

#[test]
fn logit_bias_accepts_openai_map_and_llama_cpp_list() {
    let map: SamplingParams = serde_json::from_str(r#"{"logit_bias":{"3":-100,"1":2.5}}"#).unwrap();
    let list: SamplingParams = serde_json::from_str(r#"{"logit_bias":[[3,-100],[1,2.5]]}"#).unwrap();
    assert_eq!(config(map).logit_bias, vec![(1, 2.5), (3, -100.0)]);
    assert_eq!(config(list).logit_bias, vec![(1, 2.5), (3, -100.0)]);
    assert!(serde_json::from_str::<SamplingParams>(r#"{"logit_bias":{"x":1}}"#).is_err());
    let dup = SamplingParams { logit_bias: Some(vec![(2, 1.0), (2, -3.0)]), ..Default::default() };
    assert_eq!(config(dup).logit_bias, vec![(2, -3.0)]);
}

// ---------- each step with fixed logits ----------

#[test]
fn logit_bias_bans_and_boosts() {
    let logits = [1.0, 2.0, 3.0, 0.0];
    let ban = SamplingParams { logit_bias: Some(vec![(2, -100.0)]), ..greedy() };
    assert_eq!(sample_once(ban, &logits, &[], 0, &[]).token, 1);
    let boost = SamplingParams { logit_bias: Some(vec![(0, 5.0)]), ..greedy() };
    assert_eq!(sample_once(boost, &logits, &[], 0, &[]).token, 0);
}

#[test]
fn eos_is_masked_until_min_tokens_and_always_with_ignore_eos() {
    let logits = [1.0, 2.0, 0.5, 9.0];
    let eog = [3];
    let min2 = || SamplingParams { min_tokens: Some(2), ..greedy() };
    assert_eq!(sample_once(min2(), &logits, &[], 0, &eog).token, 1);
    assert_eq!(sample_once(min2(), &logits, &[], 1, &eog).token, 1);
    let at_min = sample_once(min2(), &logits, &[], 2, &eog);
    assert_eq!((at_min.token, at_min.is_stop_token), (3, true));
    let ignore = SamplingParams { ignore_eos: Some(true), ..greedy() };
    let s = sample_once(ignore, &logits, &[], 10, &eog);
    assert_eq!((s.token, s.is_stop_token), (1, false));
}

#[test]
fn stop_token_ids_stop_and_are_masked_before_min_tokens() {
    let logits = [1.0, 2.0, 7.0, 0.0];
    let stop = || SamplingParams { stop_token_ids: Some(vec![2]), min_tokens: Some(1), ..greedy() };
    assert_eq!(sample_once(stop(), &logits, &[], 0, &[]).token, 1);
    let s = sample_once(stop(), &logits, &[], 1, &[]);
    assert_eq!((s.token, s.is_stop_token), (2, true));
}

#[test]
fn finish_after_reports_stop_then_length() {
    let state = SamplerState::new(config(SamplingParams { max_tokens: Some(3), ..greedy() }));
    let s = |is_stop_token| starling::sampler::Sampled { token: 0, logprob: 0.0, top_logprobs: vec![], is_stop_token };
    assert_eq!(state.finish_after(&s(true), 1), Some(TokenFinish::Stop));
    assert_eq!(state.finish_after(&s(false), 2), None);
    assert_eq!(state.finish_after(&s(false), 3), Some(TokenFinish::Length));
    assert_eq!(TokenFinish::Length.as_str(), "length");
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let mut c = Candidates::from_logits(&[2.0, -1.0, 0.5]);
    steps::apply_repetition_penalty(&mut c, &[(0, 1), (1, 3)], 2.0);
    let got: Vec<f32> = c.as_slice().iter().map(|x| x.logit).collect();
    assert_eq!(got, vec![1.0, -2.0, 0.5]);
}

#[test]
fn repetition_penalty_looks_only_at_the_last_repeat_last_n_tokens() {
    let logits = [2.0, 1.9, 1.8, 0.0];
    let p = |n| SamplingParams { repetition_penalty: Some(1.5), repeat_last_n: Some(n), ..greedy() };
    // Token 0 is in history but outside a window of 2: it wins.
    assert_eq!(sample_once(p(2), &logits, &[0, 1, 1], 3, &[]).token, 0);
    // A window of 3 sees it: 2.0 / 1.5 < 1.8 (token 1 is penalised too).
    assert_eq!(sample_once(p(3), &logits, &[0, 1, 1], 3, &[]).token, 2);
    assert_eq!(sample_once(p(0), &logits, &[0, 1, 1], 3, &[]).token, 0);
}

#[test]
fn frequency_and_presence_follow_openai() {
    let mut counts = Vec::new();
    steps::count_tokens(&[2, 0, 2, 2], &mut Vec::new(), &mut counts);
    assert_eq!(counts, vec![(0, 1), (2, 3)]);
    let mut c = Candidates::from_logits(&[1.0, 1.0, 1.0]);
    steps::apply_frequency_presence(&mut c, &counts, 0.5, 0.25);
    let got: Vec<f32> = c.as_slice().iter().map(|x| x.logit).collect();
    assert_eq!(got, vec![0.25, 1.0, -0.75]);
    let p = SamplingParams { frequency_penalty: Some(0.5), ..greedy() };
    assert_eq!(sample_once(p, &[3.0, 2.9, 0.0], &[0], 1, &[]).token, 1);
}

#[test]
fn temperature_scales_and_zero_is_greedy_for_any_seed() {
    let mut c = Candidates::from_logits(&[1.0, 2.0]);
    steps::apply_temperature(&mut c, 0.5);
    assert_eq!(c.logit_of(1), Some(4.0));
    for seed in 0..20 {
        assert_eq!(sample_once(plain(0.0, seed), &[0.0, 1.0, 1.2, 1.1], &[], 0, &[]).token, 2);
    }
}

#[test]
fn top_k_keeps_the_k_best_with_ties_to_the_lower_id() {
    let logits = [0.5, 3.0, 3.0, 1.0, 2.0];
    let mut c = Candidates::from_logits(&logits);
    steps::top_k(&mut c, 2);
    assert_eq!(ids(&c), vec![1, 2]);
    let mut c = Candidates::from_logits(&logits);
    steps::top_k(&mut c, 3);
    assert_eq!(ids(&c), vec![1, 2, 4]);
    let mut c = Candidates::from_logits(&logits);
    steps::top_k(&mut c, 0);
    assert_eq!(c.len(), 5);
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_p() {
    let logits = ln_probs(&[0.15, 0.5, 0.05, 0.3]);
    let kept = |p: f32| {
        let mut c = Candidates::from_logits(&logits);
        steps::top_p(&mut c, p);
        ids(&c)
    };
    assert_eq!(kept(0.4), vec![1]);
    assert_eq!(kept(0.7), vec![1, 3]);
    assert_eq!(kept(0.85), vec![1, 3, 0]);
    assert_eq!(kept(1.0).len(), 4);
}

#[test]
fn min_p_keeps_tokens_at_least_min_p_of_the_best() {
    let logits = ln_probs(&[0.15, 0.5, 0.05, 0.3]);
    let mut c = Candidates::from_logits(&logits);
    steps::min_p(&mut c, 0.2);
    assert_eq!(ids(&c), vec![0, 1, 3]);
    let mut c = Candidates::from_logits(&logits);
    steps::min_p(&mut c, 0.5);
    assert_eq!(ids(&c), vec![1, 3]);
}

#[test]
fn draw_maps_one_uniform_number_onto_the_cumulative_mass() {
    let u = ChaCha8Rng::seed_from_u64(7).random::<f64>();
    let expected = (u * 4.0).floor() as usize;
    let got = steps::draw(&[0.25; 4], &mut ChaCha8Rng::seed_from_u64(7));
    assert_eq!(got, Some(expected));
    assert_eq!(steps::draw(&[0.0, 0.0], &mut ChaCha8Rng::seed_from_u64(7)), None);
}

#[test]
fn when_everything_is_masked_the_raw_argmax_comes_back_with_no_probability() {
    // Seven tokens banned and the eighth (EOS) masked until min_tokens.
    let bans: Vec<_> = (0..7).map(|id| (id, -100.0)).collect();
    let params = SamplingParams { logit_bias: Some(bans), min_tokens: Some(1), ..plain(1.0, 3) };
    let logits = [0.0, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0];
    let mut row = logits.to_vec();
    let s = SamplerState::new(config(params)).sample(&mut row, &[], 0, &[7]);
    assert_eq!((s.token, s.logprob), (1, f32::NEG_INFINITY));
    assert_eq!(row, logits, "the logits row is left as it was");
    let empty = sample_once(greedy(), &[], &[], 0, &[]);
    assert_eq!((empty.token, empty.logprob), (0, f32::NEG_INFINITY));
}

#[test]
fn nan_logits_are_never_drawn() {
    let logits = [f32::NAN, 0.0, f32::NAN, 0.1];
    for seed in 0..50 {
        let t = sample_once(plain(1.0, seed), &logits, &[], 0, &[]).token;
        assert!(t == 1 || t == 3, "drew {t}");
    }
}

/// Eight logits, a history, the default chain (bias → mask → penalties → temperature
/// → top-k → top-p → min-p → draw) with a penalty, at seed 42.
#[test]
fn default_chain_at_a_fixed_seed_gives_fixed_tokens() {
    let logits = [1.0, 2.5, 2.4, 0.3, 2.2, -1.0, 1.9, 0.0];
    let params = SamplingParams {
        seed: Some(42),
        top_k: Some(4),
        repetition_penalty: Some(1.3),
        logit_bias: Some(vec![(6, -100.0)]),
        ..Default::default()
    };
    let mut state = SamplerState::new(config(params));
    let mut history = vec![1];
    let mut tokens = Vec::new();
    for n in 0..12 {
        let s = state.sample(&mut logits.to_vec(), &history, n, &[7]);
        history.push(s.token);
        tokens.push(s.token);
    }
    // Recorded at seed 42; independently, only the four best unbanned tokens can appear.
    assert_eq!(tokens, vec![4, 0, 2, 2, 1, 1, 1, 4, 4, 1, 2, 4]);
    assert!(tokens.iter().all(|t| [0, 1, 2, 4].contains(t)));
}

#[test]
fn same_seed_same_tokens_and_different_seeds_differ() {
    let logits = [0.0f32; 8];
    let run = |seed| {
        let mut state = SamplerState::new(config(plain(1.0, seed)));
        (0..64).map(|n| state.sample(&mut logits.to_vec(), &[], n, &[]).token).collect::<Vec<_>>()
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
}

#[test]
fn logprobs_report_the_chosen_distribution() {
    let logits = ln_probs(&[0.2, 0.5, 0.3]);
    let s = sample_once(SamplingParams { logprobs: Some(2), ..greedy() }, &logits, &[], 0, &[]);
    assert_eq!(s.token, 1);
    assert!((s.logprob - 0.5f32.ln()).abs() < 1e-5);
    assert_eq!(s.top_logprobs.len(), 2);
    assert_eq!((s.top_logprobs[0].0, s.top_logprobs[1].0), (1, 2));
    assert!((s.top_logprobs[1].1 - 0.3f32.ln()).abs() < 1e-5);
    let truncated = SamplingParams { logprobs: Some(3), top_k: Some(2), ..greedy() };
    let s = sample_once(truncated, &logits, &[], 0, &[]);
    assert_eq!(s.top_logprobs.len(), 2, "only the kept candidates have a probability");
    assert!((s.logprob - (0.5f32 / 0.8).ln()).abs() < 1e-5);
    assert!(sample_once(greedy(), &logits, &[], 0, &[]).top_logprobs.is_empty());
}

#[test]
fn chi_square_of_20000_draws_fits_the_distribution() {
    let p = [0.1f32, 0.2, 0.3, 0.4];
    let logits = ln_probs(&p);
    let mut state = SamplerState::new(config(plain(1.0, 1234)));
    let mut counts = [0u32; 4];
    let draws = 20_000;
    for _ in 0..draws {
        counts[state.sample(&mut logits.clone(), &[], 0, &[]).token as usize] += 1;
    }
    let chi2: f64 = counts
        .iter()
        .zip(p)
        .map(|(&o, q)| {
            let e = f64::from(q) * f64::from(draws);
            (f64::from(o) - e).powi(2) / e
        })
        .sum();
    // 3 degrees of freedom: 16.27 is the 0.999 quantile.
    assert!(chi2 < 16.27, "chi2 = {chi2}, counts = {counts:?}");
}

// ---------- properties ----------

fn assert_distribution(c: &Candidates) {
    let probs = c.probabilities();
    assert!(probs.iter().all(|p| p.is_finite() && *p >= 0.0), "{probs:?}");
    let sum: f64 = probs.iter().map(|&p| f64::from(p)).sum();
    assert!((sum - 1.0).abs() < 1e-5, "sum {sum}");
}

fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-20.0f32..20.0, 1..64)
}

proptest! {
    #[test]
    fn every_step_leaves_a_distribution(logits in logits_strategy(), k in 0u32..80, p in 0.01f32..=1.0,
                                        m in 0.0f32..0.99, t in 0.05f32..2.0, ban in 0u32..64) {
        let counts = [(0, 2), (ban, 1)];
        let mut counts = counts.to_vec();
        counts.sort();
        counts.dedup_by_key(|e| e.0);
        let mut c = Candidates::from_logits(&logits);
        if (ban as usize) < logits.len() && logits.len() > 1 {
            steps::apply_logit_bias(&mut c, &[(ban, -100.0)]);
        }
        assert_distribution(&c);
        steps::apply_repetition_penalty(&mut c, &counts, 1.3);
        assert_distribution(&c);
        steps::apply_frequency_presence(&mut c, &counts, 0.7, -0.4);
        assert_distribution(&c);
        steps::apply_temperature(&mut c, t);
        assert_distribution(&c);
        steps::top_k(&mut c, k);
        assert_distribution(&c);
        steps::top_p(&mut c, p);
        assert_distribution(&c);
        steps::min_p(&mut c, m);
        assert_distribution(&c);
    }

    #[test]
    fn top_k_keeps_exactly_min_k_n_best(logits in prop::collection::vec(-3i8..3, 1..64), k in 1u32..80) {
        // Small integer logits make ties common.
        let logits: Vec<f32> = logits.into_iter().map(f32::from).collect();
        let mut c = Candidates::from_logits(&logits);
        steps::top_k(&mut c, k);
        prop_assert_eq!(c.len(), (k as usize).min(logits.len()));
        let mut expected: Vec<TokenId> = (0..logits.len() as TokenId).collect();
        expected.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        expected.truncate(k as usize);
        let mut kept = ids(&c);
        kept.sort();
        expected.sort();
        prop_assert_eq!(kept, expected);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_with_mass_p(logits in logits_strategy(), p in 0.01f32..1.0) {
        let before = Candidates::from_logits(&logits);
        let probs = before.probabilities();
        let mut c = before.clone();
        steps::top_p(&mut c, p);
        let kept = ids(&c);
        let mass: f64 = kept.iter().map(|&i| f64::from(probs[i as usize])).sum();
        let last = f64::from(probs[*kept.last().unwrap() as usize]);
        prop_assert!(mass >= f64::from(p) - 1e-5, "mass {} < p {}", mass, p);
        prop_assert!(mass - last < f64::from(p) + 1e-5, "prefix without last already reaches p");
        // Every kept token is at least as likely as every dropped one.
        let min_kept = kept.iter().map(|&i| probs[i as usize]).fold(f32::INFINITY, f32::min);
        for (i, &q) in probs.iter().enumerate() {
            prop_assert!(kept.contains(&(i as TokenId)) || q <= min_kept);
        }
    }

    #[test]
    fn top_p_pruned_and_fully_sorted_paths_agree(logits in logits_strategy(), p in 0.01f32..1.0, flat: bool) {
        let logits: Vec<f32> = if flat { logits.iter().map(|l| l * 0.01).collect() } else { logits };
        let mut unsorted = Candidates::from_logits(&logits);
        let mut sorted = unsorted.clone();
        sorted.sort_by_rank();
        steps::top_p(&mut unsorted, p);
        steps::top_p(&mut sorted, p);
        prop_assert_eq!(ids(&unsorted), ids(&sorted));
    }

    #[test]
    fn min_p_keeps_exactly_tokens_above_the_scaled_max(logits in logits_strategy(), m in 0.01f32..0.99) {
        let probs = Candidates::from_logits(&logits).probabilities();
        let p_max = probs.iter().copied().fold(0.0f32, f32::max);
        let mut c = Candidates::from_logits(&logits);
        steps::min_p(&mut c, m);
        let kept = ids(&c);
        for (i, &q) in probs.iter().enumerate() {
            let bound = m * p_max;
            if q >= bound * (1.0 + 1e-4) {
                prop_assert!(kept.contains(&(i as TokenId)), "dropped p={} >= {}", q, bound);
            } else if q < bound * (1.0 - 1e-4) {
                prop_assert!(!kept.contains(&(i as TokenId)), "kept p={} < {}", q, bound);
            }
        }
    }

    #[test]
    fn temperature_towards_zero_approaches_argmax(mut logits in logits_strategy(), at in 0usize..64, seed: u64) {
        let at = at % logits.len();
        let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        logits[at] = best + 0.05;
        let mut c = Candidates::from_logits(&logits);
        steps::apply_temperature(&mut c, 1e-3);
        prop_assert!(c.probabilities()[at] > 1.0 - 1e-5);
        let s = sample_once(plain(1e-3, seed), &logits, &[], 0, &[]);
        prop_assert_eq!(s.token as usize, at);
    }

    #[test]
    fn a_banned_token_is_never_drawn(mut logits in prop::collection::vec(-5.0f32..5.0, 2..16), ban in 0usize..16, seed: u64) {
        let ban = ban % logits.len();
        logits[ban] = 50.0; // the most tempting token
        let params = SamplingParams { logit_bias: Some(vec![(ban as TokenId, -100.0)]), seed: Some(seed), temperature: Some(2.0), ..Default::default() };
        let limits = SamplerLimits { vocab_size: logits.len(), ..limits() };
        let mut state = SamplerState::new(params.validate(&limits).unwrap());
        for n in 0..20 {
            prop_assert_ne!(state.sample(&mut logits.clone(), &[], n, &[]).token as usize, ban);
        }
    }
}

// ---------- stop strings ----------

/// Pushes `pieces` through a gate; returns every emitted piece, the end, and `finish`.
fn run_gate(gate: &mut TextGate, pieces: &[&str]) -> (Vec<String>, Option<GateEnd>) {
    let mut emitted = Vec::new();
    for piece in pieces {
        let step = gate.push(piece);
        emitted.push(step.emit);
        if step.end.is_some() {
            return (emitted, step.end);
        }
    }
    emitted.push(gate.finish());
    (emitted, None)
}

/// Every way to cut `text` into 1, 2 and 3 pieces (at char boundaries).
fn splits(text: &str) -> Vec<Vec<&str>> {
    let cuts: Vec<usize> = (1..text.len()).filter(|&i| text.is_char_boundary(i)).collect();
    let mut out = vec![vec![text]];
    for &a in &cuts {
        out.push(vec![&text[..a], &text[a..]]);
        for &b in cuts.iter().filter(|&&b| b > a) {
            out.push(vec![&text[..a], &text[a..b], &text[b..]]);
        }
    }
    out
}

#[test]
fn stop_strings_split_across_pieces_are_caught_and_never_emitted() {
    let text = "Hi there→ END of story";
    let stops = vec!["→ END".to_string(), "never".to_string()];
    let all = splits(text);
    assert!(all.iter().any(|p| p.len() == 3 && p[1].len() < 5 && "→ END".contains(p[1])));
    for pieces in all {
        let mut gate = TextGate::new(&stops, None);
        let (emitted, end) = run_gate(&mut gate, &pieces);
        assert_eq!(end, Some(GateEnd::Stop), "{pieces:?}");
        assert_eq!(emitted.concat(), "Hi there", "{pieces:?}");
        assert!(emitted.iter().all(|e| !e.contains('→') && !e.contains("END")), "{pieces:?}");
    }
}

#[test]
fn a_partial_stop_prefix_is_held_then_released() {
    let mut gate = TextGate::new(&["STOP".to_string()], None);
    assert_eq!(gate.push("go ST").emit, "go ");
    assert_eq!(gate.push("AR").emit, "STAR");
    assert_eq!(gate.push("t ST").emit, "t ");
    assert_eq!(gate.finish(), "ST");
}

#[test]
fn without_stops_text_passes_through_at_once() {
    let mut gate = TextGate::new(&[], None);
    assert_eq!(gate.push("abc").emit, "abc");
    assert_eq!(gate.finish(), "");
}

#[test]
fn after_an_end_nothing_more_is_emitted() {
    let mut gate = TextGate::new(&["x".to_string()], None);
    assert_eq!(gate.push("axb").emit, "a");
    let again = gate.push("more");
    assert_eq!((again.emit.as_str(), again.end), ("", Some(GateEnd::Stop)));
    assert_eq!(gate.finish(), "");
    assert_eq!(gate.ended(), Some(GateEnd::Stop));
}

// ---------- content policy ----------

fn rules() -> Arc<PolicyRules> {
    Arc::new(PolicyRules::new(&["Forbidden Word".to_string()], &[r"secret-\d{3}".to_string()]).unwrap())
}

#[test]
fn input_policy_refuses_matching_prompts_with_content_policy() {
    let r = rules();
    assert!(r.check_input("a harmless prompt").is_ok());
    for prompt in ["say the FORBIDDEN word now", "code secret-042 please"] {
        let err = r.check_input(prompt).unwrap_err();
        assert_eq!((err.kind, err.status()), (ErrorKind::ContentPolicy, 400));
        assert_eq!(ErrorKind::ContentPolicy.as_str(), "content_policy");
        assert!(!err.message.contains("secret"), "the rule is not revealed");
    }
    assert!(r.check_input("secret-04").is_ok());
}

#[test]
fn output_policy_stops_with_content_filter_and_never_emits_the_match() {
    let text = "ok then secret-123 more";
    for pieces in splits(text) {
        let mut gate = TextGate::new(&[], Some(rules()));
        let (emitted, end) = run_gate(&mut gate, &pieces);
        assert_eq!(end, Some(GateEnd::ContentFilter), "{pieces:?}");
        assert_eq!(emitted.concat(), "ok then ", "{pieces:?}");
        assert!(emitted.iter().all(|e| !e.contains('s') && !e.contains('1')), "{pieces:?}");
    }
    assert_eq!(GateEnd::ContentFilter.as_str(), "content_filter");
}

#[test]
fn rule_and_stop_race_the_earliest_wins_and_a_tie_goes_to_the_filter() {
    let stops = vec!["secret".to_string(), "bye".to_string()];
    let mut gate = TextGate::new(&stops, Some(rules()));
    assert_eq!(gate.push("a secret-999").end, Some(GateEnd::ContentFilter));
    let mut gate = TextGate::new(&stops, Some(rules()));
    let step = gate.push("bye secret-999");
    assert_eq!((step.emit.as_str(), step.end), ("", Some(GateEnd::Stop)));
}

#[test]
fn hold_back_is_bounded_by_the_rule_window() {
    let bounded = PolicyRules::new(&[], &["x{2,5}".to_string()]).unwrap();
    assert_eq!(bounded.window(), 5);
    let phrase = PolicyRules::new(&["stop me".to_string()], &[]).unwrap();
    assert!((7..=28).contains(&phrase.window()), "a phrase holds back about its own length: {}", phrase.window());
    let unbounded = PolicyRules::with_regex_window(&[], &["ab+c".to_string()], 8).unwrap();
    assert_eq!(unbounded.window(), 8);
    let mut gate = TextGate::new(&[], Some(Arc::new(unbounded)));
    assert_eq!(gate.push("0123456789").emit, "012");
    assert_eq!(gate.push("z").emit, "3");
    assert_eq!(gate.finish(), "456789z");
    // A match within the window is caught even though it arrived piece by piece.
    let mut gate =
        TextGate::new(&[], Some(Arc::new(PolicyRules::with_regex_window(&[], &["ab+c".to_string()], 8).unwrap())));
    let (emitted, end) = run_gate(&mut gate, &["xxxxa", "bbb", "bc"]);
    assert_eq!((emitted.concat().as_str(), end), ("xxxx", Some(GateEnd::ContentFilter)));
}

#[test]
fn bad_rules_are_typed_errors() {
    let err = PolicyRules::new(&[], &["ok".to_string(), "(unclosed".to_string()]).unwrap_err();
    assert!(matches!(err, PolicyError::InvalidRegex { index: 1, .. }), "{err}");
    let err = PolicyRules::new(&["fine".to_string(), String::new()], &[]).unwrap_err();
    assert!(matches!(err, PolicyError::EmptyPhrase { index: 1 }), "{err}");
    assert!(matches!(PolicyRules::with_regex_window(&[], &[], 0), Err(PolicyError::ZeroWindow)));
}

#[test]
fn empty_regex_matches_never_count() {
    let r = PolicyRules::new(&[], &["z*".to_string()]).unwrap();
    assert!(r.check_input("abc").is_ok());
    assert!(r.check_input("abzc").is_err());
}
