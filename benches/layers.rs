//! Layer benchmarks: multi-head attention and the feed-forward layer, forward and backward
//! apart, at the `tiny` and `base` sizes of the reference workloads (`scripts/README.md`),
//! with 1 and 2 rayon threads. Throughput is in FLOPs (the FLOP model of `scripts/README.md`;
//! a backward pass is
//! counted as twice its forward), so criterion reports GFLOP/s. Beside them the attention core
//! alone, without a mask (`attention_core`) and under a causal mask, forward and backward
//! (`attention_causal`), and an encoder's over padded sequences of narrow heads
//! (`attention_padded`).
//!
//! `cargo bench --bench layers`; one group: `cargo bench --bench layers -- multi_head`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array2, Array3, Array4};
use rand::{SeedableRng, rngs::StdRng};
use vaswani::Params;
use vaswani::gradcheck::random_like;
use vaswani::layers::{FeedForwardConfig, Mask, MultiHeadConfig};

/// (name, d_model, heads, d_ff, batch, length)
const SIZES: &[(&str, usize, usize, usize, usize, usize)] =
    &[("tiny", 64, 4, 256, 16, 16), ("base", 512, 8, 2048, 8, 64)];

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn bench_multi_head(c: &mut Criterion) {
    let mut group = c.benchmark_group("multi_head");
    group.sample_size(20);
    for &(name, d, h, _, b, t) in SIZES {
        let mut rng = StdRng::seed_from_u64(0);
        let mha = MultiHeadConfig::new(d, h).init(&mut rng).expect("valid config");
        let x: Array3<f32> = random_like((b, t, d), &mut rng);
        let grad_y: Array3<f32> = random_like((b, t, d), &mut rng);
        let mask = Mask::causal();
        // Q, K, V and output projections plus QKᵀ and AV, per WORKLOADS.md.
        let flops = (b * t * 2 * d * d * 4 + b * 4 * t * t * d) as u64;
        for threads in [1, 2] {
            let pool = pool(threads);
            group.throughput(Throughput::Elements(flops));
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/forward"), format!("{threads}t")),
                &(),
                |bench, _| pool.install(|| bench.iter(|| mha.forward(x.view(), None, &mask, &mut rng))),
            );
            let (_, cache) = mha.forward(x.view(), None, &mask, &mut rng);
            let mut g = mha.p.zeros_like();
            group.throughput(Throughput::Elements(2 * flops));
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/backward"), format!("{threads}t")),
                &(),
                |bench, _| pool.install(|| bench.iter(|| mha.backward(&cache, grad_y.view(), &mut g))),
            );
        }
    }
    group.finish();
}

fn bench_feed_forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("feed_forward");
    group.sample_size(20);
    for &(name, d, _, d_ff, b, t) in SIZES {
        let mut rng = StdRng::seed_from_u64(1);
        let ffn = FeedForwardConfig::new(d, d_ff)
            .init(&mut rng)
            .expect("valid config");
        let x: Array2<f32> = random_like((b * t, d), &mut rng);
        let grad_y: Array2<f32> = random_like((b * t, d), &mut rng);
        let flops = (b * t * 2 * d * d_ff * 2) as u64;
        for threads in [1, 2] {
            let pool = pool(threads);
            group.throughput(Throughput::Elements(flops));
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/forward"), format!("{threads}t")),
                &(),
                |bench, _| pool.install(|| bench.iter(|| ffn.forward(x.view(), &mut rng))),
            );
            let (_, cache) = ffn.forward(x.view(), &mut rng);
            let mut g = ffn.p.zeros_like();
            group.throughput(Throughput::Elements(2 * flops));
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/backward"), format!("{threads}t")),
                &(),
                |bench, _| pool.install(|| bench.iter(|| ffn.backward(&cache, grad_y.view(), &mut g))),
            );
        }
    }
    group.finish();
}

