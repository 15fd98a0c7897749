//! Kernels against the scalar reference: dequantization, quantization round trips,
//! every fast matmul path on ragged shapes, bit-exact batch invariance, and chunked
//! attention against an f64 softmax.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::ThreadPool;
use starling::config::KvDtype;
use starling::kv::arena::{BlockTable, KvArena, KvLayout};
use starling::model::ggml_type::GgmlType;
use starling::model::kernels::attention::{AttnShape, CHUNK, ChunkScratch, Span, TileJob};
use starling::model::kernels::quant_acts::{self, QuantActs};
use starling::model::kernels::{KernelError, Kernels, MatmulScratch, QMatrix, reference};
use starling::model::ops::{AttnScratch, attend_row};

const ALL: [GgmlType; 15] = GgmlType::WITH_KERNELS;

fn values(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn pool(threads: usize) -> ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool")
}

/// A row length of 1..=3 blocks of `t` (at least 32 values, the activation block).
fn cols_for(t: GgmlType, blocks: usize) -> usize {
    t.block_elems().max(32) * blocks
}

fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn fast_dequantize_matches_reference_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for t in ALL {
        let cols = cols_for(t, 3);
        let quantized = reference::quantize_row(t, &values(&mut rng, cols, 2.0));
        // Raw random bytes reach encodings a quantizer never writes (Q8_0 -128, odd scales).
        let raw: Vec<u8> = (0..quantized.len()).map(|_| rng.random()).collect();
        for src in [quantized, raw] {
            let mut want = vec![0.0; cols];
            reference::dequantize_row(t, &src, &mut want);
            for k in Kernels::available() {
                let mut got = vec![0.0; cols];
                k.dequantize_row(t, &src, &mut got);
                for (c, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(same_bits(g, w), "{t} {} col {c}: {g} vs {w}", k.name());
                }
            }
        }
    }
}

/// Largest |x - dequant(quant(x))| allowed, as a fraction of the block's max |x|.
fn round_trip_bound(t: GgmlType) -> f32 {
    match t {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 1.0 / 1024.0,
        GgmlType::BF16 => 1.0 / 128.0,
        // Half a step plus the f16 rounding of the scale.
        GgmlType::Q8_0 => 0.5 / 127.0 + 128.0 / 2048.0 / 127.0,
        // The largest magnitude maps to -8 (-16); the other sign can only reach +7 (+15).
        GgmlType::Q4_0 => 1.0 / 8.0 + 0.01,
        GgmlType::Q5_0 => 1.0 / 16.0 + 0.01,
        // Half a step of range / levels, range <= 2 * max.
        GgmlType::Q4_1 => 1.0 / 15.0 + 0.01,
        GgmlType::Q5_1 => 1.0 / 31.0 + 0.01,
        // 6-bit (8-bit) sub-block scales add their own rounding to the value step.
        GgmlType::Q4K => 0.2,
        GgmlType::Q5K => 0.1,
        GgmlType::Q6K => 0.05,
        // Four (eight) levels a sub-block, their scales rounded to 4 (6) bits.
        GgmlType::Q2K => 0.45,
        GgmlType::Q3K => 0.3,
        // Half the widest gap between levels (24 of 127), plus a 6-bit scale's rounding.
        GgmlType::IQ4NL => 0.1,
        GgmlType::IQ4XS => 0.15,
        _ => unreachable!(),
    }
}

#[test]
fn quantize_round_trip_is_within_the_type_bound() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for t in ALL {
        let cols = cols_for(t, 4);
        let x = values(&mut rng, cols, 3.0);
        let q = reference::quantize_row(t, &x);
        assert_eq!(q.len(), t.bytes_for(cols as u64).unwrap() as usize, "{t} size");
        let mut back = vec![0.0; cols];
        reference::dequantize_row(t, &q, &mut back);
        let be = t.block_elems().max(32);
        for (xb, yb) in x.chunks(be).zip(back.chunks(be)) {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let worst = xb.iter().zip(yb).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            let bound = round_trip_bound(t) * amax;
            assert!(worst <= bound, "{t}: error {worst} > bound {bound} (amax {amax})");
            let mean: f32 = xb.iter().zip(yb).map(|(a, b)| (a - b).abs()).sum::<f32>() / be as f32;
            assert!(mean <= bound / 2.0 + f32::EPSILON, "{t}: mean error {mean} vs bound {bound}");
        }
    }
}

/// Σ|w·x| for a tolerance scaled to the magnitude of the terms.
fn abs_dot(t: GgmlType, row: &[u8], x: &[f32]) -> f64 {
    let mut w = vec![0.0; x.len()];
    reference::dequantize_row(t, row, &mut w);
    w.iter().zip(x).map(|(a, b)| (a * b).abs() as f64).sum()
}

