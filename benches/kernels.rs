//! Kernel benchmarks: GEMM at the shapes of the reference workloads (`scripts/README.md`) and the two
//! reference sizes, softmax and layer norm; with 1 and 2 rayon threads. Throughput is in
//! FLOPs, so criterion reports GFLOP/s (2·m·k·n per GEMM).
//!
//! `cargo bench --bench kernels`; one group: `cargo bench --bench kernels -- gemm`. The
//! bf16 products, on every path this CPU runs, beside the `f32` kernels:
//! `cargo bench --bench kernels -- gemm_bf16`. The products of inference, with the weight
//! packed beforehand: `cargo bench --bench kernels -- gemm_packed`; the same with every operand
//! in L2: `cargo bench --bench kernels -- gemm_in_cache`. A decoding step's few rows
//! against weights read from memory, in bytes of weights a second:
//! `cargo bench --bench kernels -- gemm_streamed`; a step of 1 to 8 sequences against weights
//! in L3: `cargo bench --bench kernels -- gemm_few_rows`.

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::kernels::{RowMask, gemm, layer_norm_rows, softmax_row};

fn random(rows: usize, cols: usize, rng: &mut StdRng) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0..1.0))
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// Benchmarks `product` as `name/1t`, `name/2t`, … for each count of `threads`, on a team of
/// that many threads, as the model entry points run their products.
fn on_teams(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    threads: &[usize],
    mut product: impl FnMut() + Send,
) {
    for &threads in threads {
        let pool = pool(threads);
        group.bench_function(BenchmarkId::new(name, format!("{threads}t")), |bench| {
            pool.install(|| vaswani::kernels::parallel::with_team(|| bench.iter(&mut product)))
        });
    }
}

/// (name, m, k, n): the reference sizes, then the projections of each workload
/// (rows = batch · length).
const GEMMS: &[(&str, usize, usize, usize)] = &[
    ("square_1024", 1024, 1024, 1024),
    ("512x512x2048", 512, 512, 2048),
    ("tiny_qkv", 256, 64, 64),
    ("tiny_ffn1", 256, 64, 256),
    ("tiny_logits", 256, 64, 100),
    ("small_qkv", 1024, 256, 256),
    ("small_ffn1", 1024, 256, 1024),
    ("small_ffn2", 1024, 1024, 256),
    ("small_logits", 1024, 256, 1000),
    ("base_qkv", 512, 512, 512),
    ("base_ffn1", 512, 512, 2048),
    ("base_ffn2", 512, 2048, 512),
    ("base_logits", 512, 512, 8000),
    // Decoding steps: one row per sequence, the small-row kernels.
    ("decode_base_ffn1", 8, 512, 2048),
    ("decode_base_logits", 8, 512, 8000),
    ("decode_small_ffn2", 32, 1024, 256),
];

fn bench_gemm(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let mut group = c.benchmark_group("gemm");
    group.sample_size(20);
    for &(name, m, k, n) in GEMMS {
        let a = random(m, k, &mut rng);
        // B as the transpose of a stored [n, k] weight, as every projection uses it.
        let w = random(n, k, &mut rng);
        let mut out = Array2::<f32>::zeros((m, n));
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        for threads in [1, 2] {
            let pool = pool(threads);
            group.bench_with_input(
                BenchmarkId::new(name, format!("{threads}t")),
                &threads,
                |bench, _| pool.install(|| bench.iter(|| gemm(1.0, a.view(), w.t(), 0.0, out.view_mut()))),
            );
        }
    }
    group.finish();
}

/// The dense products of `small` and `base` (not the decoding steps'): for each, its name, A
/// `[m, k]`, the stored weight W `[n, k]` (B = Wᵀ), C `[m, n]` and its FLOPs.
#[allow(clippy::type_complexity)]
fn dense_products(rng: &mut StdRng) -> Vec<(&'static str, Array2<f32>, Array2<f32>, Array2<f32>, u64)> {
    GEMMS
        .iter()
        .filter(|g| g.0.starts_with("small_") || g.0.starts_with("base_"))
        .map(|&(name, m, k, n)| {
            let a = random(m, k, rng);
            let w = random(n, k, rng);
            (name, a, w, Array2::zeros((m, n)), (2 * m * k * n) as u64)
        })
        .collect()
}

