//! Attention you can look at: the dates model of the `dates` example reads a date and writes
//! it as ISO 8601, and this example draws where it looked.
//!
//!     cargo run --release --example attention_maps
//!     cargo run --release --example attention_maps -- --date "november 28th, 2026"
//!     cargo run --release --example dates -- --save dates.safetensors
//!     cargo run --release --example attention_maps -- --checkpoint dates.safetensors
//!     cargo run --release --example attention_maps -- --svg --out docs/guide/img/attention
//!
//! Without `--checkpoint` it first trains the dates model briefly (`--steps`, a few hundred:
//! enough for the maps to show their pattern, not for every date to come out right). It then
//! decodes `--date` greedily and writes PNG heat maps with the characters on the axes:
//!
//! - `<out>_cross_h<k>.png`: the cross-attention of each head k of decoder layer `--layer`
//!   over the input, one row per output character (the row of the position that wrote it).
//!   The digits of the year, month and day should look at the characters they come from.
//! - `<out>_encoder.png`: the self-attention of encoder layer `--layer`, head `--head`.
//!
//! Each row is a softmax over the keys it may see: it sums to 1 (§3.2.1). With `--svg` the
//! maps are SVG files instead; the last command above writes those that the guide shows
//! (`vaswani::guide::attention`).

mod common;

use std::path::PathBuf;

use clap::Parser;
use vaswani::blocks::BlockConfig;
use vaswani::io::load_model;
use vaswani::models::{AttentionMaps, EncoderDecoder, EncoderDecoderConfig, TokenBatch};
use vaswani::rand::{SeedableRng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainer, TrainerConfig};

use common::dates_data::*;

/// Draw the attention of the dates model as heat maps.
#[derive(Parser, Debug)]
struct Args {
    /// A checkpoint written by `dates --save` (any d_model, heads, layers); without one the
    /// model is trained here first.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Training steps when there is no checkpoint.
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Threads in the rayon pool.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of the training run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The date to read, printable ASCII.
    #[arg(long, default_value = "Sat, 28 Nov 2026")]
    date: String,
    /// The layer whose maps are drawn (0 is the first; default: the last).
    #[arg(long)]
    layer: Option<usize>,
    /// The encoder head whose self-attention is drawn.
    #[arg(long, default_value_t = 0)]
    head: usize,
    /// Prefix of the files written.
    #[arg(long, default_value = "attention")]
    out: PathBuf,
    /// Write SVG instead of PNG (the guide's pictures in docs/guide/img are SVG).
    #[arg(long)]
    svg: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::init_threads(args.threads);
    common::run_on_pool(|| run(&args))
}

