//! Kernel speed at the default model's shapes (SmolLM2-135M: n_embd 576, FFN 1536, vocab 49152)
//! and Gemma 3 270M's (n_embd 640, FFN 2048).
//!
//! Matmul per kernel set at the model's shapes, and for every weight type on every set
//! (`matmul_type`), float weights against `gemm` (`dense_vs_gemm`), dequantization, RMSNorm,
//! RoPE, attention over the KV arena, and sampling.
//! Throughput is in FLOP (two per weight and x row), so criterion's `Gelem/s` reads GFLOP/s.
//!
//! `cargo bench -j2 --bench kernels` (add a filter such as `matmul/` or
//! `matmul_type/avx512-vnni/Q4_K` to run fewer).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use starling::config::KvDtype;
use starling::kv::arena::{BlockTable, KvArena, KvLayout};
use starling::model::desc::RopeStyle;
use starling::model::ggml_type::GgmlType;
use starling::model::kernels::attention::{AttnShape, CHUNK, ChunkScratch, Span, TileJob};
use starling::model::kernels::{Kernels, MatmulScratch, QMatrix, reference};
use starling::model::ops::{self, AttnScratch};
use starling::sampler::{SamplerLimits, SamplerState, SamplingParams};

/// Deterministic pseudo-random values in [-1, 1) without a rand dependency in the hot loop.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bench_matmul(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
    for kernels in Kernels::available() {
        bench_matmul_with(c, kernels, &pool);
    }
}

fn bench_matmul_with(c: &mut Criterion, kernels: Kernels, pool: &rayon::ThreadPool) {
    let mut group = c.benchmark_group(format!("matmul/{}", kernels.name()));
    group.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    let shapes: [(GgmlType, usize, usize, &[usize]); 5] = [
        (GgmlType::Q4_1, 576, 576, &[1, 16, 64, 512]),
        (GgmlType::Q4_1, 1536, 576, &[1, 16, 64, 512]),
        (GgmlType::Q4_1, 576, 1536, &[1, 16, 64, 512]),
        (GgmlType::Q8_0, 49152, 576, &[1, 16, 64]),
        (GgmlType::Q8_0, 576, 576, &[1, 16, 512]),
    ];
    for (t, rows, cols, ns) in shapes {
        let data = reference::quantize_row(t, &values(rows * cols, 1));
        let w = QMatrix::new(t, rows, cols, &data).expect("matrix");
        for &n in ns {
            let x = values(n * cols, 2);
            let mut y = vec![0.0; n * rows];
            let mut scratch = MatmulScratch::default();
            group.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
            group.bench_function(format!("{t}/{rows}x{cols}/n{n}"), |b| {
                b.iter(|| kernels.matmul(&w, black_box(&x), n, &mut y, &mut scratch, pool))
            });
        }
    }
    group.finish();
}

/// One thread, no pool: the kernels alone, as the model's batch split by sequence runs them
/// (eight x rows per thread for 16 sequences on two threads).
fn bench_matmul_serial(c: &mut Criterion) {
    for kernels in Kernels::available().into_iter().filter(|k| k.name() != "portable") {
        let mut group = c.benchmark_group(format!("matmul_serial/{}", kernels.name()));
        group.sample_size(20).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(300));
        for (t, rows, cols) in [
            (GgmlType::Q4_1, 1536, 576),
            (GgmlType::Q4_1, 576, 1536),
            (GgmlType::Q8_0, 8192, 576),
            (GgmlType::Q4_1, 131072, 576),
        ] {
            let data = reference::quantize_row(t, &values(rows * cols, 1));
            let w = QMatrix::new(t, rows, cols, &data).expect("matrix");
            for n in [1, 8] {
                let x = values(n * cols, 2);
                let (mut y, mut scratch) = (vec![0.0; n * rows], MatmulScratch::default());
                group.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
                group.bench_function(format!("{t}/{rows}x{cols}/n{n}"), |b| {
                    b.iter(|| kernels.matmul_serial(&w, black_box(&x), n, &mut y, &mut scratch))
                });
            }
        }
        group.finish();
    }
}

