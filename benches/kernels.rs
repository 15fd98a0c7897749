//! Kernel speed at the default model's shapes (SmolLM2-135M: n_embd 576, FFN 1536, vocab 49152).
//!
//! `cargo bench -j2 --bench kernels` (add a filter such as `matmul/Q4_1` to run fewer).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use starling::model::ggml_type::GgmlType;
use starling::model::kernels::{Kernels, MatmulScratch, QMatrix, reference};

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
        (GgmlType::Q4_1, 576, 576, &[1, 64, 512]),
        (GgmlType::Q4_1, 1536, 576, &[1, 64, 512]),
        (GgmlType::Q4_1, 576, 1536, &[1, 64, 512]),
        (GgmlType::Q8_0, 49152, 576, &[1, 64]),
        (GgmlType::Q8_0, 576, 576, &[1, 512]),
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

criterion_group!(benches, bench_matmul, bench_dequantize);
criterion_main!(benches);
