//! Dates to ISO 8601: an encoder-decoder Transformer reads dates written the ways people
//! write them ("Sat, 28 Nov 2026", "november 28th, 2026", "28.11.2026") one character at a
//! time and writes them as `2026-11-28`. Some formats are never shown in training; the
//! held-out set mixes them in.
//!
//!     cargo run --release --example dates
//!     cargo run --release --example dates -- --steps 1000 --d-model 32 --threads 1
//!
//! The data are generated here with seeded RNGs: dates from 1900-01-01 to 2099-12-31 (leap
//! years, month lengths and weekdays right), each written in one format with the variation
//! people produce: Title, lower or UPPER case, leading zeros or not, optional commas,
//! "Sept" for "Sep", "Nov." for "Nov".
//!
//! Numeric dates whose year comes last are always day first (28/11/2026, 28.11.2026,
//! 28-11-2026, as most of the world writes them); those whose year comes first are year,
//! month, day (ISO's order). The US month-first 11/28/2026 is never generated, so no input
//! has two readings.
//!
//! Held out twice over: the evaluation dates are a fixed 1 in 20 of the 73,049 days (picked
//! by a hash of the day and the seed) that training never samples, and a quarter of them are
//! written in formats training never shows. Those unseen formats are new combinations of
//! pieces that training shows elsewhere (see [`UNSEEN`]). The figure at the end is the exact
//! match on the held-out set, overall and on seen and unseen formats apart.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vaswani::blocks::BlockConfig;
use vaswani::io::save_trainer;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, TokenBatch};
use vaswani::rand::{SeedableRng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, TrainerConfig};
use vaswani::{Params, Result};

use common::dates_data::*;

/// Train an encoder-decoder Transformer to rewrite dates as ISO 8601.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: common::CommonArgs<1500>,
    /// Model width d_model (d_ff is 4 times it).
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Encoder and decoder layers (each).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Dates per training step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Peak learning rate (linear warm-up for 100 steps, then cosine decay to 0).
    #[arg(long, default_value_t = 4e-3)]
    lr: f64,
    /// Held-out dates to decode (a quarter of them in unseen formats).
    #[arg(long, default_value_t = 2000)]
    held_out: usize,
    /// Where to write the loss curve.
    #[arg(long, default_value = "dates_loss.png")]
    plot: PathBuf,
}

// ---------------------------------------------------------------------------------------

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::init_threads(args.common.threads);
    common::run_on_pool(|| args.common.in_precision(|| run(&args)))
}

fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    let seed = args.common.seed;
    // Every random draw is fixed by --seed: the initialisation and the held-out data here,
    // and each step's batch and dropout by (seed, step), so that --resume continues exactly.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut held_rng = StdRng::seed_from_u64(seed.wrapping_add(2));

    let days = calendar();
    assert_eq!(days.len(), 73_049);
    let saturday = Date {
        year: 2026,
        month: 11,
        day: 28,
        weekday: 5,
    };
    assert_eq!(days[46_352], saturday, "the calendar is off");
    let (mut train_days, mut held_days) = (Vec::new(), Vec::new());
    for (i, &date) in days.iter().enumerate() {
        if reserved_for_evaluation(i, seed) {
            held_days.push(date);
        } else {
            train_days.push(date);
        }
    }

    let block = BlockConfig::new(args.d_model, args.heads, 4 * args.d_model).with_p_drop(0.0);
    let cfg = EncoderDecoderConfig::new(VOCAB, VOCAB, block, args.layers, args.layers)
        .with_share_embeddings(true)
        .with_tie_output(true);
    let model: EncoderDecoder = cfg.init(&mut rng)?;
    println!(
        "dates: {} formats in training, {} held out, {} training days and {} held-out days of 1900–2099, \
         d_model {}, {} heads, {}+{} layers, {} parameters",
        SEEN.len(),
        UNSEEN.len(),
        train_days.len(),
        held_days.len(),
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

    let valid_seen = batch(&examples(&mut held_rng, &held_days, &SEEN, 128))?;
    let valid_unseen = batch(&examples(&mut held_rng, &held_days, &UNSEEN, 128))?;
    let mut train_curve = Vec::new();
    let mut seen_curve = Vec::new();
    let mut unseen_curve = Vec::new();
    let mut progress = common::Progress::new(args.common.steps, "dates");
    for step in trainer.steps() as usize..args.common.steps {
        let b = batch(&examples(
            &mut common::step_rng(seed, step as u64, 0),
            &train_days,
            &SEEN,
            args.batch,
        ))?;
        let stats = trainer.step(
            std::slice::from_ref(&b),
            &mut common::step_rng(seed, step as u64, 1),
        )?;
        progress.update(step, stats.loss.loss, b.src.tokens() + b.tgt_out.tokens());
        train_curve.push((step as f64 + 1.0, stats.loss.loss));
        if let Some(path) = args.common.save_due(step) {
            save_trainer(path, &trainer)?;
        }
        if (step + 1) % 50 == 0 || step + 1 == args.common.steps {
            let x = step as f64 + 1.0;
            seen_curve.push((x, trainer.model.loss(&valid_seen, 0.0)?.loss));
            unseen_curve.push((x, trainer.model.loss(&valid_unseen, 0.0)?.loss));
        }
    }
    progress.finish();
    let final_loss = train_curve.last().map_or(f64::NAN, |&(_, l)| l);
    println!("final training loss {final_loss:.9} (the same for any --threads)");
    common::plot_curves(
        &args.plot,
        "Dates to ISO 8601",
        "cross-entropy (nats/token)",
        &[
            ("train", train_curve),
            ("held-out, seen formats", seen_curve),
            ("held-out, unseen formats", unseen_curve),
        ],
        true,
    )
    .map_err(|e| vaswani::Error::InvalidInput {
        why: format!("plotting {}: {e}", args.plot.display()),
    })?;
    println!("loss curve written to {}", args.plot.display());

    let held_out = held_out_examples(&mut held_rng, &held_days, args.held_out);
    let sources: Vec<Vec<usize>> = held_out.iter().map(|e| encode(&e.text)).collect();
    let state = trainer
        .model
        .begin_decode(&TokenBatch::from_sequences(&sources, PAD)?, ISO_LEN + 1)?;
    let decoded: Vec<String> = vaswani::infer::greedy(state, BOS, Some(EOS), ISO_LEN + 1)?
        .iter()
        .map(|d| decode(d))
        .collect();
    let right: Vec<bool> = held_out.iter().zip(&decoded).map(|(e, d)| e.iso == *d).collect();

    println!("a few held-out decodes (source → output):");
    let line = |i: usize| {
        let e = &held_out[i];
        let mark = if right[i] { "ok" } else { "WRONG" };
        let tag = if e.unseen() { "  (unseen format)" } else { "" };
        println!("  {:>34} → {:<10} {mark}{tag}", e.text, decoded[i]);
    };
    let first = |f: Format| (0..held_out.len()).find(|&i| held_out[i].format == f);
    let seen_idx = (0..held_out.len()).filter(|&i| !held_out[i].unseen());
    seen_idx
        .take(4)
        .chain(UNSEEN.iter().filter_map(|&f| first(f)))
        .for_each(line);
    let wrong: Vec<usize> = (0..held_out.len()).filter(|&i| !right[i]).collect();
    if !wrong.is_empty() {
        let first = if wrong.len() > 5 { ", the first 5" } else { "" };
        println!("{} wrong{first}:", wrong.len());
        wrong.iter().copied().take(5).for_each(line);
    }

    // Exact match in percent over the held-out examples that `keep` selects, rounded down
    // (1999 of 2000 is 99.9%, not 100.0%).
    let accuracy = |keep: &dyn Fn(&Example) -> bool| {
        let (n, ok) = held_out
            .iter()
            .zip(&right)
            .filter(|(e, _)| keep(e))
            .fold((0, 0), |(n, ok), (_, &r)| (n + 1, ok + usize::from(r)));
        (1000.0 * ok as f64 / n.max(1) as f64).floor() / 10.0
    };
    println!("unseen formats one by one:");
    for f in UNSEEN {
        let n = held_out.iter().filter(|e| e.format == f).count();
        println!(
            "  {:<24} {:5.1}% of {n}",
            f.example(),
            accuracy(&|e| e.format == f)
        );
    }
    println!(
        "held-out exact match: {:.1}% (seen formats {:.1}%, unseen formats {:.1}%; {} dates) in {}",
        accuracy(&|_| true),
        accuracy(&|e| !e.unseen()),
        accuracy(&|e| e.unseen()),
        held_out.len(),
        common::fmt_duration(start.elapsed())
    );
    Ok(())
}
