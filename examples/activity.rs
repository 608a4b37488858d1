//! Activity recognition: an encoder-only Transformer classifies windows of synthetic
//! accelerometer and gyroscope readings as walking, running, climbing stairs, cycling,
//! sitting or lying.
//!
//!     cargo run --release --example activity
//!     cargo run --release --example activity -- --steps 1000 --d-model 48 --threads 1
//!
//! Each window is a `[T, 6]` sequence (acceleration x, y, z in g; angular rate x, y, z in
//! rad/s) sampled at 20 Hz. An activity is a periodic pattern: a base frequency (the step,
//! stride or pedalling rate, drawn per window from a range that may overlap another
//! activity's), harmonics of it, an amplitude and a phase per channel (walking moves forward
//! and up a quarter-cycle apart, climbing stairs moves them together, pedalling turns the
//! gyroscope in a circle), and gravity on the axes of the body's posture. Every window gets a
//! random phase, a random overall amplitude, a tilt, noise, and a random length: batches
//! are padded, and the padding mask is what keeps the padding out of attention and pooling.
//!
//! The model projects the 6 channels to d_model, adds sinusoidal positions, runs the
//! encoder, takes the mean over the real positions and classifies. The data set is split
//! into training and held-out windows; the held-out windows are only used to report the
//! confusion matrix and the accuracy on the last line. The run is deterministic for a seed
//! whatever `--threads`.

mod common;

use std::f64::consts::PI;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vaswani::blocks::BlockConfig;
use vaswani::io::save_trainer;
use vaswani::kernels::Activation;
use vaswani::models::{EncoderOnly, EncoderOnlyConfig, FeatureBatch, Head, InputKind, LabeledBatch, Targets};
use vaswani::ndarray::ArrayView2;
use vaswani::rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, TrainerConfig, cross_entropy};
use vaswani::{Params, Result};

/// Samples per second.
const RATE: f64 = 20.0;
/// Acceleration x, y, z, then angular rate x, y, z.
const CHANNELS: usize = 6;
/// Label smoothing ε (§5.4): the loss cannot go below about 0.42 nats with 6 classes.
const SMOOTHING: f64 = 0.1;
const ACTIVITIES: [&str; 6] = ["walking", "running", "stairs", "cycling", "sitting", "lying"];

/// Train an encoder-only Transformer to recognise activities from sensor windows.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: common::CommonArgs<600>,
    /// Model width d_model.
    #[arg(long, default_value_t = 32)]
    d_model: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Encoder layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Longest window, in samples at 20 Hz; lengths are uniform from half of it to it.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Windows per training step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Windows in the data set, training and held-out together.
    #[arg(long, default_value_t = 5000)]
    windows: usize,
    /// Windows held out from training, for the confusion matrix and the final accuracy.
    #[arg(long, default_value_t = 1000)]
    held_out: usize,
    /// Peak learning rate (linear warm-up over the first tenth of the steps, then cosine decay
    /// to 0).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Dropout rate.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Where to write the loss curves.
    #[arg(long, default_value = "activity_loss.png")]
    plot: PathBuf,
}

/// One periodic component of a channel: `amp · sin(harmonic · (2π·f₀·t + φ) + offset)`,
/// with f₀ the window's base frequency and φ its random phase. Multiplying φ by the harmonic
/// keeps the shape of the wave whatever the phase.
#[derive(Clone, Copy)]
struct Wave {
    channel: usize,
    harmonic: f64,
    amp: f64,
    offset: f64,
}

const fn w(channel: usize, harmonic: f64, amp: f64, offset: f64) -> Wave {
    Wave {
        channel,
        harmonic,
        amp,
        offset,
    }
}

/// An activity: the range of its base frequency (Hz), gravity on each axis (its posture),
/// and its waves. Channels: 0–2 acceleration x (forward), y (left), z (up); 3–5 rotation
/// about x, y, z.
struct Activity {
    freq: (f64, f64),
    gravity: [f64; 3],
    waves: &'static [Wave],
}

const HALF: f64 = PI / 2.0;

