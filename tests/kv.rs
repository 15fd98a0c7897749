//! The KV cache manager: prefix sharing, copy-on-write, LRU/TTL eviction, in-flight
//! protection, handle checks, spill, a state-machine property test, and a multi-turn
//! session on the real model.

use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use starling::config::{KvDtype, SpillConfig};
use starling::kv::arena::{BlockHandle, BlockTable, KvArena, KvError, KvLayout};
use starling::kv::cache::KvCache;
use starling::kv::spill::SpillFile;
use starling::types::Timestamp;

const BT: usize = 4;

fn layout() -> KvLayout {
    KvLayout { n_layer: 2, kv_dim: 2, block_tokens: BT }
}

fn cache(blocks: usize) -> KvCache {
    KvCache::new(KvArena::new(layout(), (layout().block_bytes() * blocks) as u64).unwrap(), None)
}

/// The K row a position of `tokens` gets: a function of the tenant and every token up to
/// it, as real K/V are, so shared blocks hold exactly what a recomputation would write.
fn row(tenant: &str, tokens: &[u32], pos: usize, layer: usize) -> [f32; 2] {
    let h = tokens[..=pos].iter().fold(tenant.len() as u32 * 7919, |h, &t| h.wrapping_mul(31).wrapping_add(t));
    // Small integers: exact in f16 too, so f16 arenas can be checked for equality.
    [(h % 2039) as f32, (pos * 10 + layer) as f32]
}

/// Computes positions `table.len..tokens.len()` (after `prepare`) like a forward pass.
fn fill(kv: &mut KvCache, table: &mut BlockTable, tenant: &str, tokens: &[u32]) {
    for pos in table.len..tokens.len() {
        for layer in 0..2 {
            let k = row(tenant, tokens, pos, layer);
            let v = [-k[0], -k[1]];
            kv.arena_mut().write(table.blocks[pos / BT], layer, pos % BT, &k, &v);
        }
    }
    table.len = tokens.len();
}

fn start(kv: &mut KvCache, tenant: &str, tokens: &[u32]) -> Result<BlockTable, KvError> {
    let mut table = kv.lookup_prefix(tenant, tokens);
    if let Err(e) = kv.prepare(&mut table, tenant, tokens.len()) {
        kv.release(&mut table, tenant, &[]);
        return Err(e);
    }
    assert_frontier_writable(kv, &table);
    fill(kv, &mut table, tenant, tokens);
    Ok(table)
}

/// Every stored position reads back as written.
fn holds(kv: &KvCache, table: &BlockTable, tenant: &str, tokens: &[u32]) -> bool {
    kv.verify(table).is_ok()
        && (0..table.len).all(|pos| {
            (0..2).all(|layer| {
                let (mut k, mut v) = ([0.0f32; 2], [0.0f32; 2]);
                kv.arena().read_key(table.blocks[pos / BT], layer, pos % BT, &mut k);
                kv.arena().read_value(table.blocks[pos / BT], layer, pos % BT, &mut v);
                let want = row(tenant, tokens, pos, layer);
                k == want && v == [-want[0], -want[1]]
            })
        })
}

#[test]
fn full_blocks_are_shared_within_a_tenant_and_never_across() {
    let mut kv = cache(8);
    let prompt: Vec<u32> = (1..=9).collect();
    let mut a = start(&mut kv, "acme", &prompt).unwrap();
    kv.release(&mut a, "acme", &prompt);
    assert_eq!(kv.n_referenced(), 0);
    assert_eq!(kv.stats().blocks_cached, 2, "two full blocks stay cached for reuse");

    let mut b = kv.lookup_prefix("acme", &prompt);
    assert_eq!(b.len, 8);
    assert!(holds(&kv, &b, "acme", &prompt));
    let other = kv.lookup_prefix("globex", &prompt);
    assert_eq!(other.len, 0, "another tenant's identical prompt never hits");
    assert!(other.blocks.is_empty());
    kv.prepare(&mut b, "acme", prompt.len()).unwrap();
    fill(&mut kv, &mut b, "acme", &prompt);
    assert!(holds(&kv, &b, "acme", &prompt));
    let mut c = kv.lookup_prefix("acme", &prompt[..6]);
    assert_eq!(c.len, 4);
    assert_eq!(kv.refs(c.blocks[0]), 2);
    assert_eq!(kv.stats().blocks_shared, 1);
    let s = kv.stats();
    assert_eq!((s.prefix_lookups, s.prefix_hits, s.prefix_hit_tokens), (4, 2, 12));
    kv.release(&mut b, "acme", &prompt);
    kv.release(&mut c, "acme", &[]);
    kv.purge_prefix_cache();
    assert_eq!(kv.n_used(), 0);
}

