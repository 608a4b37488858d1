//! The crate on the reference workloads of `scripts/README.md`, measured as
//! `scripts/bench_torch.py` measures PyTorch, so the two can be set side by side
//! (`scripts/compare.py` runs both):
//!
//!     cargo run --release --example bench -- --workload tiny --threads 2 --json
//!     cargo run --release --example bench -- --workload base --threads 1 --what train_step --steps 5
//!
//! The model is the PyTorch script's: `nn.Transformer` post-norm, ReLU, dropout 0.1, one
//! embedding shared by source and target and tied to the output projection, sinusoidal
//! positions, label smoothing 0.1, Adam (0.9, 0.98, 1e-9). Each measurement prints one line
//! (JSON with `--json`) with the fields of the PyTorch script and its FLOP model. The eval
//! forward and greedy decoding run on the model with its weights packed once
//! (`EncoderDecoder::packed`), as a program that evaluates many batches would use it.
//!
//!     cargo run --release --example bench -- --peak --threads 2   # the machine's FMA peak
//!     cargo run --release --example bench -- --bandwidth           # one thread's read bandwidth
//!     cargo run --release --example bench -- --bandwidth --threads 2   # ... and two threads' side by side
//!
//! `--batch N` measures a workload's model at another batch (a decoding step of one sequence:
//! `--batch 1`); that is no reference workload, and `scripts/compare.py` never asks for it.

use std::time::Instant;