const PATTERNS: [Activity; 6] = [
    // Walking: steps at 1.4–2.1 Hz; forward acceleration a quarter-cycle ahead of vertical;
    // sideways sway and body roll at the stride rate (half the step rate).
    Activity {
        freq: (1.4, 2.1),
        gravity: [0.0, 0.0, 1.0],
        waves: &[
            w(2, 1.0, 1.0, 0.0),
            w(2, 2.0, 0.35, 0.6),
            w(0, 1.0, 0.5, HALF),
            w(1, 0.5, 0.3, 0.0),
            w(3, 0.5, 0.9, 0.0),
            w(4, 1.0, 0.3, HALF),
            w(5, 0.5, 0.4, PI / 3.0),
        ],
    },
    // Running: faster steps, hard impacts (strong second and third harmonics).
    Activity {
        freq: (2.2, 3.2),
        gravity: [0.0, 0.0, 1.0],
        waves: &[
            w(2, 1.0, 2.4, 0.0),
            w(2, 2.0, 1.0, 0.3),
            w(2, 3.0, 0.4, 0.0),
            w(0, 1.0, 1.2, HALF),
            w(1, 0.5, 0.6, 0.0),
            w(3, 0.5, 2.0, 0.0),
            w(4, 1.0, 0.8, HALF),
            w(5, 0.5, 0.7, PI / 3.0),
        ],
    },
    // Climbing stairs: slower steps overlapping walking's range, leaning forward, forward and
    // vertical acceleration in phase, a strong second harmonic in opposition, more pitch.
    Activity {
        freq: (1.3, 1.9),
        gravity: [0.2, 0.0, 0.98],
        waves: &[
            w(2, 1.0, 0.8, 0.0),
            w(2, 2.0, 0.6, PI),
            w(0, 1.0, 0.6, 0.0),
            w(1, 0.5, 0.25, 0.0),
            w(3, 0.5, 0.7, HALF),
            w(4, 1.0, 0.6, 0.0),
            w(5, 0.5, 0.3, 0.0),
        ],
    },
    // Cycling: pedalling at 0.9–1.5 Hz turns the thigh-mounted gyroscope in a circle (x and
    // y a quarter-cycle apart); little acceleration; seated, leaning forward.
    Activity {
        freq: (0.9, 1.5),
        gravity: [0.5, 0.0, 0.85],
        waves: &[
            w(0, 1.0, 0.25, 0.0),
            w(2, 2.0, 0.15, 0.0),
            w(1, 1.0, 0.1, HALF),
            w(3, 1.0, 1.5, 0.0),
            w(4, 1.0, 1.5, HALF),
            w(5, 1.0, 0.2, 0.0),
        ],
    },
    // Sitting: upright and still but for breathing (0.2–0.35 Hz).
    Activity {
        freq: (0.2, 0.35),
        gravity: [0.2, 0.0, 0.98],
        waves: &[w(0, 1.0, 0.03, 0.0)],
    },
    // Lying on the side: gravity along y, breathing.
    Activity {
        freq: (0.2, 0.35),
        gravity: [0.1, 0.98, 0.1],
        waves: &[w(2, 1.0, 0.04, 0.0)],
    },
];

/// A window of `len` samples of activity `class`, `[len, CHANNELS]` row-major.
fn window(class: usize, len: usize, rng: &mut impl Rng) -> Vec<f32> {
    let a = &PATTERNS[class];
    let f0 = rng.random_range(a.freq.0..a.freq.1);
    let phase = rng.random_range(0.0..2.0 * PI);
    let scale = rng.random_range(0.5..1.5);
    // How the sensor sits on the body changes from window to window.
    let tilt: [f64; 3] = std::array::from_fn(|_| rng.random_range(-0.25..0.25));
    let mut x = vec![0.0f32; len * CHANNELS];
    for t in 0..len {
        let angle = 2.0 * PI * f0 * t as f64 / RATE + phase;
        let mut row = [0.0f64; CHANNELS];
        for (c, v) in row.iter_mut().take(3).enumerate() {
            *v = a.gravity[c] + tilt[c];
        }
        for wave in a.waves {
            row[wave.channel] += scale * wave.amp * (wave.harmonic * angle + wave.offset).sin();
        }
        for (c, v) in row.iter().enumerate() {
            x[t * CHANNELS + c] = (v + rng.random_range(-0.5..0.5)) as f32;
        }
    }
    x
}

/// A labelled window.
struct Example {
    class: usize,
    x: Vec<f32>,
}

impl Example {
    fn len(&self) -> usize {
        self.x.len() / CHANNELS
    }
}

/// The examples as one padded batch (`FeatureBatch::from_sequences` pads with zeros; what the
/// padding holds is never read).
fn batch(examples: &[&Example]) -> Result<LabeledBatch> {
    let windows = examples
        .iter()
        .map(|e| ArrayView2::from_shape((e.len(), CHANNELS), &e.x[..e.len() * CHANNELS]))
        .collect::<std::result::Result<Vec<_>, _>>()
        .expect("whole rows of CHANNELS readings");
    let labels = examples.iter().map(|e| e.class).collect();
    Ok(LabeledBatch::new(
        FeatureBatch::from_sequences(windows)?,
        Targets::Classes(labels),
    ))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.window < 2 || args.batch == 0 || args.held_out == 0 || args.held_out >= args.windows {
        eprintln!("error: need --window ≥ 2, --batch ≥ 1 and 1 ≤ --held-out < --windows");
        std::process::exit(2);
    }
    common::init_threads(args.common.threads);
    common::run_on_pool(|| args.common.in_precision(|| run(&args)))
}

fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    // Every random draw is fixed by --seed: the initialisation and the data set here, and
    // each step's windows and dropout by (seed, step), so that --resume continues exactly.
    let seed = args.common.seed;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data_rng = StdRng::seed_from_u64(seed.wrapping_add(1));

    let examples: Vec<Example> = (0..args.windows)
        .map(|_| {
            let class = data_rng.random_range(0..ACTIVITIES.len());
            let len = data_rng.random_range(args.window.div_ceil(2)..=args.window);
            Example {
                class,
                x: window(class, len, &mut data_rng),
            }
        })
        .collect();
    let (held_out, train) = examples.split_at(args.held_out);
    println!(
        "activity: {} windows of 6 channels at {RATE} Hz, {}–{} samples ({} training, {} held out), {} classes",
        args.windows,
        args.window.div_ceil(2),
        args.window,
        train.len(),
        held_out.len(),
        ACTIVITIES.len()
    );

    let block = BlockConfig::new(args.d_model, args.heads, 2 * args.d_model)
        .with_p_drop(args.dropout)
        .with_activation(Activation::Gelu);
    let cfg = EncoderOnlyConfig::new(
        InputKind::Features { d_in: CHANNELS },
        block,
        args.layers,
        Head::Classify {
            classes: ACTIVITIES.len(),
        },
    );
    let model: EncoderOnly = cfg.init(&mut rng)?;
    println!(
        "model: d_model {}, {} heads, {} layers, mean pooling, {} parameters",
        args.d_model,
        args.heads,
        args.layers,
        model.num_params()
    );
    let steps = args.common.steps as u64;
    let fresh = TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Cosine {
            peak: args.lr,
            warmup: (steps / 10).max(1),
            total: steps,
            min: 0.0,
        },
        clip_norm: Some(1.0),
        label_smoothing: SMOOTHING,
        precision: args.common.precision,
    };
    let mut trainer = args.common.trainer(model, fresh)?;

    // A fixed slice of the held-out windows for the curve.
    let curve_batch = batch(&held_out.iter().take(250).collect::<Vec<_>>())?;
    let mut train_curve = Vec::new();
    let mut held_curve = Vec::new();
    let mut progress = common::Progress::new(args.common.steps, "activity").with_unit("windows");
    for step in trainer.steps() as usize..args.common.steps {
        // A batch of distinct training windows drawn at random for this step.
        let mut pick_rng = common::step_rng(seed, step as u64, 0);
        let picked: Vec<&Example> =
            vaswani::rand::seq::index::sample(&mut pick_rng, train.len(), args.batch.min(train.len()))
                .into_iter()
                .map(|i| &train[i])
                .collect();
        let stats = trainer.step(&[batch(&picked)?], &mut common::step_rng(seed, step as u64, 1))?;
        progress.update(step, stats.loss.loss, picked.len());
        train_curve.push((step as f64 + 1.0, stats.loss.loss));
        if let Some(path) = args.common.save_due(step) {
            save_trainer(path, &trainer)?;
        }
        if (step + 1) % 50 == 0 || step + 1 == args.common.steps {
            held_curve.push((step as f64 + 1.0, loss(&trainer.model, &curve_batch, SMOOTHING)?));
        }
    }
    progress.finish();
    let final_loss = train_curve.last().map_or(f64::NAN, |&(_, l)| l);
    println!("final training loss {final_loss:.9} (the same for any --threads)");
    common::plot_curves(
        &args.plot,
        "Activity recognition",
        "cross-entropy, label smoothing 0.1 (nats/window)",
        &[("train", train_curve), ("held-out", held_curve)],
        true,
    )
    .map_err(|e| vaswani::Error::InvalidInput {
        why: format!("plotting {}: {e}", args.plot.display()),
    })?;
    println!("loss curves written to {}", args.plot.display());

    // The held-out windows, a few hundred at a time.
    let mut confusion = vec![[0usize; ACTIVITIES.len()]; ACTIVITIES.len()];
    for chunk in held_out.chunks(250) {
        let b = batch(&chunk.iter().collect::<Vec<_>>())?;
        for (e, p) in chunk.iter().zip(trainer.model.predict(&b.input)?) {
            confusion[e.class][p] += 1;
        }
    }
    println!("done in {}", common::fmt_duration(start.elapsed()));
    println!("\nheld-out confusion matrix (rows: true activity, columns: predicted):");
    print!("{:>10}", "");
    for name in ACTIVITIES {
        print!("{name:>9}");
    }
    println!();
    for (name, row) in ACTIVITIES.iter().zip(&confusion) {
        print!("{name:>10}");
        for &n in row {
            print!("{n:>9}");
        }
        println!();
    }
    let correct: usize = (0..ACTIVITIES.len()).map(|i| confusion[i][i]).sum();
    println!(
        "held-out accuracy: {:.1}% ({} windows)",
        100.0 * correct as f64 / held_out.len() as f64,
        held_out.len()
    );
    Ok(())
}

/// The mean cross-entropy of the model on a batch, with label smoothing as in training,
/// without dropout.
fn loss(model: &EncoderOnly, batch: &LabeledBatch, smoothing: f64) -> Result<f64> {
    let logits = model.infer(&batch.input)?;
    let Targets::Classes(labels) = &batch.targets else {
        unreachable!("the batches here are labelled with classes")
    };
    Ok(cross_entropy(logits.view(), labels, None, smoothing)?.loss)
}