#[test]
fn every_matmul_path_matches_the_reference_on_ragged_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let pools = [pool(1), pool(2)];
    for t in ALL {
        for (rows, n, blocks) in [(1, 1, 1), (5, 3, 2), (37, 9, 3), (13, 17, 1), (3, 33, 2)] {
            let cols = cols_for(t, blocks);
            let data = reference::quantize_row(t, &values(&mut rng, rows * cols, 1.0));
            let w = QMatrix::new(t, rows, cols, &data).unwrap();
            let x = values(&mut rng, n * cols, 4.0);
            for k in Kernels::available() {
                for p in &pools {
                    let mut y = vec![f32::NAN; n * rows];
                    k.matmul(&w, &x, n, &mut y, &mut MatmulScratch::default(), p);
                    check_against_reference(k, &w, &x, &y);
                }
                let mut y = vec![f32::NAN; n * rows];
                k.matmul_serial(&w, &x, n, &mut y, &mut MatmulScratch::default());
                check_against_reference(k, &w, &x, &y);
            }
        }
    }
}

fn check_against_reference(k: Kernels, w: &QMatrix, x: &[f32], y: &[f32]) {
    let (t, cols) = (w.ggml_type, w.cols);
    let mut acts = QuantActs::default();
    for (i, xi) in x.chunks(cols).enumerate() {
        if k.quantizes_activations(t) {
            acts.quantize(xi, cols);
        }
        for r in 0..w.rows {
            // f32 activations: only float rounding separates the fast paths from the exact dot.
            let got = y[i * w.rows + r];
            let exact = reference::dot(t, w.row(r), xi) as f64;
            let mut tol = 1e-5 * abs_dot(t, w.row(r), xi) + 1e-6;
            if k.quantizes_activations(t) {
                // 16-bit activations: the scalar oracle's bits, and each value off by at
                // most half its block's step.
                let oracle = quant_acts::dot(t, w.row(r), acts.row(0)).expect("an integer oracle");
                assert_eq!(got.to_bits(), oracle.to_bits(), "{t} {} r{r} i{i}: {got} vs oracle {oracle}", k.name());
                tol += quantization_bound(t, w.row(r), acts.row(0).d);
            }
            let got = got as f64;
            assert!((got - exact).abs() <= tol, "{t} {} r{r} i{i}: {got} vs f32 dot {exact}", k.name());
        }
    }
}

/// Σ_c |w_c|·d_c/2: how far rounding x to 16-bit steps `d` (one per 32-value block) can
/// move a dot product with weight row `row`.
fn quantization_bound(t: GgmlType, row: &[u8], steps: &[f32]) -> f64 {
    let mut w = vec![0.0; steps.len() * 32];
    reference::dequantize_row(t, row, &mut w);
    w.chunks(32).zip(steps).map(|(w, &d)| w.iter().map(|v| v.abs() as f64).sum::<f64>() * d as f64 / 2.0).sum()
}

#[test]
fn matmul_is_batch_invariant_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let pools = [pool(1), pool(2)];
    for t in ALL {
        // Three blocks per row (odd, so no kernel can rely on pairs) and 1..=37 x rows: every
        // tile width and ragged tail.
        let (rows, cols, total) = (37, cols_for(t, 3), 37);
        let data = reference::quantize_row(t, &values(&mut rng, rows * cols, 1.0));
        let w = QMatrix::new(t, rows, cols, &data).unwrap();
        let xs = values(&mut rng, total * cols, 3.0);
        for k in Kernels::available() {
            let alone: Vec<Vec<f32>> = xs.chunks(cols).map(|xi| matmul(k, &w, xi, 1, &pools[0])).collect();
            for p in &pools {
                for n in 1..=total {
                    // x rows `start .. start + n` (wrapping), so each row sits at many positions.
                    let start = (n * 7) % total;
                    let idx: Vec<usize> = (0..n).map(|j| (start + j) % total).collect();
                    let batch: Vec<f32> = idx.iter().flat_map(|&i| xs[i * cols..(i + 1) * cols].to_vec()).collect();
                    let mut serial = vec![0.0; n * rows];
                    k.matmul_serial(&w, &batch, n, &mut serial, &mut MatmulScratch::default());
                    for y in [matmul(k, &w, &batch, n, p), serial] {
                        for (pos, &i) in idx.iter().enumerate() {
                            for r in 0..rows {
                                let (a, b) = (y[pos * rows + r], alone[i][r]);
                                assert_eq!(a.to_bits(), b.to_bits(), "{t} {} n={n} pos={pos} row {r}", k.name());
                            }
                        }
                    }
                }
            }
        }
    }
}

fn matmul(k: Kernels, w: &QMatrix, x: &[f32], n: usize, p: &ThreadPool) -> Vec<f32> {
    let mut y = vec![0.0; n * w.rows];
    k.matmul(w, x, n, &mut y, &mut MatmulScratch::default(), p);
    y
}