#[test]
fn writing_inside_a_shared_block_copies_it_first() {
    let mut kv = cache(8);
    let prompt: Vec<u32> = (10..18).collect(); // exactly two blocks
    let mut a = start(&mut kv, "t", &prompt).unwrap();
    kv.publish(&a, "t", &prompt);
    let mut b = kv.lookup_prefix("t", &prompt);
    assert_eq!(b.len, 7, "the last prompt token is always recomputed");
    let shared = b.blocks[1];
    kv.prepare(&mut b, "t", 8).unwrap();
    assert_ne!(b.blocks[1], shared, "the block holding position 7 was copied");
    assert_eq!(b.blocks[0], a.blocks[0], "the untouched block stays shared");
    assert_eq!(kv.stats().cow_copies, 1);
    // B diverges at position 7; A's data must not change.
    let mut diverged = prompt.clone();
    diverged[7] = 99;
    fill(&mut kv, &mut b, "t", &diverged);
    assert!(holds(&kv, &a, "t", &prompt));
    assert!(holds(&kv, &b, "t", &diverged));
    kv.release(&mut a, "t", &prompt);
    kv.release(&mut b, "t", &diverged);
}

#[test]
fn idle_sessions_are_evicted_least_recently_used_first() {
    let mut kv = cache(4);
    for (key, t) in [(1u64, 0u64), (2, 1), (3, 2)] {
        let toks = vec![key as u32; 3];
        let table = start(&mut kv, "t", &toks).unwrap();
        kv.park_session(key, "t", table, &toks, Timestamp(t));
    }
    // Session 1 is touched again: session 2 is now the least recently used.
    let (toks, table) = kv.take_session(1).unwrap();
    kv.park_session(1, "t", table, &toks, Timestamp(3));
    let fresh = start(&mut kv, "t", &[7; 8]).unwrap(); // two blocks: one free + one evicted
    assert_eq!(kv.stats().evictions_lru, 1);
    let (_, two) = kv.take_session(2).unwrap();
    assert_eq!(two.len, 0, "session 2 lost its blocks (its tokens are recomputed)");
    for key in [1u64, 3] {
        let (toks, table) = kv.take_session(key).unwrap();
        assert!(table.len == 3 && holds(&kv, &table, "t", &toks), "session {key} kept its blocks");
    }
    assert!(holds(&kv, &fresh, "t", &[7; 8]));
}

/// Optional work (a speculative draft) takes free blocks only: it never evicts a parked
/// session or a cached prefix, and giving up positions frees the blocks past them.
#[test]
fn free_only_preparation_evicts_nothing_and_truncation_returns_blocks() {
    let mut kv = cache(4);
    let parked = vec![1u32; 3];
    let table = start(&mut kv, "t", &parked).unwrap();
    kv.park_session(1, "t", table, &parked, Timestamp(0));
    let toks = vec![2u32; 4];
    let mut running = start(&mut kv, "t", &toks).unwrap();
    // Two free blocks: growing to 12 positions needs two more, 13 would need three.
    assert!(kv.prepare_from_free(&mut running, "t", 13).is_err());
    assert_eq!((kv.stats().evictions_lru, running.blocks.len()), (0, 1), "nothing evicted, table unchanged");
    kv.prepare_from_free(&mut running, "t", 12).unwrap();
    assert_eq!((kv.arena().n_free(), running.blocks.len()), (0, 3));
    // Positions 4..12 were computed, then given up: their blocks go back.
    kv.truncate(&mut running);
    assert_eq!((kv.arena().n_free(), running.blocks.len()), (2, 1));
    assert!(holds(&kv, &running, "t", &toks));
    let (toks, table) = kv.take_session(1).unwrap();
    assert!(table.len == 3 && holds(&kv, &table, "t", &toks), "the parked session kept its blocks");
    // An ordinary prepare may evict to make room.
    kv.park_session(1, "t", table, &toks, Timestamp(1));
    kv.prepare(&mut running, "t", 16).unwrap();
    assert_eq!(kv.stats().evictions_lru, 1);
    // A session parked with blocks past its positions keeps only its positions' blocks.
    let toks = vec![2u32; 4];
    let before = kv.n_referenced();
    kv.park_session(2, "t", running, &toks, Timestamp(2));
    assert_eq!(before - kv.n_referenced(), 3, "4 positions park in 1 block of the 4 held");
}

