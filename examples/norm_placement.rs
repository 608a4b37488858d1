//! Add & Norm before or after? The paper normalises after the residual sum,
//! `LayerNorm(x + Sublayer(x))` (post-norm, §3.1) and warms the learning rate up for 4000
//! steps (§5.3); most models since normalise first, `x + Sublayer(LayerNorm(x))` (pre-norm).
//! This example trains the same deep encoder-decoder on the same data four ways — post-norm
//! and pre-norm, with and without warm-up — and reports how each fared:
//!
//!     cargo run --release --example norm_placement
//!     cargo run --release --example norm_placement -- --layers 8 --lr 2e-3
//!     cargo run --release --example norm_placement -- --plot docs/guide/img/norm_placement_loss.svg
//!
//! The task is reversing random sequences of symbols (every output position must find its
//! source position by attention). Each run starts from the same initial weights (the seed)
//! and sees the same batches; the schedules differ only in the first `--warmup` steps (a
//! linear ramp, or the peak rate at once) and then decay the same way (cosine to 0). The
//! figures are the mean training loss of the last 50 steps and the exact match of greedy
//! decoding on held-out sequences; a run whose loss became NaN or infinite, or ended above
//! where it started, is reported as diverged. The four loss curves go to a PNG, or to an SVG
//! for a `--plot` path ending in `.svg`: the last command above writes the one that the guide
//! shows (`vaswani::guide::normalisation`).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vaswani::Result;
use vaswani::blocks::BlockConfig;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig};
use vaswani::rand::{SeedableRng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainer, TrainerConfig};

const SPECIALS: usize = 3;

/// Train a deep encoder-decoder post-norm and pre-norm, with and without warm-up.
#[derive(Parser, Debug)]
struct Args {
    /// Training steps of each of the four runs.
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Warm-up steps of the runs with warm-up.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Encoder and decoder layers (each).
    #[arg(long, default_value_t = 6)]
    layers: usize,
    /// Model width d_model (d_ff is 4 times it).
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Distinct symbols.
    #[arg(long, default_value_t = 10)]
    symbols: usize,
    /// Longest sequence; lengths are uniform from 4 to this.
    #[arg(long, default_value_t = 10)]
    max_len: usize,
    /// Threads in the rayon pool (results are the same for any number).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of the initial weights and of the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the four loss curves (an SVG if the name ends in .svg, else a PNG).
    #[arg(long, default_value = "norm_placement_loss.png")]
    plot: PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::init_threads(args.threads);
    common::run_on_pool(|| run(&args))
}

/// What one run gave.
struct Outcome {
    name: String,
    curve: Vec<(f64, f64)>,
    final_loss: f64,
    exact: f64,
    diverged: bool,
}

fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    let vocab = SPECIALS + args.symbols;
    let held_out = common::reversal_batch(
        &mut StdRng::seed_from_u64(args.seed.wrapping_add(1)),
        args.symbols,
        (4, args.max_len),
        500,
    )?;
    let mut outcomes = Vec::new();
    for norm_first in [false, true] {
        for warmup in [args.warmup, 0] {
            let block = BlockConfig::new(args.d_model, 4, 4 * args.d_model)
                .with_p_drop(0.0)
                .with_norm_first(norm_first);
            let model: EncoderDecoder =
                EncoderDecoderConfig::new(vocab, vocab, block, args.layers, args.layers)
                    .with_share_embeddings(true)
                    .init(&mut StdRng::seed_from_u64(args.seed))?;
            let cfg = TrainerConfig {
                optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
                schedule: Schedule::Cosine {
                    peak: args.lr,
                    warmup,
                    total: args.steps as u64,
                    min: 0.0,
                },
                clip_norm: None,
                label_smoothing: 0.0,
                precision: vaswani::Precision::F32,
            };
            let name = format!(
                "{}, {}",
                if norm_first { "pre-norm" } else { "post-norm" },
                if warmup > 0 {
                    format!("{warmup} warm-up steps")
                } else {
                    "no warm-up".into()
                }
            );
            let mut trainer = Trainer::new(model, cfg)?;
            let mut data = StdRng::seed_from_u64(args.seed.wrapping_add(2));
            let mut curve = Vec::with_capacity(args.steps);
            let mut progress = common::Progress::new(args.steps, &name);
            for step in 0..args.steps {
                let b = common::reversal_batch(&mut data, args.symbols, (4, args.max_len), 32)?;
                let stats =
                    trainer.step(std::slice::from_ref(&b), &mut StdRng::seed_from_u64(step as u64))?;
                progress.update(step, stats.loss.loss, b.src.tokens() + b.tgt_out.tokens());
                curve.push((step as f64 + 1.0, stats.loss.loss));
            }
            progress.finish();
            let tail = &curve[curve.len().saturating_sub(50)..];
            let final_loss = tail.iter().map(|p| p.1).sum::<f64>() / tail.len() as f64;
            let first = curve.first().map_or(f64::NAN, |p| p.1);
            let diverged = !final_loss.is_finite() || final_loss >= first;
            let exact = if diverged {
                0.0
            } else {
                common::exact_match(&trainer.model, &held_out, args.max_len + 1)?
            };
            outcomes.push(Outcome {
                name,
                curve,
                final_loss,
                exact,
                diverged,
            });
        }
    }

    println!(
        "\nreversing sequences of 4 to {} symbols, {} + {} layers of d_model {}, peak learning rate {}, {} steps each:",
        args.max_len, args.layers, args.layers, args.d_model, args.lr, args.steps
    );
    println!("  {:<32} {:>12} {:>14}", "", "final loss", "exact match");
    for o in &outcomes {
        let verdict = if o.diverged { "  diverged" } else { "" };
        println!(
            "  {:<32} {:>12.4} {:>13.1}%{verdict}",
            o.name,
            o.final_loss,
            100.0 * o.exact
        );
    }
    let series: Vec<(&str, Vec<(f64, f64)>)> = outcomes
        .iter()
        .map(|o| (o.name.as_str(), o.curve.clone()))
        .collect();
    common::plot_curves(
        &args.plot,
        "Add & Norm: post-norm against pre-norm",
        "cross-entropy (nats/token)",
        &series,
        true,
    )
    .map_err(|e| vaswani::Error::InvalidInput {
        why: format!("plotting {}: {e}", args.plot.display()),
    })?;
    println!(
        "wrote {} (the four loss curves); {:.0} s in all",
        args.plot.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