/// Matrices that read the same x rows (q, k and v; gate and up) share one quantization of
/// them: each output keeps the bits of its own matmul, whether the types read x alike or
/// not (floats beside block formats), in the pool or on the calling thread.
#[test]
fn matrices_sharing_x_give_each_matrix_its_own_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let p = pool(2);
    let cols = 512;
    let groups: [&[(GgmlType, usize)]; 3] = [
        &[(GgmlType::Q4_0, 40), (GgmlType::Q8_0, 17), (GgmlType::Q4K, 33)],
        &[(GgmlType::Q4_1, 24), (GgmlType::F16, 9), (GgmlType::Q6K, 16)],
        &[(GgmlType::Q5_0, 0), (GgmlType::BF16, 5)],
    ];
    for group in groups {
        let data: Vec<Vec<u8>> =
            group.iter().map(|&(t, rows)| reference::quantize_row(t, &values(&mut rng, rows * cols, 1.0))).collect();
        let ws: Vec<QMatrix> =
            group.iter().zip(&data).map(|(&(t, rows), d)| QMatrix::new(t, rows, cols, d).unwrap()).collect();
        for n in [1, 3, 17] {
            let x = values(&mut rng, n * cols, 2.0);
            for k in Kernels::available() {
                let alone: Vec<Vec<f32>> = ws.iter().map(|w| matmul(k, w, &x, n, &p)).collect();
                for in_pool in [Some(&p), None] {
                    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; n * w.rows]).collect();
                    let mut ys: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                    k.try_matmul_shared(&ws, &x, n, &mut ys, &mut MatmulScratch::default(), in_pool).unwrap();
                    for ((w, got), want) in ws.iter().zip(&outs).zip(&alone) {
                        let same = got.iter().zip(want).all(|(&a, &b)| same_bits(a, b));
                        assert!(same, "{} {} n={n} pool={}", w.ggml_type, k.name(), in_pool.is_some());
                    }
                }
            }
        }
    }
    // A bad length is named, as for one matmul.
    let (k, w) = (Kernels::detect(), QMatrix::new(GgmlType::Q4_1, 2, 32, &[0; 40]).unwrap());
    let (mut a, mut b) = ([0.0; 2], [0.0; 3]);
    let err = k.try_matmul_shared(&[w, w], &[0.0; 32], 1, &mut [&mut a, &mut b], &mut MatmulScratch::default(), None);
    assert_eq!(err.unwrap_err(), KernelError::OutputLength { n: 1, rows: 2, expected: 2, actual: 3 });
}

#[test]
fn rows_of_no_values_give_zeros_on_every_kernel_set() {
    let p = pool(2);
    for t in [GgmlType::Q4_1, GgmlType::Q8_0] {
        let w = QMatrix::new(t, 3, 0, &[]).unwrap();
        for k in Kernels::available() {
            let mut y = vec![f32::NAN; 2 * 3];
            k.matmul(&w, &[], 2, &mut y, &mut MatmulScratch::default(), &p);
            assert_eq!(y, vec![0.0; 6], "{t} {}", k.name());
        }
    }
}

#[test]
fn scratch_is_reused_across_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let t = GgmlType::Q4_1;
    let data = reference::quantize_row(t, &values(&mut rng, 8 * 64, 1.0));
    let w = QMatrix::new(t, 8, 64, &data).unwrap();
    let p = pool(2);
    let mut scratch = MatmulScratch::default();
    let k = Kernels::detect();
    // A large call, then a smaller one: stale scratch contents must not leak into results.
    let big = values(&mut rng, 5 * 64, 1.0);
    let mut y = vec![0.0; 5 * 8];
    k.matmul(&w, &big, 5, &mut y, &mut scratch, &p);
    let small = &big[64..128];
    let mut y1 = vec![0.0; 8];
    k.matmul(&w, small, 1, &mut y1, &mut scratch, &p);
    assert_eq!(y1, matmul(k, &w, small, 1, &p));
    assert_eq!(&y[8..16], &y1[..]);
}

#[test]
fn detect_picks_the_best_available_kernels() {
    let all = Kernels::available();
    assert_eq!(all[0].name(), "portable");
    assert_eq!(Kernels::portable().name(), "portable");
    assert_eq!(Kernels::detect(), *all.last().unwrap());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert_eq!(Kernels::detect().name(), "avx512-vnni", "a VNNI CPU runs the VNNI kernels by default");
    }
    for k in &all {
        assert_eq!(Kernels::named(k.name()).unwrap(), *k);
    }
    let err = Kernels::named("avx9000").unwrap_err();
    assert!(matches!(&err, KernelError::UnknownKernels { name, .. } if name == "avx9000"), "{err}");
    assert!(err.to_string().contains("portable"), "{err}");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        assert_ne!(Kernels::detect().name(), "portable");
        assert!(all.iter().any(|k| k.name() == "avx2-f32"), "an AVX2 CPU offers the AVX2 kernels");
    }
}

#[test]
fn bad_shapes_are_named_errors() {
    let data = vec![0u8; 2 * 20];
    assert_eq!(
        QMatrix::new(GgmlType::Q4_1, 2, 48, &data).unwrap_err(),
        KernelError::RaggedColumns { ggml_type: GgmlType::Q4_1, cols: 48, block: 32 }
    );
    let err = QMatrix::new(GgmlType::Q4_1, 3, 32, &data).unwrap_err();
    assert!(matches!(err, KernelError::DataLength { expected: 60, actual: 40, .. }), "{err}");
    assert_eq!(QMatrix::new(GgmlType::Q8K, 1, 256, &[0; 292]).unwrap_err(), KernelError::Unsupported(GgmlType::Q8K));

    let w = QMatrix::new(GgmlType::Q4_1, 2, 32, &data).unwrap();
    let (k, p, mut s) = (Kernels::detect(), pool(1), MatmulScratch::default());
    let err = k.try_matmul(&w, &[0.0; 31], 1, &mut [0.0; 2], &mut s, &p).unwrap_err();
    assert_eq!(err, KernelError::InputLength { n: 1, cols: 32, expected: 32, actual: 31 });
    let err = k.try_matmul(&w, &[0.0; 64], 2, &mut [0.0; 2], &mut s, &p).unwrap_err();
    assert_eq!(err, KernelError::OutputLength { n: 2, rows: 2, expected: 4, actual: 2 });
    let err = k.try_dequantize_row(GgmlType::Q8_0, &[0; 33], &mut [0.0; 32]).unwrap_err();
    assert!(err.to_string().contains("needs 34 bytes, got 33"), "{err}");
}