#[test]
fn sessions_in_flight_are_never_evicted_and_full_caches_fail_cleanly() {
    let mut kv = cache(3);
    let toks = vec![5u32; 8];
    let table = start(&mut kv, "t", &toks).unwrap();
    kv.park_session(9, "t", table, &toks, Timestamp(0));
    let (toks, running) = kv.take_session(9).unwrap(); // a request holds it now
    let mut other = BlockTable::default();
    let err = kv.prepare(&mut other, "t", 8).unwrap_err();
    assert_eq!(err, KvError::OutOfBlocks { needed: 1, free: 1, total: 3 });
    assert!(other.blocks.is_empty(), "a failed allocation leaves the table untouched");
    assert!(holds(&kv, &running, "t", &toks));
    assert_eq!(kv.stats().evictions_lru, 0);
    assert!(kv.arena().capacity_bytes() <= layout().block_bytes() * 3);
}

#[test]
fn idle_sessions_expire_after_the_ttl_on_the_injected_clock() {
    let mut kv = cache(4);
    let secs = |s: u64| Timestamp::from_duration(Duration::from_secs(s));
    for (key, at) in [(1u64, 0u64), (2, 5)] {
        let toks = vec![1u32; 5];
        let table = start(&mut kv, "t", &toks).unwrap();
        kv.park_session(key, "t", table, &toks, secs(at));
    }
    assert!(kv.expire_idle(secs(6), Duration::from_secs(7)).is_empty());
    assert_eq!(kv.expire_idle(secs(10), Duration::from_secs(7)), vec![1]);
    assert!(!kv.has_session(1) && kv.has_session(2));
    assert_eq!(kv.stats().evictions_ttl, 1);
}

#[test]
fn stale_and_foreign_handles_are_errors_not_reuse() {
    let mut kv = cache(2);
    let toks = vec![3u32; 3];
    let mut a = start(&mut kv, "t", &toks).unwrap();
    let stale = a.clone();
    kv.release(&mut a, "t", &toks);
    let b = start(&mut kv, "u", &[4, 4, 4]).unwrap();
    assert_eq!(b.blocks, stale.blocks, "the freed block was handed out again");
    let mut stale_copy = stale.clone();
    assert!(matches!(kv.prepare(&mut stale_copy, "t", 4), Err(KvError::StaleGeneration { .. })));
    kv.release(&mut stale_copy, "t", &toks); // must not drop b's reference
    assert!(holds(&kv, &b, "u", &[4, 4, 4]));
    let h = b.handle(0, kv.arena());
    let f16 = BlockHandle { dtype: KvDtype::F16, ..h };
    assert!(matches!(kv.arena().block_data(&f16), Err(KvError::DtypeMismatch { .. })));
    let wide = BlockHandle { shape: KvLayout { n_layer: 3, ..layout() }, ..h };
    assert!(matches!(kv.arena().block_data(&wide), Err(KvError::ShapeMismatch { .. })));
    assert_eq!(kv.stats().integrity_errors, 4);
}

fn spill_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("starling-kv-{name}-{}", std::process::id()))
}

fn spilling_cache(dir: &std::path::Path) -> KvCache {
    spilling_cache_of(dir, KvDtype::F32)
}

/// Two blocks of `dtype` in the arena, four pages in the spill file.
fn spilling_cache_of(dir: &std::path::Path, dtype: KvDtype) -> KvCache {
    let block = layout().block_bytes_as(dtype);
    let arena = KvArena::with_dtype(layout(), (block * 2) as u64, dtype).unwrap();
    let spill = SpillFile::create(dir, (block * 4) as u64, block).unwrap();
    KvCache::new(arena, Some(spill))
}