/// Float weights on one thread: the default kernels on F32 and F16 rows against `gemm` on
/// the same f32 weights (its best case: no conversion), from one x row to a prefill's 512
/// (the figures in ARCHITECTURE, "Float weights").
#[allow(unsafe_code)] // gemm's entry point takes raw pointers and strides.
fn bench_dense_vs_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("dense_vs_gemm");
    group.sample_size(10).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(300));
    let (rows, cols) = (1536, 576);
    let kernels = Kernels::detect();
    let wf = values(rows * cols, 1);
    for n in [1, 8, 16, 64, 512] {
        let x = values(n * cols, 2);
        let mut y = vec![0.0; n * rows];
        group.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
        for t in [GgmlType::F32, GgmlType::F16] {
            let data = reference::quantize_row(t, &wf);
            let w = QMatrix::new(t, rows, cols, &data).expect("matrix");
            let mut scratch = MatmulScratch::default();
            group.bench_function(format!("{}/{t}/{rows}x{cols}/n{n}", kernels.name()), |b| {
                b.iter(|| kernels.matmul_serial(&w, black_box(&x), n, &mut y, &mut scratch))
            });
        }
        group.bench_function(format!("gemm/F32/{rows}x{cols}/n{n}"), |b| {
            b.iter(|| {
                // SAFETY: `y` holds n x rows rows, `x` n x cols, `wf` rows x cols, with the
                // strides given (y and x row-major, wf read as its transpose).
                unsafe {
                    gemm::gemm(
                        n,
                        rows,
                        cols,
                        y.as_mut_ptr(),
                        1,
                        rows as isize,
                        false,
                        black_box(&x).as_ptr(),
                        1,
                        cols as isize,
                        wf.as_ptr(),
                        cols as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            })
        });
    }
    group.finish();
}

/// Every weight type on every kernel set, at three shapes of the models' (rows x cols; the
/// 256-value K-quant and IQ4_XS blocks need rows of whole blocks, so they take the 2048- and
/// 1536-wide down projections where the 32-value types take 640 and 576): a lone x row
/// (decode) and 16 (prefill, batched decode), on two threads.
fn bench_matmul_by_type(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
    for kernels in Kernels::available() {
        let mut group = c.benchmark_group(format!("matmul_type/{}", kernels.name()));
        group.sample_size(10).measurement_time(Duration::from_millis(800)).warm_up_time(Duration::from_millis(200));
        for t in GgmlType::WITH_KERNELS {
            let shapes = if t.block_elems() == 256 {
                [(640, 1024), (640, 2048), (576, 1536)]
            } else {
                [(640, 1024), (2048, 640), (1536, 576)]
            };
            for (rows, cols) in shapes {
                for n in [1, 16] {
                    group.throughput(Throughput::Elements((2 * rows * cols * n) as u64));
                    group.bench_function(format!("{t}/{rows}x{cols}/n{n}"), |b| {
                        // Set up here, so that a filtered-out case costs nothing.
                        let data = reference::quantize_row(t, &values(rows * cols, 4));
                        let w = QMatrix::new(t, rows, cols, &data).expect("matrix");
                        let x = values(n * cols, 5);
                        let (mut y, mut scratch) = (vec![0.0; n * rows], MatmulScratch::default());
                        b.iter(|| kernels.matmul(&w, black_box(&x), n, &mut y, &mut scratch, &pool))
                    });
                }
            }
        }
        group.finish();
    }
}

fn bench_dequantize(c: &mut Criterion) {
    let kernels = Kernels::detect();
    let mut group = c.benchmark_group("dequantize_row");
    group.sample_size(10).measurement_time(Duration::from_millis(500)).warm_up_time(Duration::from_millis(200));
    let types = GgmlType::WITH_KERNELS;
    let cols = 1536;
    for t in types {
        let src = reference::quantize_row(t, &values(cols, 3));
        let mut dst = vec![0.0; cols];
        group.throughput(Throughput::Elements(cols as u64));
        group.bench_function(t.name(), |b| b.iter(|| kernels.dequantize_row(t, black_box(&src), &mut dst)));
    }
    group.finish();
}

fn bench_row_ops(c: &mut Criterion) {
    let mut group = c.benchmark_group("row_ops");
    group.sample_size(10).measurement_time(Duration::from_millis(500)).warm_up_time(Duration::from_millis(200));
    let (x, w) = (values(576, 4), values(576, 5));
    let mut out = vec![0.0; 576];
    group.throughput(Throughput::Elements(576));
    group.bench_function("rms_norm/576", |b| b.iter(|| ops::rms_norm(black_box(&x), &w, 1e-5, &mut out)));
    // SmolLM2's query row: 9 heads of 64, rotated at position 300 with base 100000.
    let inv_freq: Vec<f64> = (0..32).map(|i| 100_000f64.powf(-2.0 * i as f64 / 64.0)).collect();
    let mut q = values(576, 6);
    let (mut cos, mut sin) = (vec![0.0; 32], vec![0.0; 32]);
    group.bench_function("rope/9x64", |b| {
        b.iter(|| {
            ops::rope_angles(black_box(300), &inv_freq, 1.0, &mut cos, &mut sin);
            for head in q.chunks_exact_mut(64) {
                ops::rope(RopeStyle::Adjacent, black_box(head), &cos, &sin);
            }
        })
    });
    group.finish();
}

/// One query row (9 heads, 3 KV heads of 64) over 512 cached positions of one layer (in
/// cache: the arithmetic), and over 4,096 positions of all 30 layers (190 MB of f32 K/V
/// streamed from memory: a long-context decode step's attention), f32 and f16 K/V.
fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(300));
    for (layers, positions) in [(1, 512), (30, 4096)] {
        bench_attention_over(&mut group, layers, positions);
    }
    bench_prefill_tile(&mut group, 4096);
    bench_tile_gemm(&mut group, 4096);
    group.finish();
}