/// Softmax attention in f64 straight from the definition: head `h` reads KV head
/// `h / (n_head / n_head_kv)` of every position given (`keys` and `vals` are the positions
/// the row sees), scores scaled by `shape.scale`.
fn attention_reference(shape: AttnShape, q: &[f32], keys: &[Vec<f32>], vals: &[Vec<f32>]) -> Vec<f64> {
    let AttnShape { n_head, n_head_kv, head_dim: hd, scale } = shape;
    let mut out = vec![0.0f64; n_head * hd];
    for h in 0..n_head {
        let g = h / (n_head / n_head_kv);
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| (0..hd).map(|i| q[h * hd + i] as f64 * k[g * hd + i] as f64).sum::<f64>() * scale as f64)
            .collect();
        let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (w, v) in weights.iter().zip(vals) {
            for i in 0..hd {
                out[h * hd + i] += w / total * v[g * hd + i] as f64;
            }
        }
    }
    out
}

/// The KV cache types for rows of `kvd` values: q8_0 only where rows are whole blocks of 32
/// (the arena refuses others).
fn kv_dtypes(kvd: usize) -> impl Iterator<Item = KvDtype> {
    [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0]
        .into_iter()
        .filter(move |&d| d != KvDtype::Q8_0 || kvd.is_multiple_of(32))
}

/// An arena of `dtype` holding position `p`'s `keys[p]` and `vals[p]` in layer `layer`.
fn filled_arena(
    layout: KvLayout,
    dtype: KvDtype,
    layer: usize,
    keys: &[Vec<f32>],
    vals: &[Vec<f32>],
) -> (KvArena, BlockTable) {
    let (positions, bt) = (keys.len(), layout.block_tokens);
    let cap = layout.blocks_for(positions) * layout.block_bytes_as(dtype);
    let mut arena = KvArena::with_dtype(layout, cap as u64, dtype).unwrap();
    let mut table = BlockTable::default();
    table.reserve(&mut arena, positions).unwrap();
    for (pos, (k, v)) in keys.iter().zip(vals).enumerate() {
        arena.write(table.blocks[pos / bt], layer, pos % bt, k, v);
    }
    (arena, table)
}