/// Parks a two-block session, then forces it out to the spill file.
fn park_and_spill(kv: &mut KvCache, toks: &[u32]) {
    let table = start(kv, "t", toks).unwrap();
    kv.park_session(1, "t", table, toks, Timestamp(0));
    let mut other = start(kv, "t", &[9; 8]).unwrap();
    kv.release(&mut other, "t", &[]);
    assert_eq!(kv.stats().spill_writes, 2);
}

#[test]
fn evicted_sessions_spill_and_come_back_intact() {
    for dtype in [KvDtype::F32, KvDtype::F16] {
        spill_round_trip(dtype);
    }
}

fn spill_round_trip(dtype: KvDtype) {
    let dir = spill_dir(&format!("roundtrip-{dtype:?}"));
    let mut kv = spilling_cache_of(&dir, dtype);
    assert_eq!(kv.arena().dtype(), dtype);
    let toks: Vec<u32> = (20..27).collect();
    park_and_spill(&mut kv, &toks);
    let (known, table) = kv.take_session(1).unwrap();
    assert_eq!(known, toks);
    assert_eq!(table.len, 7);
    assert!(holds(&kv, &table, "t", &toks));
    let s = kv.stats();
    assert_eq!((s.spill_reads, s.spill_checksum_failures), (2, 0));
    assert_eq!(kv.spill_file().unwrap().n_free(), 4, "restored pages are freed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_corrupted_spill_page_is_discarded_and_its_positions_recomputed() {
    use std::os::unix::fs::FileExt;
    let dir = spill_dir("corrupt");
    let mut kv = spilling_cache(&dir);
    let toks: Vec<u32> = (30..37).collect();
    park_and_spill(&mut kv, &toks);
    let f = std::fs::OpenOptions::new().write(true).open(kv.spill_file().unwrap().path()).unwrap();
    f.write_all_at(&[0xAB; 8], layout().block_bytes() as u64 + 16).unwrap(); // the second page
    let (known, mut table) = kv.take_session(1).unwrap();
    assert_eq!(known, toks, "the session's tokens survive");
    assert_eq!(table.len, 4, "only the intact first page is used");
    assert_eq!(kv.stats().spill_checksum_failures, 1);
    assert!(holds(&kv, &table, "t", &toks));
    kv.prepare(&mut table, "t", toks.len()).unwrap();
    fill(&mut kv, &mut table, "t", &toks); // recomputed from the tokens
    assert!(holds(&kv, &table, "t", &toks));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_builds_the_spill_file_in_either_dtype() {
    let dir = spill_dir("config");
    let mut config = starling::config::KvCacheConfig {
        max_bytes: (layout().block_bytes() * 3) as u64,
        block_tokens: std::num::NonZeroUsize::new(BT).unwrap(),
        dtype: KvDtype::F32,
        session_ttl: Duration::from_secs(60),
        spill: Some(SpillConfig { dir: dir.clone(), max_bytes: (layout().block_bytes() * 2) as u64 }),
    };
    let kv = KvCache::from_config(layout(), &config).unwrap();
    assert_eq!(kv.n_blocks(), 3);
    assert_eq!(kv.spill_file().unwrap().n_pages(), 2);
    drop(kv);
    config.dtype = KvDtype::F16;
    // The same bytes hold twice the f16 blocks; spill pages are f16 blocks too.
    let kv = KvCache::from_config(layout(), &config).unwrap();
    assert_eq!(kv.n_blocks(), 6);
    assert_eq!(kv.spill_file().unwrap().n_pages(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- state machine ----

#[derive(Clone, Debug)]
enum Op {
    Start { tenant: u8, prompt: Vec<u32> },
    Append { seq: usize, tokens: Vec<u32> },
    Truncate { seq: usize, to: usize },
    Free { seq: usize },
    Park { seq: usize, at: u64 },
    Take { key: u64 },
    Expire { now: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let toks = |n| prop::collection::vec(0u32..3, 1..n);
    prop_oneof![
        3 => (0u8..2, toks(11)).prop_map(|(tenant, prompt)| Op::Start { tenant, prompt }),
        3 => (0usize..6, toks(6)).prop_map(|(seq, tokens)| Op::Append { seq, tokens }),
        2 => (0usize..6, 0usize..10).prop_map(|(seq, to)| Op::Truncate { seq, to }),
        2 => (0usize..6).prop_map(|seq| Op::Free { seq }),
        1 => (0usize..6, 0u64..20).prop_map(|(seq, at)| Op::Park { seq, at }),
        1 => (0u64..4).prop_map(|key| Op::Take { key }),
        1 => (0u64..40).prop_map(|now| Op::Expire { now }),
    ]
}

/// The model: live sequences (tenant, tokens, table) and which keys are parked with what.
#[derive(Default)]
struct Model {
    live: Vec<(String, Vec<u32>, BlockTable)>,
    parked: std::collections::HashMap<u64, (String, Vec<u32>)>,
    next_key: u64,
}

fn apply(kv: &mut KvCache, m: &mut Model, op: Op) {
    let pick = |m: &Model, seq: usize| (!m.live.is_empty()).then(|| seq % m.live.len());
    match op {
        Op::Start { tenant, prompt } => {
            let tenant = format!("tenant{tenant}");
            if let Ok(table) = start(kv, &tenant, &prompt) {
                m.live.push((tenant, prompt, table));
            }
        }
        Op::Append { seq, tokens } => {
            let Some(i) = pick(m, seq) else { return };
            let (tenant, toks, table) = &mut m.live[i];
            let mut grown = toks.clone();
            grown.extend(&tokens);
            if kv.prepare(table, tenant, grown.len()).is_ok() {
                assert_frontier_writable(kv, table);
                fill(kv, table, tenant, &grown);
                *toks = grown;
            }
        }
        Op::Truncate { seq, to } => {
            let Some(i) = pick(m, seq) else { return };
            let (_, toks, table) = &mut m.live[i];
            table.len = table.len.min(to);
            toks.truncate(table.len);
        }
        Op::Free { seq } => {
            let Some(i) = pick(m, seq) else { return };
            let (tenant, toks, mut table) = m.live.swap_remove(i);
            kv.release(&mut table, &tenant, &toks);
        }
        Op::Park { seq, at } => {
            let Some(i) = pick(m, seq) else { return };
            let (tenant, toks, table) = m.live.swap_remove(i);
            let key = m.next_key % 4;
            m.next_key += 1;
            let keeps_old = table.blocks.is_empty() && m.parked.contains_key(&key);
            kv.park_session(key, &tenant, table, &toks, Timestamp(at));
            if !keeps_old {
                m.parked.insert(key, (tenant, toks));
            }
        }
        Op::Take { key } => {
            let Some((known, table)) = kv.take_session(key) else { return };
            let (tenant, toks) = m.parked.remove(&key).expect("the model knows every parked session");
            assert!(toks.starts_with(&known), "a session's tokens are what it stored");
            let known = known[..table.len].to_vec();
            m.live.push((tenant, known, table));
        }
        Op::Expire { now } => {
            for key in kv.expire_idle(Timestamp(now), Duration::from_micros(10)) {
                m.parked.remove(&key);
            }
        }
    }
}

fn check(kv: &KvCache, m: &Model, cap: usize) {
    assert!(kv.n_used() <= kv.n_blocks() && kv.arena().capacity_bytes() <= cap);
    let mut holders = std::collections::HashMap::<u32, u32>::new();
    for (tenant, toks, table) in &m.live {
        assert!(holds(kv, table, tenant, toks), "a live sequence finds what it stored");
        for &b in &table.blocks {
            *holders.entry(b).or_default() += 1;
        }
    }
    for (b, n) in holders {
        assert!(kv.refs(b) >= n, "block {b} has {} refs for {n} holders", kv.refs(b));
        assert!(n == 1 || !kv.writable(b), "block {b} is writable yet held by {n} live sequences");
    }
}

/// After `prepare`, every block a sequence will write is writable (held by it alone).
fn assert_frontier_writable(kv: &KvCache, table: &BlockTable) {
    for &b in &table.blocks[table.len / BT..] {
        assert!(kv.writable(b), "prepared block {b} is not exclusively writable");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_cache_sound(ops in prop::collection::vec(op(), 1..60)) {
        let cap = layout().block_bytes() * 10;
        let mut kv = cache(10);
        let mut m = Model::default();
        for op in ops {
            apply(&mut kv, &mut m, op);
            check(&kv, &m, cap);
        }
        for (tenant, toks, mut table) in std::mem::take(&mut m.live) {
            kv.release(&mut table, &tenant, &toks);
        }
        for key in 0..4 {
            kv.drop_session(key, starling::kv::cache::EvictReason::Close);
        }
        prop_assert_eq!(kv.n_referenced(), 0);
        kv.purge_prefix_cache();
        prop_assert_eq!(kv.n_used(), 0);
    }
}

// ---- the real model: a multi-turn session ----

mod engine {
    use starling::config::{Config, Format, KvDtype};
    use starling::engine::load::{LoadedModel, start_model};
    use starling::protocol::{EngineCommand, GenerateRequest, PromptInput, StreamEvent, Usage};
    use starling::sampler::{SamplerLimits, SamplingParams};
    use starling::types::{RequestId, SessionId, TenantId};

    fn engine(dtype: KvDtype) -> (LoadedModel, Config) {
        let mut config = Config::from_str("{}", Format::Json).unwrap();
        config.models[0].kv_cache.dtype = dtype;
        config.models[0].path = crate::model::model_path();
        config.models[0].threads = std::num::NonZeroUsize::new(2).unwrap();
        config.models[0].kv_cache.max_bytes = 64 << 20;
        (start_model(&config, 0).unwrap(), config)
    }

    /// Greedy generation of `n` tokens; returns the tokens and the usage.
    fn generate(m: &LoadedModel, c: &Config, tenant: &str, session: Option<&str>, prompt: &[u32]) -> (Vec<u32>, Usage) {
        let params = SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(12),
            ignore_eos: Some(true),
            ..Default::default()
        };
        let limits = SamplerLimits {
            vocab_size: m.tokenizer.vocab_size(),
            max_stop_strings: c.limits.max_stop_strings,
            default_max_tokens: c.limits.default_max_tokens,
            max_tokens_cap: c.limits.max_tokens_cap,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let request = GenerateRequest {
            constraint: None,
            keep_special: false,
            id: RequestId::next(),
            client_id: None,
            tenant: TenantId::from(tenant),
            session: session.map(SessionId::from),
            input: PromptInput::Tokens(prompt.to_vec()),
            sampling: params.validate(&limits).unwrap(),
            timeout: c.limits.default_timeout,
            received_at: std::time::Instant::now(),
            events: tx,
        };
        m.engine.send(EngineCommand::Generate(Box::new(request))).unwrap();
        let mut ids = Vec::new();
        while let Some(event) = rx.blocking_recv() {
            match event {
                StreamEvent::Token { id, .. } => ids.push(id),
                StreamEvent::Done { usage, .. } => return (ids, usage),
                StreamEvent::Error(e) => panic!("generation failed: {e:?}"),
                StreamEvent::Started { .. } => {}
            }
        }
        panic!("the stream ended without a done event")
    }

    /// With f32, f16 and q8_0 K/V storage.
    #[test]
    fn a_second_turn_reuses_the_session_and_matches_a_fresh_run() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
            second_turn(dtype);
        }
    }

    fn second_turn(dtype: KvDtype) {
        let (m, c) = engine(dtype);
        let turn1 = m
            .tokenizer
            .encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n", true)
            .unwrap();
        let (reply1, usage1) = generate(&m, &c, "alice", Some("chat"), &turn1);
        assert_eq!(usage1.cached_tokens, 0);
        let mut turn2 = turn1.clone();
        turn2.extend(&reply1);
        turn2.extend(
            m.tokenizer
                .encode("<|im_end|>\n<|im_start|>user\nAnd two more?<|im_end|>\n<|im_start|>assistant\n", true)
                .unwrap(),
        );
        let (reply2, usage2) = generate(&m, &c, "alice", Some("chat"), &turn2);
        // Everything the first turn computed is reused: its prompt and all but the last reply token.
        assert_eq!(usage2.cached_tokens, turn1.len() + reply1.len() - 1);
        let (fresh, fresh_usage) = generate(&m, &c, "bob", None, &turn2);
        assert_eq!(fresh_usage.cached_tokens, 0, "another tenant shares nothing");
        assert_eq!(reply2, fresh, "cached K/V give exactly the from-scratch tokens");
        // Same tenant, no session: the published full blocks of turn 2 are shared.
        let (shared, shared_usage) = generate(&m, &c, "alice", None, &turn2);
        assert!(shared_usage.cached_tokens >= 16, "prefix blocks are shared: {shared_usage:?}");
        assert_eq!(shared, fresh);
    }
}