/// A filled arena of `layers` layers (SmolLM2's 3 KV heads of 64) over `positions` positions.
fn arena_over(layers: usize, positions: usize, dtype: KvDtype) -> (KvArena, BlockTable) {
    let layout = KvLayout { n_layer: layers, kv_dim: 192, block_tokens: 16 };
    let cap = layout.blocks_for(positions) * layout.block_bytes_as(dtype);
    let mut arena = KvArena::with_dtype(layout, cap as u64, dtype).expect("arena");
    let mut table = BlockTable::default();
    table.reserve(&mut arena, positions).expect("blocks");
    for pos in 0..positions {
        let (k, v) = (values(192, pos as u64), values(192, pos as u64 + 7));
        for layer in 0..layers {
            arena.write(table.blocks[pos / 16], layer, pos % 16, &k, &v);
        }
    }
    (arena, table)
}

/// The last 16 rows of a `positions`-token prompt (one prefill tile) over every chunk of one
/// layer: the prompt attention's inner work, K/V in L2/L3.
fn bench_prefill_tile(group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>, positions: usize) {
    const ROWS: usize = 16;
    let shape = AttnShape::new(9, 3, 64);
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0] {
        let (arena, table) = arena_over(1, positions, dtype);
        let q = values(ROWS * 576, 9);
        let spans: Vec<Span> = (positions - ROWS..positions).map(|p| Span::new(p, None)).collect();
        let mut scratch = ChunkScratch::default();
        let mut parts = vec![0.0; ROWS * shape.partial_len()];
        group.throughput(Throughput::Elements((ROWS * positions) as u64));
        for kernels in Kernels::available() {
            group.bench_function(format!("{}/{dtype:?}/9x64/tile{ROWS}/pos{positions}", kernels.name()), |b| {
                b.iter(|| {
                    for c in 0..positions.div_ceil(CHUNK) {
                        let ranges: Vec<_> = spans.iter().map(|s| s.chunk(c)).collect();
                        let job = TileJob {
                            shape,
                            layer: 0,
                            q: black_box(&q),
                            ranges: &ranges,
                            blocks: &table.blocks,
                            kv: &arena,
                        };
                        kernels.attend_tile(&job, &mut scratch, &mut parts);
                    }
                })
            });
        }
    }
}