fn run(args: &Args) -> Result<(), String> {
    if !args.date.bytes().all(|c| (b' '..=b'~').contains(&c)) || args.date.is_empty() {
        return Err(format!("--date must be printable ASCII, got {:?}", args.date));
    }
    let model = match &args.checkpoint {
        Some(path) => {
            let model: EncoderDecoder = load_model(path).map_err(|e| e.to_string())?;
            println!("loaded {}", path.display());
            model
        }
        None => train(args).map_err(|e| e.to_string())?,
    };
    let decode_maps = || -> vaswani::Result<_> {
        let src = TokenBatch::from_sequences(&[encode(&args.date)], PAD)?;
        let state = model.begin_decode(&src, ISO_LEN + 1)?;
        let out = vaswani::infer::greedy(state, BOS, Some(EOS), ISO_LEN + 1)?.remove(0);
        // The maps of the decode: a pass over [BOS] and the decoded tokens.
        let mut tgt_in = vec![BOS];
        tgt_in.extend_from_slice(&out);
        let maps = model.attention(&src, &TokenBatch::from_sequences(&[tgt_in], PAD)?)?;
        Ok((out, maps))
    };
    let (out, maps) = decode_maps().map_err(|e| e.to_string())?;
    println!("{} → {}", args.date, decode(&out));

    let layers = maps.cross.len();
    let layer = args.layer.unwrap_or(layers - 1);
    let heads = maps.cross[0].dim().1;
    if layer >= layers || args.head >= heads {
        return Err(format!(
            "the model has {layers} layers and {heads} heads; asked for layer {layer}, head {}",
            args.head
        ));
    }
    let chars = |text: &str| -> Vec<String> {
        text.chars()
            .map(|c| {
                if c == ' ' {
                    "␣".to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    };
    let input = chars(&args.date);
    // Row t is the position that wrote output t (the last writes EOS).
    let mut written = chars(&decode(&out));
    written.push("EOS".into());
    let stem = args
        .out
        .file_name()
        .map_or("attention".into(), |s| s.to_string_lossy().into_owned());
    let ext = if args.svg { "svg" } else { "png" };
    let mut files = Vec::new();
    for h in 0..heads {
        let path = args.out.with_file_name(format!("{stem}_cross_h{h}.{ext}"));
        common::heat_map(
            &path,
            &format!("cross-attention, decoder layer {layer}, head {h}"),
            AttentionMaps::map(&maps.cross, layer, 0, h),
            &written,
            &input,
            ("input character (key)", "output character (query)"),
        )
        .map_err(|e| e.to_string())?;
        files.push(path);
    }
    let path = args.out.with_file_name(format!("{stem}_encoder.{ext}"));
    common::heat_map(
        &path,
        &format!("encoder self-attention, layer {layer}, head {}", args.head),
        AttentionMaps::map(&maps.encoder, layer, 0, args.head),
        &input,
        &input,
        ("key", "query"),
    )
    .map_err(|e| e.to_string())?;
    files.push(path);
    for f in &files {
        println!("wrote {}", f.display());
    }
    // The sharpest head (the largest mean of its rows' largest weights), in text.
    let sharpest = (0..heads)
        .max_by(|&a, &b| {
            let peak = |h| {
                let m = AttentionMaps::map(&maps.cross, layer, 0, h);
                m.rows()
                    .into_iter()
                    .map(|r| r.fold(0.0f32, |x, &v| x.max(v)))
                    .sum::<f32>()
            };
            peak(a).total_cmp(&peak(b))
        })
        .expect("at least one head");
    println!(
        "\ncross-attention of decoder layer {layer}, head {sharpest} (█ = all of a row's weight, blank = none):"
    );
    print!(
        "{}",
        shades(
            AttentionMaps::map(&maps.cross, layer, 0, sharpest),
            &written,
            &input
        )
    );
    Ok(())
}

/// A map as text: one character per weight, from ' ' (0) to '█' (the row's whole weight),
/// the query labels down the left and the key labels along the bottom.
fn shades(map: vaswani::ndarray::ArrayView2<f32>, rows: &[String], cols: &[String]) -> String {
    const SHADES: [char; 5] = [' ', '░', '▒', '▓', '█'];
    let width = rows.iter().map(|r| r.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, row) in rows.iter().zip(map.rows()) {
        out += &format!("  {label:>width$} │");
        for &w in row {
            let level = (w.clamp(0.0, 1.0) * (SHADES.len() - 1) as f32).round() as usize;
            out.push(SHADES[level]);
            out.push(SHADES[level]);
        }
        out.push('\n');
    }
    out += &format!("  {:>width$} └{}\n", "", "─".repeat(2 * cols.len()));
    out += &format!("  {:>width$}  ", "");
    for c in cols {
        out += &format!("{:<2}", c.chars().next().unwrap_or(' '));
    }
    out.push('\n');
    out
}

/// The dates model trained for `--steps` on the formats of the `dates` example.
fn train(args: &Args) -> vaswani::Result<EncoderDecoder> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let days = calendar();
    let block = BlockConfig::new(64, 4, 256).with_p_drop(0.0);
    let model: EncoderDecoder = EncoderDecoderConfig::new(VOCAB, VOCAB, block, 2, 2)
        .with_share_embeddings(true)
        .init(&mut rng)?;
    let steps = args.steps as u64;
    let cfg = TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Cosine {
            peak: 4e-3,
            warmup: 100.min(steps / 4),
            total: steps,
            min: 0.0,
        },
        clip_norm: Some(1.0),
        label_smoothing: 0.0,
        precision: vaswani::Precision::F32,
    };
    let mut trainer = Trainer::new(model, cfg)?;
    let mut progress = common::Progress::new(args.steps, "training the dates model");
    for step in 0..args.steps {
        let b = batch(&examples(
            &mut common::step_rng(args.seed, step as u64, 0),
            &days,
            &SEEN,
            64,
        ))?;
        let stats = trainer.step(
            std::slice::from_ref(&b),
            &mut common::step_rng(args.seed, step as u64, 1),
        )?;
        progress.update(step, stats.loss.loss, b.src.tokens() + b.tgt_out.tokens());
    }
    progress.finish();
    Ok(trainer.model)
}