/// The products of inference: B (the transpose of a stored weight) packed once beforehand
/// (`PackedB`, as `EncoderDecoder::packed` does), so that only the kernels and the packing of
/// A are timed, at the dense shapes of `small` and `base`, one and two threads (a team of them,
/// [`vaswani::kernels::parallel::with_team`], as in a forward pass).
fn bench_gemm_packed(c: &mut Criterion) {
    use vaswani::kernels::{PackedB, gemm_packed};
    let mut rng = StdRng::seed_from_u64(0);
    let mut group = c.benchmark_group("gemm_packed");
    group.sample_size(20);
    for (name, a, w, mut out, flops) in dense_products(&mut rng) {
        let Some(packed) = PackedB::new(w.t()) else {
            return; // nothing packs on this CPU
        };
        group.throughput(Throughput::Elements(flops));
        on_teams(&mut group, name, &[1, 2], || {
            gemm_packed(a.view(), &packed, None, false, out.view_mut())
        });
    }
    group.finish();
}

/// The weight gradients of the dense products of `small` and `base`, as a training step's
/// backward runs them: `∂W += ∂Yᵀ·X` for the rows X `[m, k]` and ∂Y `[m, n]` of a product
/// (k, the reduction, is the rows), both operands packed in the call, on a team of 1 and 2
/// threads.
fn bench_gemm_weight_grad(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(6);
    let mut group = c.benchmark_group("gemm_weight_grad");
    group.sample_size(20);
    for (name, x, w, out, flops) in dense_products(&mut rng) {
        let dy = random(out.nrows(), out.ncols(), &mut rng);
        let mut dw = Array2::<f32>::zeros(w.dim());
        group.throughput(Throughput::Elements(flops));
        on_teams(&mut group, name, &[1, 2], || {
            gemm(1.0, dy.t(), x.view(), 1.0, dw.view_mut())
        });
    }
    group.finish();
}

/// The kernels' ceiling: products whose operands all stay in a core's L2, B packed beforehand
/// (256 KiB of it), repeated on one thread: 48 rows (eight panels of the AVX2 kernels' 6 rows,
/// four of AVX-512's 12), and 12 rows, which pass over one panel of B at a time as a decoding
/// step's few rows do. Beside `gemm_packed` at the workloads' shapes, the distance is what
/// the operands' trips from L3 and memory, and C's, cost those products; beside `bench
/// --peak`, what the kernels' loops, starts and stores leave of the FMA peak.
fn bench_gemm_in_cache(c: &mut Criterion) {
    use vaswani::kernels::{PackedB, gemm_packed};
    let mut rng = StdRng::seed_from_u64(5);
    let mut group = c.benchmark_group("gemm_in_cache");
    group.sample_size(20);
    for (m, k, n) in [(48, 256, 128), (12, 512, 128)] {
        let a = random(m, k, &mut rng);
        let Some(packed) = PackedB::new(random(n, k, &mut rng).t()) else {
            return; // nothing packs on this CPU
        };
        let mut out = Array2::<f32>::zeros((m, n));
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        on_teams(&mut group, &format!("{m}x{k}x{n}"), &[1], || {
            gemm_packed(a.view(), &packed, None, false, out.view_mut())
        });
    }
    group.finish();
}

/// A decoding step's products where the weights come from memory: 8 rows (a batch of 8
/// sequences, as `base` decodes) against 40 weights of `[2048, 512]` packed beforehand, 168
/// MB in all, several times any L3 of the reference machines, one after another, on a team
/// of 1 and 2 threads. Credited with the weights' bytes, so criterion reports the rate at
/// which the products read them (GiB/s), beside what `bench --bandwidth` reads (GB/s).
fn bench_gemm_streamed(c: &mut Criterion) {
    bench_weights_read(c, "gemm_streamed", 10, (512, 2048, 40), 3, &[8]);
}

/// A decoding step of a few sequences: 1, 2, 4 and 8 rows (one sequence each) against 7
/// weights of `[1024, 256]` packed beforehand, 7.3 MB, about a `small` decoding step's weights,
/// which an L3 of the reference machines holds, on a team of 1 and 2 threads. Credited with
/// the weights' bytes, as `gemm_streamed`: criterion reports the rate at which the products
/// read them (GiB/s).
fn bench_gemm_few_rows(c: &mut Criterion) {
    bench_weights_read(c, "gemm_few_rows", 20, (256, 1024, 7), 4, &[1, 2, 4, 8]);
}