#[test]
fn chunked_attention_matches_the_reference_for_every_kernel_and_kv_dtype() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // A generic head width, the 64-wide heads with their own AVX-512 path, and Gemma 3's
    // 256-wide single KV head with its own score scale.
    let gemma = AttnShape { scale: 0.0625, ..AttnShape::new(4, 1, 256) };
    for (shape, windows) in [
        (AttnShape::new(6, 2, 24), [None, Some(37)]),
        (AttnShape::new(9, 3, 64), [None, Some(CHUNK + 5)]),
        (gemma, [None, Some(70)]),
    ] {
        let (kvd, qd) = (shape.n_head_kv * shape.head_dim, shape.n_head * shape.head_dim);
        // One chunk, a chunk boundary, a ragged last chunk and a last block cut short; blocks
        // of 16 rows, and of 48 (runs of rows longer than the AVX-512 path's sixteen); with
        // and without a sliding window starting inside a chunk.
        let cases = [16, 48].into_iter().flat_map(|bt| [1, 5, CHUNK, CHUNK + 1, 3 * CHUNK - 7].map(|p| (bt, p)));
        for ((bt, positions), window) in cases.flat_map(|c| windows.map(|w| (c, w))) {
            let layout = KvLayout { n_layer: 2, kv_dim: kvd, block_tokens: bt };
            let keys: Vec<Vec<f32>> = (0..positions).map(|_| values(&mut rng, kvd, 3.0)).collect();
            let vals: Vec<Vec<f32>> = (0..positions).map(|_| values(&mut rng, kvd, 1.0)).collect();
            let q = values(&mut rng, qd, 1.0);
            for dtype in kv_dtypes(kvd) {
                let (arena, table) = filled_arena(layout, dtype, 1, &keys, &vals);
                // The reference sees what the arena holds (rows rounded to f16, or
                // quantized, read back as the arena gives them).
                let stored = |rows: &[Vec<f32>], values: bool| -> Vec<Vec<f32>> {
                    (0..positions)
                        .map(|pos| {
                            let (b, mut row) = (table.blocks[pos / bt], vec![0.0; kvd]);
                            match values {
                                true => arena.read_value(b, 1, pos % bt, &mut row),
                                false => arena.read_key(b, 1, pos % bt, &mut row),
                            }
                            if dtype == KvDtype::F32 {
                                assert_eq!(row, rows[pos]);
                            }
                            row
                        })
                        .collect()
                };
                let span = Span::new(positions - 1, window);
                let seen = span.lo..positions;
                let (sk, sv) = (stored(&keys, false), stored(&vals, true));
                let want = attention_reference(shape, &q, &sk[seen.clone()], &sv[seen]);
                for kernels in Kernels::available() {
                    let (mut scratch, mut out) = (AttnScratch::default(), vec![f32::NAN; qd]);
                    attend_row(kernels, shape, 1, &q, span, &table.blocks, &arena, &mut scratch, &mut out);
                    for (i, (&got, &w)) in out.iter().zip(&want).enumerate() {
                        let err = (got as f64 - w).abs();
                        let name = kernels.name();
                        assert!(
                            err <= 1e-5 * (1.0 + w.abs()),
                            "{name} {shape:?} {dtype:?} {bt}/{positions} window {window:?}: out[{i}] {got} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

/// A tile of consecutive rows (a prompt's) gives every row the bits it gets alone (a decode
/// step), on every kernel set, KV type and head width (64-, 128- and 256-wide heads take
/// the AVX-512 path's tile and single-row loops, which read K differently), with and
/// without a sliding window, in blocks of several sizes.
#[test]
fn a_tile_of_rows_gives_each_row_its_bits_alone() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let gemma = AttnShape { scale: 0.0625, ..AttnShape::new(4, 1, 256) };
    for (shape, window) in [
        (AttnShape::new(6, 2, 24), None),
        (AttnShape::new(9, 3, 64), None),
        (AttnShape::new(9, 3, 64), Some(CHUNK + 5)),
        (AttnShape::new(14, 2, 64), None),
        (AttnShape::new(6, 2, 128), Some(CHUNK + 21)),
        (gemma, Some(70)),
    ] {
        let (kvd, qd) = (shape.n_head_kv * shape.head_dim, shape.n_head * shape.head_dim);
        // Blocks of 16 and 48 positions, of 5 and 20 (runs shorter than, and not a multiple
        // of, sixteen lanes) and of 100 (longer than a chunk).
        let blocks =
            [(16, 3 * CHUNK - 7), (48, 2 * CHUNK + 9), (5, 2 * CHUNK + 3), (20, 2 * CHUNK + 9), (100, 3 * CHUNK + 1)];
        for (bt, positions) in blocks {
            let layout = KvLayout { n_layer: 1, kv_dim: kvd, block_tokens: bt };
            for dtype in kv_dtypes(kvd) {
                let keys: Vec<Vec<f32>> = (0..positions).map(|_| values(&mut rng, kvd, 3.0)).collect();
                let vals: Vec<Vec<f32>> = (0..positions).map(|_| values(&mut rng, kvd, 1.0)).collect();
                let (arena, table) = filled_arena(layout, dtype, 0, &keys, &vals);
                // The last 16 rows of the prompt, each over every chunk its span touches.
                let rows: Vec<usize> = (positions - 16..positions).collect();
                let q = values(&mut rng, rows.len() * qd, 1.0);
                let plen = shape.partial_len();
                for kernels in Kernels::available() {
                    let mut scratch = ChunkScratch::default();
                    for c in 0..positions.div_ceil(CHUNK) {
                        let seen: Vec<usize> = (0..rows.len())
                            .filter(|&r| {
                                let sp = Span::new(rows[r], window);
                                (sp.lo / CHUNK..=sp.pos / CHUNK).contains(&c)
                            })
                            .collect();
                        if seen.is_empty() {
                            continue;
                        }
                        let span = |r: usize| Span::new(rows[r], window);
                        let ranges: Vec<_> = seen.iter().map(|&r| span(r).chunk(c - span(r).lo / CHUNK)).collect();
                        let tq = &q[seen[0] * qd..(seen[seen.len() - 1] + 1) * qd];
                        let job =
                            TileJob { shape, layer: 0, q: tq, ranges: &ranges, blocks: &table.blocks, kv: &arena };
                        let mut tiled = vec![f32::NAN; seen.len() * plen];
                        kernels.attend_tile(&job, &mut scratch, &mut tiled);
                        for (i, &r) in seen.iter().enumerate() {
                            let one = TileJob { q: &q[r * qd..(r + 1) * qd], ranges: &ranges[i..i + 1], ..job.clone() };
                            let mut alone = vec![f32::NAN; plen];
                            kernels.attend_tile(&one, &mut scratch, &mut alone);
                            let same = alone.iter().zip(&tiled[i * plen..]).all(|(a, b)| a.to_bits() == b.to_bits());
                            let name = kernels.name();
                            assert!(same, "{name} {shape:?} {dtype:?} window {window:?} bt {bt}: row {r}, chunk {c}");
                        }
                    }
                }
            }
        }
    }
}

/// The KV arena's q8_0 rows are the kernels' Q8_0 blocks, byte for byte, and read back as
/// the reference dequantizer reads them (the arena cannot call the kernels' quantizer: `kv`
/// sits below `model`).
#[test]
fn kv_q8_0_is_the_kernels_q8_0() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let layout = KvLayout { n_layer: 1, kv_dim: 96, block_tokens: 4 };
    let mut arena = KvArena::with_dtype(layout, layout.block_bytes_as(KvDtype::Q8_0) as u64, KvDtype::Q8_0).unwrap();
    let mut table = BlockTable::default();
    table.reserve(&mut arena, 4).unwrap();
    let mut rows: Vec<Vec<f32>> = (0..8).map(|_| values(&mut rng, 96, 3.0)).collect();
    rows[1][32..64].fill(0.0); // an all-zero block
    for slot in 0..4 {
        arena.write(table.blocks[0], 0, slot, &rows[2 * slot], &rows[2 * slot + 1]);
    }
    for slot in 0..4 {
        for (view, row) in
            [(arena.keys(table.blocks[0], 0), &rows[2 * slot]), (arena.values(table.blocks[0], 0), &rows[2 * slot + 1])]
        {
            let stored = view.slice(slot * 96..(slot + 1) * 96);
            assert_eq!(stored.bytes(), reference::quantize_row(GgmlType::Q8_0, row), "slot {slot}");
            let (mut got, mut want) = (vec![0.0; 96], vec![0.0; 96]);
            stored.read_f32(0, &mut got);
            reference::dequantize_row(GgmlType::Q8_0, stored.bytes(), &mut want);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "slot {slot}");
        }
    }
}

/// Float weights (F32, F16, BF16) take their own SIMD kernels on every SIMD set: rows of
/// whole vectors and rows with a ragged tail (37, 100, 643 values), one to eleven x rows,
/// against the f32 dot, and each row's bits the same alone as in any batch or thread split.
#[test]
fn float_kernels_match_the_reference_and_keep_their_bits_in_any_batch() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let pools = [pool(1), pool(2)];
    for t in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for cols in [16, 37, 100, 576, 643] {
            let rows = 19;
            let data = reference::quantize_row(t, &values(&mut rng, rows * cols, 1.0));
            let w = QMatrix::new(t, rows, cols, &data).unwrap();
            let n = 11;
            let x = values(&mut rng, n * cols, 3.0);
            for k in Kernels::available() {
                let alone: Vec<Vec<f32>> = x.chunks(cols).map(|xi| matmul(k, &w, xi, 1, &pools[0])).collect();
                for p in &pools {
                    for m in [1, 3, 8, 11] {
                        let y = matmul(k, &w, &x[..m * cols], m, p);
                        check_against_reference(k, &w, &x[..m * cols], &y);
                        for (i, yi) in y.chunks(rows).enumerate() {
                            assert!(
                                yi.iter().zip(&alone[i]).all(|(a, b)| same_bits(*a, *b)),
                                "{t} {} cols {cols}: x row {i} of {m}",
                                k.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The bytes of `n` pseudo-random blocks of `t` (every bit pattern, NaN and infinite scales
/// included), from an LCG the hashes in [`dequantization_matches_gguf_py`] share.
fn lcg_bytes(t: GgmlType, n: usize) -> Vec<u8> {
    let step = |s: u64| s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut s = step(u64::from(t.id()));
    (0..n * t.block_bytes())
        .map(|_| {
            s = step(s);
            (s >> 56) as u8
        })
        .collect()
}

/// FNV-1a over the values' bits, NaNs as one pattern.
fn fnv(values: &[f32]) -> u64 {
    let bits = values.iter().flat_map(|v| if v.is_nan() { 0x7FC0_0000u32 } else { v.to_bits() }.to_le_bytes());
    bits.fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

/// Pseudo-random blocks of every type, dequantized by the reference and by every kernel set,
/// hash to what the `gguf` Python package's `gguf.quants.dequantize` (ggml's bits) gives for
/// the same bytes (`gguf` 0.17; eight blocks, or 512 values of a float type).
#[test]
fn dequantization_matches_gguf_py() {
    let want = [
        (GgmlType::F32, 0x9b40653a4744dc5f),
        (GgmlType::F16, 0xd62adab2c92b7bc4),
        (GgmlType::BF16, 0x3cd1bb3413c83e7b),
        (GgmlType::Q4_0, 0x6a656f77878ab56d),
        (GgmlType::Q4_1, 0x6a12a76bfeaafca0),
        (GgmlType::Q5_0, 0xb6d97f459bb46ca9),
        (GgmlType::Q5_1, 0x34d14e6a3f009193),
        (GgmlType::Q8_0, 0x14a2f134bf56c4d6),
        (GgmlType::Q2K, 0x8b135a51a20e3f29),
        (GgmlType::Q3K, 0x971f264255b021ad),
        (GgmlType::Q4K, 0x54d3d11232aa9fc4),
        (GgmlType::Q5K, 0x87005c7df4ae1c8a),
        (GgmlType::Q6K, 0x63bf73854e04049c),
        (GgmlType::IQ4NL, 0x9b5347b764b92436),
        (GgmlType::IQ4XS, 0xa3c8fc4c0db75886),
    ];
    assert_eq!(want.len(), ALL.len());
    for (t, hash) in want {
        let n = if t.block_elems() == 1 { 512 } else { 8 };
        let src = lcg_bytes(t, n);
        let mut got = vec![0.0; n * t.block_elems()];
        reference::dequantize_row(t, &src, &mut got);
        assert_eq!(fnv(&got), hash, "{t}: the reference");
        for k in Kernels::available() {
            k.dequantize_row(t, &src, &mut got);
            assert_eq!(fnv(&got), hash, "{t}: {}", k.name());
        }
    }
}

/// The first four rows of a tensor of each type in the Gemma 3 270M file (Q8_0, Q5_0, Q4_K,
/// Q6_K), dequantized by the reference and by every kernel set, hash to what gguf-py gives;
/// and every set's matmul over its first 40 rows matches the reference (and the oracle).
#[test]
fn gemma3_tensors_dequantize_as_gguf_py() {
    use starling::model::gguf::GgufFile;
    let file = GgufFile::open(&crate::gemma3::gemma3_path()).unwrap();
    let (mut rng, p) = (ChaCha8Rng::seed_from_u64(14), pool(2));
    for (name, t, hash) in [
        ("token_embd.weight", GgmlType::Q8_0, 0xcc19f4a516052958),
        ("blk.0.attn_k.weight", GgmlType::Q5_0, 0xaaa15aaa14cf7f47),
        ("blk.0.attn_output.weight", GgmlType::Q4K, 0xa03f040070f9793f),
        ("blk.0.ffn_down.weight", GgmlType::Q6K, 0x6e52adebdb05c4bb),
    ] {
        let info = file.header.tensor(name).unwrap();
        assert_eq!(info.ggml_type, t, "{name}");
        let cols = info.dims[0] as usize;
        let src = &file.tensor_data(info)[..4 * cols / t.block_elems() * t.block_bytes()];
        let mut got = vec![0.0; 4 * cols];
        reference::dequantize_row(t, src, &mut got);
        assert_eq!(fnv(&got), hash, "{name}: the reference");
        for k in Kernels::available() {
            k.dequantize_row(t, src, &mut got);
            assert_eq!(fnv(&got), hash, "{name}: {}", k.name());
        }
        let rows = 40;
        let w = QMatrix::new(t, rows, cols, &file.tensor_data(info)[..rows * src.len() / 4]).unwrap();
        let x = values(&mut rng, 3 * cols, 2.0);
        for k in Kernels::available() {
            check_against_reference(k, &w, &x, &matmul(k, &w, &x, 3, &p));
        }
    }
}

/// Blocks of random bytes reach encodings no quantizer writes (extreme and non-finite scales,
/// Q8_0's −128, every level): on the VNNI sets every matmul gives the integer oracle's bits,
/// on the others it stays within float rounding of the reference where that is finite.
#[test]
fn random_blocks_give_the_oracle_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let p = pool(2);
    for t in ALL.into_iter().filter(|t| t.block_elems() > 1) {
        let (rows, cols, n) = (19, cols_for(t, 2), 5);
        let mut data = lcg_bytes(t, rows * cols / t.block_elems());
        data.rotate_left(7); // rows start at other bytes than the hash test's
        let w = QMatrix::new(t, rows, cols, &data).unwrap();
        let x = values(&mut rng, n * cols, 2.0);
        let mut acts = QuantActs::default();
        acts.quantize(&x, cols);
        for k in Kernels::available() {
            let y = matmul(k, &w, &x, n, &p);
            for (i, xi) in x.chunks(cols).enumerate() {
                for r in 0..rows {
                    let got = y[i * rows + r];
                    if k.quantizes_activations(t) {
                        let oracle = quant_acts::dot(t, w.row(r), acts.row(i)).unwrap();
                        assert!(same_bits(got, oracle), "{t} {} r{r} i{i}: {got} vs oracle {oracle}", k.name());
                    } else {
                        let exact = reference::dot(t, w.row(r), xi) as f64;
                        let tol = 1e-5 * abs_dot(t, w.row(r), xi) + 1e-6;
                        if exact.is_finite() && tol.is_finite() {
                            let err = (got as f64 - exact).abs();
                            assert!(err <= tol, "{t} {} r{r} i{i}: {got} vs {exact}", k.name());
                        }
                    }
                }
            }
        }
    }
}

/// Rows as long as the models' (640 and 2048 values, Gemma 3's types), over several tiles of
/// weight rows and x rows and both threads.
#[test]
fn model_sized_rows_match_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let p = pool(2);
    for t in [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q5_0, GgmlType::Q8_0] {
        let (rows, cols, n) = if t.block_elems() == 256 { (40, 2048, 19) } else { (37, 640, 70) };
        let data = reference::quantize_row(t, &values(&mut rng, rows * cols, 1.0));
        let w = QMatrix::new(t, rows, cols, &data).unwrap();
        let x = values(&mut rng, n * cols, 4.0);
        for k in Kernels::available() {
            check_against_reference(k, &w, &x, &matmul(k, &w, &x, n, &p));
        }
    }
}

/// A measurement, not a check (minutes; run with `--ignored requantized --nocapture`): the
/// default model with every matrix whose rows are whole blocks of a type requantized to it
/// (by the tests' quantizer; the rest keep their Q4_1 or Q8_0), run on the AVX-512 VNNI and
/// AVX-512 f32 sets. Prints, per type, the largest gap between the two sets' log-probabilities
/// of the f32 set's ten most likely next tokens over the fixture's prompts: what rounding
/// activations to 16 bits costs with that type's weights.
#[test]
#[ignore]
fn requantized_smollm2_logprob_gap_per_type() {
    use starling::model::eval::{last_logits, log_softmax_at};
    use starling::model::gguf::GgufFile;
    use starling::model::gguf_writer::GgufWriter;
    use starling::model::transformer::Transformer;
    let (Ok(vnni), Ok(f32_set)) = (Kernels::named("avx512-vnni"), Kernels::named("avx512-f32")) else {
        return eprintln!("this CPU does not run both AVX-512 sets");
    };
    let source = GgufFile::open(&crate::model::model_path()).unwrap();
    let lines = std::fs::read_to_string(crate::model::fixture("prompt_logprobs.jsonl")).unwrap();
    let prompts: Vec<Vec<u32>> = lines
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["reference"] == "f32")
        .map(|v| v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect();
    let path = std::env::temp_dir().join(format!("starling-requantized-{}.gguf", std::process::id()));
    for t in ALL.into_iter().filter(|t| t.block_elems() > 1) {
        let mut w = GgufWriter::new(source.header.version);
        for (key, value) in &source.header.metadata {
            w.metadata(key, value.clone());
        }
        let mut requantized = 0;
        for info in &source.header.tensors {
            let data = source.tensor_data(info).to_vec();
            let matrix = info.dims.len() == 2 && info.ggml_type != GgmlType::F32;
            if matrix && (info.dims[0] as usize).is_multiple_of(t.block_elems()) {
                let mut values = vec![0.0; info.n_elems() as usize];
                reference::dequantize_row(info.ggml_type, &data, &mut values);
                w.tensor(&info.name, &info.dims, t, reference::quantize_row(t, &values));
                requantized += 1;
            } else {
                w.tensor(&info.name, &info.dims, info.ggml_type, data);
            }
        }
        w.write(&path).unwrap();
        let load = |k: Kernels| Transformer::from_file(GgufFile::open(&path).unwrap(), 2, k).unwrap();
        let (a, b) = (load(vnni), load(f32_set));
        let mut worst = 0.0f64;
        for ids in &prompts {
            let (la, lb) = (last_logits(&a, ids).unwrap(), last_logits(&b, ids).unwrap());
            let mut top: Vec<usize> = (0..lb.len()).collect();
            top.sort_by(|&i, &j| lb[j].total_cmp(&lb[i]));
            for &id in &top[..10] {
                worst = worst.max((log_softmax_at(&la, id) - log_softmax_at(&lb, id)).abs());
            }
        }
        eprintln!(
            "{t}: {requantized} matrices; max |logprob VNNI - f32 set| over top-10 of {} prompts: {worst:.2e}",
            prompts.len()
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// `apply` (a gated FFN activation, `gate ← act(gate) · up`) on every kernel set, over ±12
/// and the `extremes`: within 2e-6 (relative, or absolute below 1e-3) of `exact` in f64,
/// and the same bits on every set, so a model's logits do not depend on the vector width.
fn check_activation(
    seed: u64,
    extremes: &[f32],
    exact: impl Fn(f64) -> f64,
    apply: impl Fn(&Kernels, &mut [f32], &[f32]),
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut gate = values(&mut rng, 4099, 12.0);
    gate.extend(extremes);
    let up = values(&mut rng, gate.len(), 2.0);
    let mut first: Option<Vec<f32>> = None;
    for k in Kernels::available() {
        let mut got = gate.clone();
        apply(&k, &mut got, &up);
        for (i, a) in got.iter().enumerate() {
            let b = (exact(gate[i] as f64) * up[i] as f64) as f32;
            let ok = if b.is_finite() { (a - b).abs() <= 2e-6 * b.abs().max(1e-3) } else { same_bits(*a, b) };
            assert!(ok, "{} x={} up={}: {a} vs {b}", k.name(), gate[i], up[i]);
        }
        match &first {
            None => first = Some(got),
            Some(f) => assert!(f.iter().zip(&got).all(|(a, b)| same_bits(*a, *b)), "{} bits", k.name()),
        }
    }
}

/// Gemma's FFN activation runs vectorised with the polynomial `exp` ([`check_activation`]).
#[test]
fn gelu_tanh_matches_the_formula_and_every_set_gives_the_same_bits() {
    let extremes = [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY];
    let exact = |x: f64| {
        let y = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
        0.5 * x * (1.0 + y.tanh())
    };
    check_activation(17, &extremes, exact, |k, gate, up| k.gelu_tanh_mul(gate, up));
}

/// SwiGLU's SiLU, likewise ([`check_activation`]); −∞ gives the limit, −0.
#[test]
fn silu_matches_the_formula_and_every_set_gives_the_same_bits() {
    let extremes =
        [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 100.0, -100.0, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY];
    let exact = |x: f64| if x == f64::NEG_INFINITY { -0.0 } else { x / (1.0 + (-x).exp()) };
    check_activation(18, &extremes, exact, |k, gate, up| k.silu_mul(gate, up));
}