/// The attention core alone (`Q·Kᵀ`, softmax, `·V`, every head of every sequence), without a
/// mask and without dropout, as inference runs it (`attention_infer`: no weights kept, as
/// PyTorch's `F.scaled_dot_product_attention` keeps none), on a team of threads as the models
/// run it: the batched per-head products at the small and base workloads' shapes. Credited
/// with `4·T²·d_k` FLOPs per head (the two products, as `WORKLOADS.md` counts attention).
fn bench_attention_core(c: &mut Criterion) {
    use vaswani::layers::attention::attention_infer;
    let mut group = c.benchmark_group("attention_core");
    group.sample_size(20);
    // (name, batch, heads, length, d_k): the small and base workloads' shapes, then an
    // encoder's heads over 128 positions of d_k 16 (a classifier of sensor windows) and 256 of
    // d_k 32, past the keys a head's softmax keeps in registers.
    for &(name, b, h, t, dk) in &[
        ("small", 32, 8, 32, 32),
        ("base", 8, 8, 64, 64),
        ("window", 16, 4, 128, 16),
        ("long", 4, 8, 256, 32),
    ] {
        let mut rng = StdRng::seed_from_u64(2);
        let [q, k, v]: [Array4<f32>; 3] = std::array::from_fn(|_| random_like((b, h, t, dk), &mut rng));
        let mut out = Array4::<f32>::zeros((b, h, t, dk));
        group.throughput(Throughput::Elements((4 * b * h * t * t * dk) as u64));
        for threads in [1, 2] {
            let pool = pool(threads);
            group.bench_with_input(BenchmarkId::new(name, format!("{threads}t")), &(), |bench, _| {
                pool.install(|| {
                    vaswani::kernels::parallel::with_team(|| {
                        bench.iter(|| {
                            let mask = Mask::none().resolve(b, t, t).expect("a mask of no pairs");
                            attention_infer(q.view(), k.view(), v.view(), &mask, out.view_mut())
                        })
                    })
                })
            });
        }
    }
    group.finish();
}

/// The attention core under a causal mask, forward then backward (`Q·Kᵀ`, softmax, `·V` and
/// their gradients, every head of every sequence), without dropout: the decoder's
/// self-attention at the small and base workloads' shapes, and a longer context (256
/// positions, past the per-head registers' 64 keys) as a character model would train it.
/// Credited with the unmasked work, `3 · 4·T²·d_k` FLOPs per head (as `WORKLOADS.md` counts a
/// training step), whatever the blocked half costs.
fn bench_attention_causal(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_causal");
    group.sample_size(20);
    // (name, batch, heads, length, d_k)
    for &(name, b, h, t, dk) in &[
        ("small", 32, 8, 32, 32),
        ("base", 8, 8, 64, 64),
        ("long", 4, 8, 256, 32),
    ] {
        forward_and_backward(&mut group, name, (b, h, t, dk), 3, Mask::causal);
    }
    group.finish();
}

/// The attention core of an encoder over padded sequences, forward then backward, without
/// dropout: the `activity` example's classifier (32 windows of 32 to 64 samples, 4 heads of 8
/// features; the keys past each window's length masked), whose heads are narrower than any
/// reference workload's. Credited with the unmasked work, `3 · 4·T²·d_k` FLOPs per head.
fn bench_attention_padded(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_padded");
    group.sample_size(20);
    let (b, h, t, dk) = (32, 4, 64, 8);
    // Lengths spread evenly from half the longest to the longest.
    let lengths: Vec<usize> = (0..b).map(|i| t / 2 + i * (t / 2) / (b - 1)).collect();
    forward_and_backward(&mut group, "sensor", (b, h, t, dk), 4, || {
        Mask::key_lengths(&lengths)
    });
    group.finish();
}

/// The attention core's forward then backward pass over random `[B, H, T, d_k]` operands
/// (from `seed`) under `mask()`, on one and on two threads, in `group` as `name`.
fn forward_and_backward(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    (b, h, t, dk): (usize, usize, usize, usize),
    seed: u64,
    mask: impl Fn() -> Mask + Sync,
) {
    use vaswani::layers::attention::{attention_backward, attention_forward};
    let mut rng = StdRng::seed_from_u64(seed);
    let [q, k, v, g]: [Array4<f32>; 4] = std::array::from_fn(|_| random_like((b, h, t, dk), &mut rng));
    let [mut out, mut gq, mut gk, mut gv]: [Array4<f32>; 4] =
        std::array::from_fn(|_| Array4::zeros((b, h, t, dk)));
    group.throughput(Throughput::Elements((3 * 4 * b * h * t * t * dk) as u64));
    for threads in [1, 2] {
        let pool = pool(threads);
        group.bench_with_input(BenchmarkId::new(name, format!("{threads}t")), &(), |bench, _| {
            pool.install(|| {
                vaswani::kernels::parallel::with_team(|| {
                    bench.iter(|| {
                        let mask = mask().resolve(b, t, t).expect("a mask of the operands' shape");
                        let cache = attention_forward(
                            q.view(),
                            k.view(),
                            v.view(),
                            mask,
                            0.0,
                            None::<&mut StdRng>,
                            out.view_mut(),
                        );
                        attention_backward(
                            q.view(),
                            k.view(),
                            v.view(),
                            &cache,
                            g.view(),
                            gq.view_mut(),
                            gk.view_mut(),
                            gv.view_mut(),
                        );
                    })
                })
            })
        });
    }
}

criterion_group!(
    benches,
    bench_multi_head,
    bench_feed_forward,
    bench_attention_core,
    bench_attention_causal,
    bench_attention_padded
);
criterion_main!(benches);