/// `count` weights of `[n, k]` packed beforehand (`PackedB`), and for each of `rows` a matrix
/// of that many rows multiplied by every weight in turn, on a team of 1 and 2 threads (as the
/// model entry points run their products); credited with the weights' bytes.
fn bench_weights_read(
    c: &mut Criterion,
    name: &str,
    samples: usize,
    (k, n, count): (usize, usize, usize),
    seed: u64,
    rows: &[usize],
) {
    use vaswani::kernels::{PackedB, gemm_packed};
    let mut rng = StdRng::seed_from_u64(seed);
    let Some(weights) = (0..count)
        .map(|_| PackedB::new(random(n, k, &mut rng).t()))
        .collect::<Option<Vec<_>>>()
    else {
        return; // nothing packs on this CPU
    };
    let mut group = c.benchmark_group(name);
    group.sample_size(samples);
    group.throughput(Throughput::Bytes((count * k * n * 4) as u64));
    for &m in rows {
        let a = random(m, k, &mut rng);
        let mut out = Array2::<f32>::zeros((m, n));
        on_teams(&mut group, &format!("{m}x{k}x{n}"), &[1, 2], || {
            for w in &weights {
                gemm_packed(a.view(), w, None, false, out.view_mut());
            }
        });
    }
    group.finish();
}

/// The bf16 GEMM on each path this process runs (AMX, AVX512-BF16, emulated) beside the `f32`
/// kernels, one thread, at the dense shapes of `small` and `base`, packing included.
fn bench_gemm_bf16(c: &mut Criterion) {
    use vaswani::kernels::gemm::bf16::{Bf16Path, gemm_bf16_with};
    use vaswani::kernels::gemm::{Isa, gemm_f32_with};
    let mut rng = StdRng::seed_from_u64(0);
    let mut group = c.benchmark_group("gemm_bf16");
    group.sample_size(10);
    for (name, a, w, mut out, flops) in dense_products(&mut rng) {
        group.throughput(Throughput::Elements(flops));
        if let Some(isa) = Isa::best() {
            group.bench_function(BenchmarkId::new(name, "f32"), |bench| {
                bench.iter(|| gemm_f32_with(isa, 1.0, a.view(), w.t(), 0.0, out.view_mut(), 1))
            });
        }
        for path in Bf16Path::available() {
            group.bench_function(BenchmarkId::new(name, format!("{path:?}")), |bench| {
                bench.iter(|| gemm_bf16_with(path, 1.0, a.view(), w.t(), 0.0, out.view_mut(), 1))
            });
        }
    }
    group.finish();
}

fn bench_softmax(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut group = c.benchmark_group("softmax");
    // The causal rows of the tiny and base attention's heads, then whole rows of 1024 (the
    // cost of a vector of scores where nothing else is: the maximum, the exponentials, the
    // sum and the scaling).
    for &(rows, cols, causal) in &[(16 * 4 * 16, 16, true), (8 * 8 * 64, 64, true), (64, 1024, false)] {
        let x = random(rows, cols, &mut rng);
        group.throughput(Throughput::Elements((rows * cols) as u64));
        let name = if causal { "causal" } else { "full" };
        group.bench_function(format!("{rows}x{cols}_{name}"), |bench| {
            bench.iter_batched_ref(
                || x.clone(),
                |x| {
                    for (i, mut row) in x.rows_mut().into_iter().enumerate() {
                        let mask = RowMask {
                            limit: if causal { i % cols + 1 } else { cols },
                            keys: None,
                            pairs: None,
                        };
                        softmax_row(row.as_slice_mut().expect("contiguous"), mask);
                    }
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn bench_layer_norm(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let mut group = c.benchmark_group("layer_norm");
    for &(rows, d) in &[(256, 64), (512, 512)] {
        let x = random(rows, d, &mut rng);
        let (gamma, beta) = (Array1::ones(d), Array1::zeros(d));
        let (mut x_hat, mut y, mut rstd) = (
            Array2::zeros((rows, d)),
            Array2::zeros((rows, d)),
            Array1::zeros(rows),
        );
        group.throughput(Throughput::Elements((rows * d) as u64));
        group.bench_function(format!("{rows}x{d}"), |bench| {
            bench.iter(|| {
                layer_norm_rows(
                    x.view(),
                    gamma.view(),
                    beta.view(),
                    1e-5,
                    x_hat.view_mut(),
                    rstd.view_mut(),
                    y.view_mut(),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_gemm_packed,
    bench_gemm_in_cache,
    bench_gemm_weight_grad,
    bench_gemm_streamed,
    bench_gemm_few_rows,
    bench_gemm_bf16,
    bench_softmax,
    bench_layer_norm
);
criterion_main!(benches);