use clap::{Parser, ValueEnum};
use vaswani::blocks::BlockConfig;
use vaswani::infer::{BeamSearch, beam_search};
use vaswani::kernels::precision::with_precision;
use vaswani::models::{
    DecoderOnly, DecoderOnlyConfig, EncoderDecoder, EncoderDecoderConfig, Seq2SeqBatch, TokenBatch,
};
use vaswani::rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainer, TrainerConfig};
use vaswani::{Params, Precision, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Tiny,
    Small,
    Base,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[allow(clippy::enum_variant_names)]
enum What {
    #[value(name = "train_step")]
    TrainStep,
    #[value(name = "eval_forward")]
    EvalForward,
    #[value(name = "greedy_decode")]
    GreedyDecode,
    /// Beam search of width 4 (α = 0.6) over T steps with no EOS: not one of PyTorch's
    /// measurements, set beside `greedy_decode` (asked for by name only).
    #[value(name = "beam_decode")]
    BeamDecode,
    /// A decoder-only language model of the workload's width, heads, feed-forward and decoder
    /// layers over its vocabulary: a prompt of S tokens for each of the B sequences, then T
    /// greedy tokens with the key/value cache, the weights packed once before the runs
    /// (`DecoderOnly::packed`). Not one of PyTorch's measurements (asked for by name only).
    #[value(name = "lm_generate")]
    LmGenerate,
    /// The same decoder-only model's log-likelihood of each of the B sequences of S + T tokens
    /// (`PackedDecoderOnly::log_likelihood`, the weights packed once before the runs): a
    /// forward pass over S + T − 1 positions and every predicted token's log-probability. Not
    /// one of PyTorch's measurements (asked for by name only).
    #[value(name = "lm_score")]
    LmScore,
}

/// Measure the crate on a reference workload.
#[derive(Parser, Debug)]
struct Args {
    /// Which reference workload (see scripts/README.md).
    #[arg(long, value_enum, required_unless_present_any = ["peak", "bandwidth"])]
    workload: Option<Workload>,
    /// Threads in the rayon pool.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Measured repetitions.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Unmeasured repetitions first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// What to measure.
    #[arg(long, value_enum, num_args = 1.., default_values_t = [What::TrainStep, What::EvalForward, What::GreedyDecode])]
    what: Vec<What>,
    /// Seed of the model and the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Precision of the matrix products: fp32, or bf16 mixed precision (bf16 operands, f32
    /// accumulation; the kernel that runs is printed on stderr).
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Micro-batches per training step, each the workload's batch (gradient accumulation: the
    /// step's tokens and FLOPs are this many times the batch's).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    micro_batches: u64,
    /// The batch instead of the workload's (no longer a reference workload: PyTorch's figures
    /// are for the workload's batch; the JSON lines then carry "batch").
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch: Option<u64>,
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
    /// Measure the machine's fp32 FMA peak on 1 and on --threads threads instead (the peak
    /// that the "fraction of peak" figures are quoted against), and exit.
    #[arg(long)]
    peak: bool,
    /// Measure the read bandwidth from memory instead (a 256 MB buffer read by one thread as one
    /// stream, and as 2 and 4 streams interleaved a kilobyte at a time: what a product bound
    /// by reading its weights, as a decoding step's are, can expect; with --threads N above 1,
    /// then by N threads side by side, each its own part), and exit.
    #[arg(long)]
    bandwidth: bool,
}

/// (d_model, heads, d_ff, layers, vocab, batch, src_len, tgt_len)
fn sizes(w: Workload) -> (usize, usize, usize, usize, usize, usize, usize, usize) {
    match w {
        Workload::Tiny => (64, 4, 256, 2, 100, 16, 16, 16),
        Workload::Small => (256, 8, 1024, 2, 1000, 32, 32, 32),
        Workload::Base => (512, 8, 2048, 6, 8000, 8, 64, 64),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads == 0 {
        eprintln!("error: --threads must be at least 1");
        std::process::exit(2);
    }
    if args.peak {
        peak(&args);
        return Ok(());
    }
    if args.bandwidth {
        bandwidth(&args);
        return Ok(());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .expect("thread pool");
    pool.install(|| run(&args))
}

/// The read bandwidth from memory: a buffer of 256 MB (far past any cache) summed by one thread
/// as one stream and as 2 and 4 streams side by side, a kilobyte of each in turn; then, with
/// `--threads` above 1, by that many threads at once, each summing its own contiguous part as
/// 1 and as 4 streams (the two threads of a decoding step's product each read their own
/// panels of the weights). The best of 5 passes each. The hardware's prefetch follows each
/// stream, so several streams can keep more reads in flight than one.
fn bandwidth(args: &Args) {
    const WORDS: usize = 32 << 20; // 256 MB of u64
    let buf: Vec<u64> = (0..WORDS as u64).collect();
    let best_of_5 = |pass: &dyn Fn()| {
        let best = (0..5)
            .map(|_| {
                let start = Instant::now();
                pass();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        (WORDS * 8) as f64 / best / 1e9
    };
    let print = |threads: usize, streams: usize, gbs: f64| {
        if args.json {
            println!(
                "{{\"what\": \"read_bandwidth\", \"threads\": {threads}, \"streams\": {streams}, \"gb_per_s\": {gbs:.1}}}"
            );
        } else if threads == 1 {
            println!("read bandwidth, one thread, {streams} stream(s): {gbs:.1} GB/s");
        } else {
            println!(
                "read bandwidth, {threads} threads side by side, {streams} stream(s) each: {gbs:.1} GB/s"
            );
        }
    };
    for streams in [1, 2, 4] {
        print(
            1,
            streams,
            best_of_5(&|| {
                std::hint::black_box(sum_streams(&buf, streams));
            }),
        );
    }
    if args.threads > 1 {
        let per = WORDS.div_ceil(args.threads);
        for streams in [1, 4] {
            let gbs = best_of_5(&|| {
                std::thread::scope(|s| {
                    for part in buf.chunks(per) {
                        s.spawn(move || std::hint::black_box(sum_streams(part, streams)));
                    }
                })
            });
            print(args.threads, streams, gbs);
        }
    }
}

/// The wrapping sum of `buf` read as `streams` streams side by side (its equal parts, a
/// kilobyte of each in turn).
fn sum_streams(buf: &[u64], streams: usize) -> u64 {
    const CHUNK: usize = 128; // 1 KB
    let per = buf.len() / streams;
    let mut sum = 0u64;
    for at in (0..per).step_by(CHUNK) {
        for s in 0..streams {
            let chunk = &buf[s * per + at..(s * per + at + CHUNK).min((s + 1) * per)];
            sum = chunk.iter().fold(sum, |a, &x| a.wrapping_add(x));
        }
    }
    sum
}

/// The fp32 FMA peak of 1 and of `--threads` threads, each thread running the measuring loop
/// at the same time; the median of 5 measurements.
fn peak(args: &Args) {
    for threads in [1, args.threads] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let mut runs: Vec<f64> = (0..5)
            .map(|_| {
                pool.broadcast(|_| vaswani::kernels::simd::fma_peak_gflops(0.2))
                    .iter()
                    .sum()
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        let gflops = runs[2];
        if args.json {
            println!("{{\"what\": \"fma_peak\", \"threads\": {threads}, \"gflops\": {gflops:.1}}}");
        } else {
            println!("fp32 FMA peak, {threads} thread(s): {gflops:.1} GFLOP/s");
        }
        if args.threads == 1 {
            break;
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let workload = args.workload.expect("required unless --peak or --bandwidth");
    let (d, h, f, layers, v, b, s, t) = sizes(workload);
    let b = args.batch.map_or(b, |batch| batch as usize);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let cfg = EncoderDecoderConfig::new(v, v, BlockConfig::new(d, h, f), layers, layers)
        .with_share_embeddings(true)
        .with_tie_output(true);
    let model: EncoderDecoder = cfg.init(&mut rng)?;
    // Random ids in [2, V) as the PyTorch script draws them; the decoder sees T tokens and
    // the loss covers all T.
    let mut ids = |len: usize| -> Vec<Vec<usize>> {
        (0..b)
            .map(|_| (0..len).map(|_| rng.random_range(2..v)).collect())
            .collect()
    };
    let src = TokenBatch::from_sequences(&ids(s), 0)?;
    let tgt = ids(t + 1);
    let tgt_in = TokenBatch::from_sequences(&tgt.iter().map(|x| x[..t].to_vec()).collect::<Vec<_>>(), 0)?;
    let tgt_out = TokenBatch::from_sequences(&tgt.iter().map(|x| x[1..].to_vec()).collect::<Vec<_>>(), 0)?;
    let batch = Seq2SeqBatch {
        src: src.clone(),
        tgt_in: tgt_in.clone(),
        tgt_out,
    };
    eprintln!(
        "# vaswani {}, {} kernels, threads={}, workload={:?} d_model={d} heads={h} d_ff={f} layers={layers} vocab={v} batch={b} src={s} tgt={t}, parameters={}",
        env!("CARGO_PKG_VERSION"),
        vaswani::kernels::cpu::level().name(),
        rayon::current_num_threads(),
        workload,
        model.num_params()
    );
    let cost = cfg.cost(b, s, t);
    // The decoder-only model of `lm_generate` and `lm_score`, and the text `lm_score` reads:
    // each source followed by its target.
    let lm_cfg = DecoderOnlyConfig::new(v, BlockConfig::new(d, h, f), layers);
    let lm_text = TokenBatch::full(
        vaswani::ndarray::concatenate(
            vaswani::ndarray::Axis(1),
            &[src.ids().view(), tgt_in.ids().view()],
        )
        .expect("as many sources as targets"),
    )?;
    let mut trainer = Trainer::new(
        model,
        TrainerConfig {
            optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
            schedule: Schedule::Constant { lr: 1e-4 },
            clip_norm: None,
            label_smoothing: 0.1,
            precision: args.precision,
        },
    )?;
    if args.precision == Precision::Bf16 {
        eprintln!(
            "# bf16 products on the {:?} path",
            vaswani::kernels::precision::bf16_path()
        );
    }
    let mut dropout_rng = StdRng::seed_from_u64(args.seed.wrapping_add(1));
    // The step's micro-batches: its tokens and FLOPs below count this many batches.
    let micro_batches = args.micro_batches as usize;
    let micro = vec![batch; micro_batches];
    if micro_batches > 1 {
        eprintln!("# {micro_batches} micro-batches per training step");
    }
    for &what in &args.what {
        let times = match what {
            What::TrainStep => time_it(args, || trainer.step(&micro, &mut dropout_rng).map(|_| ()))?,
            // Inference runs on the model with its weights packed once, as a program that
            // evaluates or decodes many batches would (`EncoderDecoder::packed`); the packing
            // itself is reported on stderr.
            // In bf16 the weights are converted once, when they are packed.
            What::EvalForward => with_precision(args.precision, || {
                let packed = pack(&trainer.model);
                time_it(args, || packed.infer(&src, &tgt_in).map(|_| ()))
            })?,
            What::GreedyDecode => with_precision(args.precision, || {
                let packed = pack(&trainer.model);
                time_it(args, || {
                    packed
                        .begin_decode(&src, t)
                        .and_then(|state| vaswani::infer::greedy(state, 1, None, t))
                        .map(|_| ())
                })
            })?,
            What::BeamDecode => with_precision(args.precision, || {
                let packed = pack(&trainer.model);
                let beam = BeamSearch::paper();
                let bos = vec![vec![1]; b];
                time_it(args, || {
                    beam_search(packed.begin_decode(&src, t)?, &bos, &beam, None, t).map(|_| ())
                })
            })?,
            What::LmGenerate => with_precision(args.precision, || {
                let lm: DecoderOnly = lm_cfg.init(&mut StdRng::seed_from_u64(args.seed))?;
                let prompts: Vec<Vec<usize>> = (0..b).map(|i| src.ids().row(i).to_vec()).collect();
                let mut rng = StdRng::seed_from_u64(args.seed);
                let packed = timed_packing(|| lm.packed());
                time_it(args, || {
                    vaswani::infer::generate(
                        packed.begin_generate(b, s + t),
                        &prompts,
                        vaswani::infer::Sampling::Greedy,
                        None,
                        t,
                        &mut rng,
                    )
                    .map(|_| ())
                })
            })?,
            What::LmScore => with_precision(args.precision, || {
                let lm: DecoderOnly = lm_cfg.init(&mut StdRng::seed_from_u64(args.seed))?;
                let packed = timed_packing(|| lm.packed());
                time_it(args, || packed.log_likelihood(&lm_text).map(|_| ()))
            })?,
        };
        let (du, fu, lu, vu, bu, su, tu) = (
            d as u64,
            f as u64,
            layers as u64,
            v as u64,
            b as u64,
            s as u64,
            t as u64,
        );
        let flops = match what {
            What::TrainStep => cost.train_flops * micro_batches as u64,
            What::EvalForward => cost.forward_flops,
            What::GreedyDecode => decode_flops(du, fu, lu, vu, bu, su, tu),
            // The encoder once per source, the decoder for 4 beams (the first step has one).
            What::BeamDecode => {
                let one = decode_flops(du, fu, lu, vu, bu, su, tu);
                let encoder = decode_flops(du, fu, lu, vu, bu, su, 0);
                encoder + 4 * (one - encoder)
            }
            What::LmGenerate => lm_generate_flops(du, fu, lu, vu, bu, su, tu),
            What::LmScore => lm_cfg.cost(b, s + t - 1).forward_flops,
        };
        let tokens = match what {
            What::TrainStep => b * t * micro_batches,
            What::LmScore => b * (s + t - 1),
            _ => b * t,
        };
        report(args, what, &times, tokens as f64, flops as f64);
    }
    Ok(())
}

/// The model's weights packed for inference, the time it took on stderr.
fn pack(model: &EncoderDecoder) -> vaswani::models::PackedEncoderDecoder<'_> {
    timed_packing(|| model.packed())
}

/// `pack()`, the time it took on stderr.
fn timed_packing<P>(pack: impl FnOnce() -> P) -> P {
    let start = Instant::now();
    let packed = pack();
    eprintln!(
        "# weights packed for inference in {:.3} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    packed
}

/// The FLOPs `torch_baseline.py` credits a greedy decode with: the encoder once, then T
/// decoder steps of one token, step i attending to i cached positions and to the source.
fn decode_flops(d: u64, f: u64, layers: u64, v: u64, b: u64, s: u64, t: u64) -> u64 {
    let dense = |m: u64, n: u64, tokens: u64| 2 * m * n * tokens;
    let attn = |lq: u64, lk: u64| 4 * lq * lk * d;
    let enc_layer = dense(d, 3 * d, s) + attn(s, s) + dense(d, d, s) + dense(d, f, s) + dense(f, d, s);
    let self_cached: u64 = (1..=t).map(|i| attn(1, i)).sum();
    let cross: u64 = (0..t).map(|_| attn(1, s)).sum();
    let dec_layer = dense(d, 3 * d, t)
        + self_cached
        + dense(d, d, t)
        + dense(d, d, t)
        + dense(d, 2 * d, s)
        + cross
        + dense(d, d, t)
        + dense(d, f, t)
        + dense(f, d, t);
    b * (layers * enc_layer + layers * dec_layer + dense(d, v, t))
}

/// The FLOPs of [`What::LmGenerate`] with a key/value cache: S prompt positions, then T
/// generated ones, position i attending to the i positions up to itself; the vocabulary's
/// projection for the prompt's last position and each generated one but the last.
fn lm_generate_flops(d: u64, f: u64, layers: u64, v: u64, b: u64, s: u64, t: u64) -> u64 {
    let dense = |m: u64, n: u64, tokens: u64| 2 * m * n * tokens;
    let positions = s + t - 1;
    let attention: u64 = (1..=positions).map(|i| 4 * i * d).sum();
    let layer = dense(d, 3 * d, positions)
        + attention
        + dense(d, d, positions)
        + dense(d, f, positions)
        + dense(f, d, positions);
    b * (layers * layer + dense(d, v, t))
}

fn time_it(args: &Args, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..args.warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn report(args: &Args, what: What, times: &[f64], tokens: f64, flops: f64) {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    };
    let what_name = match what {
        What::TrainStep => "train_step",
        What::EvalForward => "eval_forward",
        What::GreedyDecode => "greedy_decode",
        What::BeamDecode => "beam_decode",
        What::LmGenerate => "lm_generate",
        What::LmScore => "lm_score",
    };
    let workload = format!("{:?}", args.workload.expect("a workload")).to_lowercase();
    let (min, max) = (sorted[0], sorted[n - 1]);
    let tokens_per_s = tokens / median;
    let gflops = flops / median / 1e9;
    if args.json {
        let batch = args.batch.map_or(String::new(), |b| format!("\"batch\": {b}, "));
        println!(
            "{{\"workload\": \"{workload}\", \"threads\": {}, {batch}\"what\": \"{what_name}\", \"median_ms\": {:.3}, \"min_ms\": {:.3}, \"max_ms\": {:.3}, \"tokens_per_s\": {:.1}, \"gflops\": {:.2}, \"steps\": {}, \"precision\": \"{}\", \"impl\": \"vaswani {}\"}}",
            args.threads,
            median * 1e3,
            min * 1e3,
            max * 1e3,
            tokens_per_s,
            gflops,
            args.steps,
            args.precision,
            env!("CARGO_PKG_VERSION")
        );
    } else {
        let batch = args.batch.map_or(String::new(), |b| format!(" batch={b}"));
        println!(
            "{workload:>5}{batch} threads={} {what_name:<13} median {:10.3} ms (min {:.3}, max {:.3})  {tokens_per_s:10.1} tok/s {gflops:8.2} GFLOP/s",
            args.threads,
            median * 1e3,
            min * 1e3,
            max * 1e3
        );
    }
}
