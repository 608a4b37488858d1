//! The copy task: an encoder-decoder Transformer learns to copy random sequences of symbols,
//! and decodes 1,000 held-out sequences exactly.
//!
//!     cargo run --release --example copy_task
//!     cargo run --release --example copy_task -- --steps 1500 --d-model 64 --threads 1
//!
//! It is the "first example" of the Annotated Transformer: no data to download, a task the
//! model can only solve by attending to the right source position, and an unambiguous
//! figure at the end (held-out exact match). It writes the loss curve to a PNG.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vaswani::blocks::BlockConfig;
use vaswani::io::save_trainer;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, Seq2SeqBatch, TokenBatch};
use vaswani::rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, TrainerConfig};
use vaswani::{Params, Result};

const PAD: usize = 0;
const BOS: usize = 1;
const EOS: usize = 2;
const SPECIALS: usize = 3;

/// Train an encoder-decoder Transformer to copy random sequences.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: common::CommonArgs<1000>,
    /// Distinct symbols (the vocabulary is these plus PAD, BOS and EOS).
    #[arg(long, default_value_t = 10)]
    symbols: usize,
    /// Longest sequence; lengths are uniform from 1 to this.
    #[arg(long, default_value_t = 10)]
    max_len: usize,
    /// Model width d_model.
    #[arg(long, default_value_t = 32)]
    d_model: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Encoder and decoder layers (each).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Sequences per training step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Peak learning rate (linear warm-up for 100 steps, then cosine decay to 0).
    #[arg(long, default_value_t = 8e-3)]
    lr: f64,
    /// Held-out sequences to decode.
    #[arg(long, default_value_t = 1000)]
    held_out: usize,
    /// Where to write the loss curve.
    #[arg(long, default_value = "copy_task_loss.png")]
    plot: PathBuf,
}

fn random_sequence(rng: &mut StdRng, args: &Args) -> Vec<usize> {
    let len = rng.random_range(1..=args.max_len);
    (0..len)
        .map(|_| SPECIALS + rng.random_range(0..args.symbols))
        .collect()
}

fn batch(rng: &mut StdRng, args: &Args, size: usize) -> Result<Seq2SeqBatch> {
    let pairs: Vec<(Vec<usize>, Vec<usize>)> = (0..size)
        .map(|_| random_sequence(rng, args))
        .map(|s| (s.clone(), s))
        .collect();
    Seq2SeqBatch::from_pairs(&pairs, BOS, EOS, PAD)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::init_threads(args.common.threads);
    common::run_on_pool(|| args.common.in_precision(|| run(&args)))
}

fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    let vocab = SPECIALS + args.symbols;
    let seed = args.common.seed;
    // Every random draw is fixed by --seed: the initialisation and the held-out data here,
    // and each step's batch and dropout by (seed, step), so that --resume continues exactly.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut held_rng = StdRng::seed_from_u64(seed.wrapping_add(2));

    let block = BlockConfig::new(args.d_model, args.heads, 2 * args.d_model).with_p_drop(0.0);
    let cfg = EncoderDecoderConfig::new(vocab, vocab, block, args.layers, args.layers)
        .with_share_embeddings(true)
        .with_tie_output(true);
    let model: EncoderDecoder = cfg.init(&mut rng)?;
    println!(
        "copy task: {} symbols, lengths 1..={}, d_model {}, {} heads, {}+{} layers, {} parameters",
        args.symbols,
        args.max_len,
        args.d_model,
        args.heads,
        args.layers,
        args.layers,
        model.num_params()
    );
    let steps = args.common.steps as u64;
    let fresh = TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Cosine {
            peak: args.lr,
            warmup: 100.min(steps / 4),
            total: steps,
            min: 0.0,
        },
        clip_norm: Some(1.0),
        label_smoothing: 0.0,
        precision: args.common.precision,
    };
    let mut trainer = args.common.trainer(model, fresh)?;

    let valid = batch(&mut held_rng, args, 256)?;
    let mut train_curve = Vec::new();
    let mut valid_curve = Vec::new();
    let first = trainer.steps() as usize;
    let mut progress = common::Progress::new(args.common.steps, "copy_task");
    for step in first..args.common.steps {
        let b = batch(&mut common::step_rng(seed, step as u64, 0), args, args.batch)?;
        let stats = trainer.step(
            std::slice::from_ref(&b),
            &mut common::step_rng(seed, step as u64, 1),
        )?;
        progress.update(step, stats.loss.loss, b.tgt_out.tokens());
        train_curve.push((step as f64 + 1.0, stats.loss.loss));
        if let Some(path) = args.common.save_due(step) {
            save_trainer(path, &trainer)?;
        }
        if (step + 1) % 50 == 0 || step + 1 == args.common.steps {
            valid_curve.push((step as f64 + 1.0, trainer.model.loss(&valid, 0.0)?.loss));
        }
    }
    progress.finish();
    if let Some(path) = &args.common.save {
        println!("checkpoint (model and optimizer) written to {}", path.display());
    }
    let final_loss = train_curve.last().map_or(f64::NAN, |&(_, l)| l);
    println!("final training loss {final_loss:.9} (the same for any --threads)");
    common::plot_curves(
        &args.plot,
        "Copy task",
        "cross-entropy (nats/token)",
        &[("train", train_curve), ("held-out", valid_curve)],
        true,
    )
    .map_err(|e| vaswani::Error::InvalidInput {
        why: format!("plotting {}: {e}", args.plot.display()),
    })?;
    println!("loss curve written to {}", args.plot.display());

    let held_out: Vec<Vec<usize>> = (0..args.held_out)
        .map(|_| random_sequence(&mut held_rng, args))
        .collect();
    let src = TokenBatch::from_sequences(&held_out, PAD)?;
    let state = trainer.model.begin_decode(&src, args.max_len + 1)?;
    let decoded = vaswani::infer::greedy(state, BOS, Some(EOS), args.max_len + 1)?;
    println!("a few held-out decodes (source → output):");
    let show = |s: &[usize]| {
        s.iter()
            .map(|&t| char::from(b'a' + (t - SPECIALS) as u8).to_string())
            .collect::<String>()
    };
    for (s, d) in held_out.iter().zip(&decoded).take(5) {
        let mark = if s == d { "ok" } else { "WRONG" };
        println!("  {:>12} → {:<12} {mark}", show(s), show(d));
    }
    let exact = decoded.iter().zip(&held_out).filter(|(d, s)| d == s).count();
    println!(
        "held-out exact match: {:.1}% ({exact}/{} sequences) in {}",
        100.0 * exact as f64 / held_out.len() as f64,
        held_out.len(),
        common::fmt_duration(start.elapsed())
    );
    Ok(())
}
