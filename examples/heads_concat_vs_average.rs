//! Are the heads of multi-head attention concatenated or averaged? Concatenated (§3.2.2):
//! `MultiHead(Q, K, V) = Concat(head₁, …, head_h)·W_O`. This example trains the same
//! encoder-decoder twice on the same task, once as the paper does and once with the heads
//! averaged, prints both held-out figures and parameter counts, and draws both loss curves:
//!
//!     cargo run --release --example heads_concat_vs_average
//!     cargo run --release --example heads_concat_vs_average -- --d-model 64 --heads 16 --steps 300
//!     cargo run --release --example heads_concat_vs_average -- --plot docs/guide/img/heads_concat_vs_average_loss.svg
//!
//! Averaging is concatenation with a constrained W_O: `mean(head₁, …, head_h)·B` equals
//! `Concat(head₁, …, head_h)·W_O` when W_O is `h` copies of `B/h` stacked over the heads'
//! column blocks. The averaged model is trained that way: its W_O starts with equal blocks,
//! and after every optimizer step each W_O (every attention layer's) is projected back onto
//! the constraint, its blocks replaced by their mean. Its distinct parameters are fewer (a
//! W_O of `d_model · d_k` instead of `d_model²`), and every head writes into the same `d_k`
//! columns, so the attention output of a layer has rank at most `d_k` instead of `d_model`.
//!
//! The task is reversing random sequences of symbols; both runs start from the same weights
//! (before the averaged run's first projection) and see the same batches. The two training
//! loss curves go to a PNG, or to an SVG for a `--plot` path ending in `.svg`: the last
//! command above writes the one that the guide shows (`vaswani::guide::attention`).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vaswani::blocks::BlockConfig;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig};
use vaswani::ndarray::{Axis, Ix2};
use vaswani::rand::{SeedableRng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainer, TrainerConfig};
use vaswani::{Params, Result};

/// Train an encoder-decoder with its attention heads concatenated (the paper) and averaged.
#[derive(Parser, Debug)]
struct Args {
    /// Training steps of each run.
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// Attention heads h (d_k = d_model / h).
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Model width d_model (d_ff is 4 times it).
    #[arg(long, default_value_t = 32)]
    d_model: usize,
    /// Encoder and decoder layers (each).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Peak learning rate (100 warm-up steps, then cosine decay to 0).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Distinct symbols.
    #[arg(long, default_value_t = 40)]
    symbols: usize,
    /// Longest sequence; lengths are uniform from 4 to this.
    #[arg(long, default_value_t = 12)]
    max_len: usize,
    /// Threads in the rayon pool (results are the same for any number).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of the initial weights and of the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the two loss curves (an SVG if the name ends in .svg, else a PNG).
    #[arg(long, default_value = "heads_concat_vs_average_loss.png")]
    plot: PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::init_threads(args.threads);
    common::run_on_pool(|| run(&args))
}

/// Replaces the `heads` column blocks of every attention output projection W_O
/// (`[d_model, d_model]`, input columns grouped by head) by their mean; returns how many
/// weights the constraint ties (each W_O keeps `d_model · d_k` distinct ones).
fn average_heads(model: &mut EncoderDecoder, heads: usize) -> usize {
    let mut tied = 0;
    model.visit_mut("", &mut |name, t| {
        if !name.ends_with(".w_o") {
            return;
        }
        let mut w = t.into_dimensionality::<Ix2>().expect("W_O is a matrix");
        let (rows, cols) = w.dim();
        let d_k = cols / heads;
        let mut mean = w.slice(vaswani::ndarray::s![.., 0..d_k]).to_owned();
        for i in 1..heads {
            mean += &w.slice(vaswani::ndarray::s![.., i * d_k..(i + 1) * d_k]);
        }
        mean /= heads as f32;
        for (i, mut block) in w.axis_chunks_iter_mut(Axis(1), d_k).enumerate() {
            debug_assert!(i < heads);
            block.assign(&mean);
        }
        tied += rows * cols - rows * d_k;
    });
    tied
}

fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    if args.heads < 2 || !args.d_model.is_multiple_of(args.heads) {
        return Err(vaswani::Error::InvalidInput {
            why: format!(
                "--heads must be at least 2 and divide --d-model ({}), got {}",
                args.d_model, args.heads
            ),
        });
    }
    let vocab = 3 + args.symbols;
    let lengths = (4, args.max_len);
    let held_out = common::reversal_batch(
        &mut StdRng::seed_from_u64(args.seed.wrapping_add(1)),
        args.symbols,
        lengths,
        500,
    )?;
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for averaged in [false, true] {
        let block = BlockConfig::new(args.d_model, args.heads, 4 * args.d_model).with_p_drop(0.0);
        let mut model: EncoderDecoder =
            EncoderDecoderConfig::new(vocab, vocab, block, args.layers, args.layers)
                .with_share_embeddings(true)
                .init(&mut StdRng::seed_from_u64(args.seed))?;
        let tied = if averaged {
            average_heads(&mut model, args.heads)
        } else {
            0
        };
        let params = model.num_params() - tied;
        let cfg = TrainerConfig {
            optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
            schedule: Schedule::Cosine {
                peak: args.lr,
                warmup: 100.min(args.steps as u64 / 4),
                total: args.steps as u64,
                min: 0.0,
            },
            clip_norm: Some(1.0),
            label_smoothing: 0.0,
            precision: vaswani::Precision::F32,
        };
        let name = if averaged {
            "heads averaged"
        } else {
            "heads concatenated (§3.2.2)"
        };
        let mut trainer = Trainer::new(model, cfg)?;
        let mut data = StdRng::seed_from_u64(args.seed.wrapping_add(2));
        let mut progress = common::Progress::new(args.steps, name);
        let mut losses = Vec::with_capacity(args.steps);
        for step in 0..args.steps {
            let b = common::reversal_batch(&mut data, args.symbols, lengths, 32)?;
            let stats = trainer.step(std::slice::from_ref(&b), &mut StdRng::seed_from_u64(step as u64))?;
            if averaged {
                average_heads(&mut trainer.model, args.heads);
            }
            progress.update(step, stats.loss.loss, b.src.tokens() + b.tgt_out.tokens());
            losses.push(stats.loss.loss);
        }
        curves.push((name, (1..).map(f64::from).zip(losses.iter().copied()).collect()));
        progress.finish();
        let tail = &losses[losses.len().saturating_sub(50)..];
        let final_loss = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
        let held_loss = trainer.model.loss(&held_out, 0.0)?.loss;
        let exact = common::exact_match(&trainer.model, &held_out, args.max_len + 1)?;
        rows.push((name, params, final_loss, held_loss, exact));
    }
    println!(
        "\nreversing sequences of 4 to {} symbols, {} + {} layers, d_model {}, h = {} heads of d_k = {}, {} steps:",
        args.max_len,
        args.layers,
        args.layers,
        args.d_model,
        args.heads,
        args.d_model / args.heads,
        args.steps
    );
    println!(
        "  {:<30} {:>11} {:>12} {:>15} {:>12}",
        "", "parameters", "train loss", "held-out loss", "exact match"
    );
    for (name, params, train, held, exact) in &rows {
        println!(
            "  {name:<30} {params:>11} {train:>12.4} {held:>15.4} {:>11.1}%",
            100.0 * exact
        );
    }
    common::plot_curves(
        &args.plot,
        "Multi-head attention: heads concatenated against averaged",
        "cross-entropy (nats/token)",
        &curves,
        true,
    )
    .map_err(|e| vaswani::Error::InvalidInput {
        why: format!("plotting {}: {e}", args.plot.display()),
    })?;
    println!(
        "wrote {} (the two loss curves); {:.0} s in all",
        args.plot.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