/// The two products of the prefill tile above (scores `Q·Kᵀ` and `P·V`, 16 rows × 9 heads
/// over `positions` f32 K/V) through the `gemm` crate, one thread, without the softmax
/// between them: a lower bound on what the tile would cost on gemm. `whole`: one call per
/// KV head and product over the whole context, K and V contiguous (the layout gemm likes
/// best, which the block arena does not have); `chunk64`: the same per 64-position chunk,
/// as the fixed-order chunk merge needs them.
#[allow(unsafe_code)] // gemm's entry point takes raw pointers and strides.
fn bench_tile_gemm(group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>, positions: usize) {
    const ROWS: usize = 16;
    const GROUP: usize = 3;
    const HEAD: usize = 64;
    let m = ROWS * GROUP;
    // Per KV head: queries [m][HEAD], K by dimension [HEAD][positions], V by position
    // [positions][HEAD], scores [m][positions], output [m][HEAD].
    let q = values(3 * m * HEAD, 9);
    let kt = values(3 * HEAD * positions, 10);
    let v = values(3 * positions * HEAD, 11);
    let mut s = vec![0.0f32; m * positions];
    let mut o = vec![0.0f32; m * HEAD];
    group.throughput(Throughput::Elements((ROWS * positions) as u64));
    for (name, span) in [("whole", positions), ("chunk64", CHUNK)] {
        group.bench_function(format!("gemm/F32/9x64/tile{ROWS}/pos{positions}/{name}"), |b| {
            b.iter(|| {
                for h in 0..3 {
                    let (q, kt, v) = (&q[h * m * HEAD..], &kt[h * HEAD * positions..], &v[h * positions * HEAD..]);
                    for c0 in (0..positions).step_by(span) {
                        // SAFETY: every matrix lies inside its vector: q is m × HEAD, kt
                        // HEAD × positions (columns c0..c0 + span), s m × positions, v
                        // positions × HEAD (rows c0..c0 + span), o m × HEAD.
                        unsafe {
                            gemm::gemm(
                                m,
                                span,
                                HEAD,
                                s.as_mut_ptr().add(c0),
                                1,
                                positions as isize,
                                false,
                                q.as_ptr(),
                                1,
                                HEAD as isize,
                                kt.as_ptr().add(c0),
                                1,
                                positions as isize,
                                0.0,
                                0.125,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                            gemm::gemm(
                                m,
                                HEAD,
                                span,
                                o.as_mut_ptr(),
                                1,
                                HEAD as isize,
                                c0 > 0,
                                s.as_ptr().add(c0),
                                1,
                                positions as isize,
                                v.as_ptr().add(c0 * HEAD),
                                1,
                                HEAD as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                }
                black_box(&o);
            })
        });
    }
}

fn bench_attention_over(
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    layers: usize,
    positions: usize,
) {
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let (arena, table) = arena_over(layers, positions, dtype);
        let q = values(576, 8);
        let (mut scratch, mut out) = (AttnScratch::default(), vec![0.0; 576]);
        group.throughput(Throughput::Elements((layers * positions) as u64));
        for kernels in Kernels::available() {
            group.bench_function(format!("{}/{dtype:?}/9x64/layers{layers}/pos{positions}", kernels.name()), |b| {
                b.iter(|| {
                    for layer in 0..layers {
                        ops::attend_row(
                            kernels,
                            AttnShape::new(9, 3, 64),
                            layer,
                            black_box(&q),
                            Span::new(positions - 1, None),
                            &table.blocks,
                            &arena,
                            &mut scratch,
                            &mut out,
                        )
                    }
                })
            });
        }
    }
}

/// One sampling step over SmolLM2's 49152 logits: greedy, and the default chain (penalties,
/// top-k 40, top-p 0.95, min-p 0.05, temperature 0.8).
fn bench_sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sampling");
    group.sample_size(10).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(300));
    let limits = SamplerLimits { vocab_size: 49152, max_stop_strings: 4, default_max_tokens: 16, max_tokens_cap: 4096 };
    let logits: Vec<f32> = values(49152, 9).iter().map(|v| v * 8.0).collect();
    let history: Vec<u32> = (0..64).map(|i| (i * 37) % 49152).collect();
    for (name, temperature) in [("greedy", 0.0), ("default_chain", 0.8)] {
        let params = SamplingParams { temperature: Some(temperature), seed: Some(1), ..Default::default() };
        let mut state = SamplerState::new(params.validate(&limits).expect("valid params"));
        let mut row = logits.clone();
        group.bench_function(name, |b| b.iter(|| state.sample(black_box(&mut row), &history, 1, &[2])));
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_matmul,
    bench_matmul_serial,
    bench_dense_vs_gemm,
    bench_matmul_by_type,
    bench_dequantize,
    bench_row_ops,
    bench_attention,
    bench_sampling
);
criterion_main!(benches);
