//! Shared pieces of the training examples: the common flags, the one rayon pool, a progress
//! bar, and plots (loss curves, heat maps) as PNG or, for a path ending in `.svg`, as SVG
//! that renders inline in the crate's documentation. An example includes it with `mod common;`.
//!
//! ```ignore
//! mod common;
//! use clap::Parser;
//!
//! /// Learn to copy a sequence.
//! #[derive(Parser, Debug)]
//! struct Args {
//!     #[command(flatten)]
//!     common: common::CommonArgs<2000>, // 2000 is this example's default for --steps
//!     /// Model width.
//!     #[arg(long, default_value_t = 64)]
//!     d_model: usize,
//! }
//!
//! let args = Args::parse();
//! common::init_threads(args.common.threads);
//! let mut progress = common::Progress::new(args.common.steps, "copy_task");
//! for step in 0..args.common.steps {
//!     let (loss, tokens) = train_step(/* … */);
//!     progress.update(step, loss, tokens);
//! }
//! progress.finish();
//! common::plot_curves(Path::new("copy_task_loss.png"), "copy task", "loss", &[("train", curve)], true)?;
//! ```

// Each example uses only some of these helpers; the rest would be dead code in that example.
#![allow(dead_code)]

pub mod dates_data;

use std::collections::VecDeque;
use std::error::Error;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// The flags every training example takes, to `#[command(flatten)]` into its own
/// `clap::Parser` struct. `STEPS` is the example's default for `--steps`, so that `--help`
/// shows it. `--save` and `--resume` are here so that every example spells them alike; an
/// example that does not implement them yet must refuse them, not ignore them.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs<const STEPS: usize> {
    /// Number of training steps (optimizer updates).
    #[arg(long, value_name = "N", default_value_t = STEPS)]
    pub steps: usize,
    /// Threads in the rayon pool. Results are the same for any number of threads.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = at_least_one)]
    pub threads: usize,
    /// Seed of every random choice: initialisation, data, dropout.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint to FILE at the end of training.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
    /// Start from the checkpoint in FILE instead of a fresh initialisation.
    #[arg(long, value_name = "FILE")]
    pub resume: Option<PathBuf>,
    /// With --save, also write the checkpoint every N steps, so that a run that is stopped
    /// resumes from the last one with --resume exactly as if it had not stopped.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub save_every: Option<usize>,
    /// Precision of the matrix products: fp32, or bf16 mixed precision (bf16 operands, f32
    /// accumulation; AMX or AVX512-BF16 where the CPU has them, printed at the start).
    #[arg(long, value_name = "P", default_value = "fp32")]
    pub precision: vaswani::Precision,
}

impl<const STEPS: usize> CommonArgs<STEPS> {
    /// Runs `f` with the matrix products in `--precision` (training steps take it from the
    /// trainer's config, which [`CommonArgs::trainer`] sets; evaluation from here), after
    /// saying which kernel runs bf16.
    pub fn in_precision<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.precision == vaswani::Precision::Bf16 {
            println!(
                "precision: bf16 mixed precision, products on the {:?} path",
                vaswani::kernels::precision::bf16_path()
            );
        }
        vaswani::kernels::precision::with_precision(self.precision, f)
    }

    /// The trainer to start from: the one saved in `--resume` if given, which must hold a
    /// model of `model`'s config, else a fresh one over `model` with `cfg`.
    pub fn trainer<M>(
        &self,
        model: M,
        cfg: vaswani::train::TrainerConfig,
    ) -> vaswani::Result<vaswani::train::Trainer<M>>
    where
        M: vaswani::io::Checkpointable + vaswani::train::Trainable<Float = f32>,
    {
        let Some(path) = &self.resume else {
            return vaswani::train::Trainer::new(model, cfg);
        };
        let mut trainer: vaswani::train::Trainer<M> = vaswani::io::load_trainer(path)?;
        if trainer.cfg.precision != cfg.precision {
            println!(
                "{} was trained in {}; continuing in {} as --precision asks",
                path.display(),
                trainer.cfg.precision,
                cfg.precision
            );
            trainer.cfg.precision = cfg.precision;
        }
        if trainer.model.config() != model.config() {
            return Err(vaswani::Error::InvalidInput {
                why: format!(
                    "{} holds a model of another config than these flags ask for",
                    path.display()
                ),
            });
        }
        println!("resumed from {} at step {}", path.display(), trainer.steps());
        Ok(trainer)
    }

    /// Whether the checkpoint is due after `step` (0-based) of `--steps`: every `--save-every`
    /// steps and at the end, when `--save` is given.
    pub fn save_due(&self, step: usize) -> Option<&Path> {
        let path = self.save.as_deref()?;
        let periodic = self.save_every.is_some_and(|n| (step + 1).is_multiple_of(n));
        (periodic || step + 1 == self.steps).then_some(path)
    }

    /// Exits with status 2 if `--save` or `--resume` was given, for an example that cannot
    /// honour them yet.
    pub fn refuse_checkpoint_flags(&self, example: &str) {
        if self.save.is_some() || self.resume.is_some() {
            eprintln!("error: {example} does not support --save or --resume yet");
            std::process::exit(2);
        }
    }
}

/// The random stream `stream` of training step `step`: a pure function of (seed, step,
/// stream), so that a run resumed from a checkpoint at step k draws exactly what an
/// uninterrupted run draws from step k on.
pub fn step_rng(seed: u64, step: u64, stream: u64) -> vaswani::rand::rngs::StdRng {
    use vaswani::rand::SeedableRng;
    // SplitMix64 finaliser over the three words: well-spread seeds for neighbouring steps.
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    vaswani::rand::rngs::StdRng::seed_from_u64(z ^ (z >> 31))
}

/// Parses a count that must be at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `run` on the rayon pool (so that every kernel's parallel loops start from a worker
/// thread) and turns its error into a message on stderr and exit status 1.
pub fn run_on_pool<E: std::fmt::Display + Send>(
    run: impl FnOnce() -> Result<(), E> + Send,
) -> std::process::ExitCode {
    match rayon::scope(|_| run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Builds rayon's global pool with `n` threads: the one pool that every parallel kernel of
/// the crate runs on. Call it once, first thing in `main`.
///
/// Exits with status 2 (as clap does for a bad flag) if `n` is 0, which rayon would
/// otherwise read as "one thread per core".
pub fn init_threads(n: usize) {
    if n == 0 {
        eprintln!("error: --threads must be at least 1");
        std::process::exit(2);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .unwrap_or_else(|e| panic!("init_threads({n}): the rayon global pool was already built: {e}"));
}

/// A progress bar on stderr for a training loop: step/total, the mean loss over the last
/// [`Progress::LOSS_WINDOW`] steps, tokens per second of wall time since [`Progress::new`],
/// and the estimated time left.
///
/// When stderr is not a terminal (a log file, CI) indicatif draws nothing; `Progress` then
/// prints one plain line every 10% of the steps instead.
pub struct Progress {
    bar: ProgressBar,
    label: String,
    /// What `update` counts: "tokens" unless [`Progress::with_unit`] says otherwise.
    unit: &'static str,
    total: usize,
    start: Instant,
    /// Steps and tokens seen since `new` (not since step 0: a resumed run starts midway).
    steps_done: usize,
    tokens_done: usize,
    recent_losses: VecDeque<f64>,
    /// Without a terminal: the next tenth of `total` at which to print a line.
    next_tenth: usize,
}

impl Progress {
    /// Number of recent steps whose losses are averaged in the display.
    pub const LOSS_WINDOW: usize = 50;

    /// A bar for a run of `total_steps` steps, named `label`.
    pub fn new(total_steps: usize, label: &str) -> Self {
        let bar = ProgressBar::new(total_steps as u64);
        let style = ProgressStyle::with_template("{prefix} [{wide_bar:.cyan/blue}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        Progress {
            bar,
            label: label.to_string(),
            unit: "tokens",
            total: total_steps,
            start: Instant::now(),
            steps_done: 0,
            tokens_done: 0,
            recent_losses: VecDeque::with_capacity(Self::LOSS_WINDOW),
            next_tenth: 1,
        }
    }

    /// The same bar counting `unit` (e.g. "windows") instead of tokens.
    pub fn with_unit(mut self, unit: &'static str) -> Self {
        self.unit = unit;
        self
    }

    /// Records the step of 0-based index `step` that just finished, with its `loss` and the
    /// number of tokens it processed.
    pub fn update(&mut self, step: usize, loss: f64, tokens: usize) {
        self.steps_done += 1;
        self.tokens_done += tokens;
        if self.recent_losses.len() == Self::LOSS_WINDOW {
            self.recent_losses.pop_front();
        }
        self.recent_losses.push_back(loss);

        let pos = (step + 1).min(self.total);
        let status = self.status(pos);
        self.bar.set_position(pos as u64);
        if self.bar.is_hidden() {
            if pos * 10 >= self.next_tenth * self.total {
                eprintln!("{} {pos}/{} {status}", self.label, self.total);
                self.next_tenth = pos * 10 / self.total.max(1) + 1;
            }
        } else {
            self.bar.set_message(status);
        }
    }

    /// Mean loss over the last [`Progress::LOSS_WINDOW`] steps (NaN before the first).
    pub fn mean_loss(&self) -> f64 {
        self.recent_losses.iter().sum::<f64>() / self.recent_losses.len() as f64
    }

    /// Tokens per second of wall time since [`Progress::new`].
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens_done as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Leaves the bar at its final state and prints the time taken.
    pub fn finish(&self) {
        self.bar.finish();
        eprintln!(
            "{}: {} steps in {}, {} {}/s",
            self.label,
            self.steps_done,
            fmt_duration(self.start.elapsed()),
            fmt_si(self.tokens_per_sec()),
            self.unit
        );
    }

    /// "loss 1.234 · 12.3k tokens/s · 1m 05s left", at position `pos` of `total`.
    fn status(&self, pos: usize) -> String {
        let per_step = self.start.elapsed().as_secs_f64() / self.steps_done.max(1) as f64;
        let left = Duration::from_secs_f64(per_step * self.total.saturating_sub(pos) as f64);
        format!(
            "loss {:.4} · {} {}/s · {} left",
            self.mean_loss(),
            fmt_si(self.tokens_per_sec()),
            self.unit,
            fmt_duration(left)
        )
    }
}

/// A duration the way a person reads it: `850ms`, `12.3s`, `4m 05s`, `2h 07m`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", d.as_millis())
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{}h {:02}m", d.as_secs() / 3600, d.as_secs() / 60 % 60)
    }
}

/// A count or rate with an SI suffix and 3 significant digits: `950`, `12.3k`, `4.56M`.
pub fn fmt_si(x: f64) -> String {
    let (v, suffix) = match x.abs() {
        a if a >= 1e9 => (x / 1e9, "G"),
        a if a >= 1e6 => (x / 1e6, "M"),
        a if a >= 1e3 => (x / 1e3, "k"),
        _ => (x, ""),
    };
    let decimals = match v.abs() {
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        _ => 2,
    };
    let decimals = if suffix.is_empty() && v.fract() == 0.0 {
        0
    } else {
        decimals
    };
    format!("{v:.decimals$}{suffix}")
}

/// Draws line `series` of (x, y) points, each with its legend name, to a 900×560 picture at
/// `path`, with a `title`, "step" under the x axis and `y_label` beside the y axis; with
/// `log_y` the y axis is logarithmic (points with y ≤ 0 are then left out). Points that are
/// not finite are left out. A `path` ending in `.svg` gets an SVG (see [`write_svg`]), any
/// other a PNG.
///
/// ```ignore
/// let train: Vec<(f64, f64)> = losses.iter().enumerate().map(|(i, &l)| (i as f64, l)).collect();
/// common::plot_curves(Path::new("loss.png"), "copy task", "loss (nats/token)",
///                     &[("train", train)], true)?;
/// ```
pub fn plot_curves(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
) -> Result<(), Box<dyn Error>> {
    plot_lines(path, title, "step", y_label, series, log_y)
}

/// [`plot_curves`] with `x_label` under the x axis instead of "step".
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
) -> Result<(), Box<dyn Error>> {
    register_font();
    let keep = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0);
    let series: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, points)| (*name, points.iter().copied().filter(keep).collect()))
        .collect();
    let all = || series.iter().flat_map(|(_, points)| points.iter());
    if all().next().is_none() {
        return Err(format!("plot_curves({}): no point to draw", path.display()).into());
    }
    let (x0, x1) = min_max(all().map(|p| p.0));
    let (y0, y1) = min_max(all().map(|p| p.1));
    let x = pad(x0, x1, 0.0);
    let labels = (title, x_label, y_label);
    if log_y {
        // A fifth of a decade of room above and below.
        let y = pad(y0.log10(), y1.log10(), 0.2);
        let y = 10f64.powf(y.start)..10f64.powf(y.end);
        // plotters' own log ticks can label 1 twice (0.1·(1 + 0.1·90) ≠ 1 in floating point).
        let ticks = log_ticks(y.start, y.end);
        draw_chart(path, labels, &series, x, y.log_scale().with_key_points(ticks))
    } else {
        let margin = 0.05 * (y1 - y0);
        draw_chart(path, labels, &series, x, pad(y0, y1, margin))
    }
}

/// The size of a line plot, in pixels.
const CHART_SIZE: (u32, u32) = (900, 560);

/// The body of [`plot_curves`], for a linear or a logarithmic y axis: to an SVG or a PNG.
fn draw_chart<Y>(
    path: &Path,
    labels: (&str, &str, &str),
    series: &[(&str, Vec<(f64, f64)>)],
    x: Range<f64>,
    y: Y,
) -> Result<(), Box<dyn Error>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    if is_svg(path) {
        let mut svg = String::new();
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        chart_on(root, labels, series, x, y)?;
        write_svg(path, labels.0, &svg, "")
    } else {
        chart_on(
            BitMapBackend::new(path, CHART_SIZE).into_drawing_area(),
            labels,
            series,
            x,
            y,
        )
    }
}

/// [`draw_chart`] on one backend.
fn chart_on<DB, Y>(
    root: DrawingArea<DB, Shift>,
    (title, x_label, y_label): (&str, &str, &str),
    series: &[(&str, Vec<(f64, f64)>)],
    x: Range<f64>,
    y: Y,
) -> Result<(), Box<dyn Error>>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    // Ten colours that stay apart on white (matplotlib's "tab10").
    const COLOURS: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| fmt_tick(*v))
        .y_label_formatter(&|v| fmt_tick(*v))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 17))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(210, 210, 210))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        // A line through a single point is invisible: mark it with a dot.
        let dot = if points.len() == 1 { 4 } else { 0 };
        chart
            .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)).point_size(dot))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Draws `values` `[rows, columns]` as a heat map to a picture at `path`: row 0 at the top,
/// one square cell per value, coloured from dark blue (the smallest value) through green to
/// yellow (the largest), a colour bar beside it, `row_labels` and `col_labels` on the axes
/// (an empty label leaves its tick out) and `x_label` / `y_label` under and beside them.
/// A `path` ending in `.svg` gets an SVG, any other a PNG. The SVG, to stay small, draws the
/// cells as vertical runs of one colour, with the colours rounded to [`SVG_LEVELS`] steps.
///
/// ```ignore
/// common::heat_map(Path::new("map.png"), "cross-attention", weights.view(),
///                  &out_tokens, &in_tokens, ("input", "output"))?;
/// ```
pub fn heat_map(
    path: &Path,
    title: &str,
    values: vaswani::ndarray::ArrayView2<f32>,
    row_labels: &[String],
    col_labels: &[String],
    axes: (&str, &str),
) -> Result<(), Box<dyn Error>> {
    register_font();
    let (rows, cols) = values.dim();
    if rows == 0 || cols == 0 || row_labels.len() != rows || col_labels.len() != cols {
        return Err(format!(
            "heat_map({}): {rows} × {cols} values with {} row and {} column labels",
            path.display(),
            row_labels.len(),
            col_labels.len()
        )
        .into());
    }
    let cell = (640 / rows.max(cols)).clamp(4, 36) as u32;
    let size = (cell * cols as u32 + 230, cell * rows as u32 + 150);
    let map = HeatMap {
        title,
        values,
        row_labels,
        col_labels,
        axes,
    };
    if is_svg(path) {
        let mut svg = String::new();
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let corners = heat_map_on(root, &map, false)?;
        let cells = svg_cells(&map, corners);
        write_svg(path, title, &svg, &cells)
    } else {
        heat_map_on(BitMapBackend::new(path, size).into_drawing_area(), &map, true)?;
        Ok(())
    }
}

/// What [`heat_map`] draws.
struct HeatMap<'a> {
    title: &'a str,
    values: vaswani::ndarray::ArrayView2<'a, f32>,
    row_labels: &'a [String],
    col_labels: &'a [String],
    axes: (&'a str, &'a str),
}

impl HeatMap<'_> {
    /// The smallest value and the width of the range of values (1 if they are all equal).
    fn range(&self) -> (f64, f64) {
        let (lo, hi) = min_max(self.values.iter().map(|&v| v as f64).filter(|v| v.is_finite()));
        (lo, if hi > lo { hi - lo } else { 1.0 })
    }
}

/// The pixel corners of an area, top left and bottom right.
type Corners = ((i32, i32), (i32, i32));

/// [`heat_map`] on one backend, with the cells if `cells`, else without them; returns the
/// corners of the cells' area.
fn heat_map_on<DB>(
    root: DrawingArea<DB, Shift>,
    map: &HeatMap,
    cells: bool,
) -> Result<Corners, Box<dyn Error>>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let (rows, cols) = map.values.dim();
    let (lo, span) = map.range();
    let w = root.dim_in_pixel().0;
    root.fill(&WHITE)?;
    let (plot, bar) = root.split_horizontally(w - 90);
    let mut chart = ChartBuilder::on(&plot)
        .caption(map.title, (FONT, 20))
        .margin(10)
        .x_label_area_size(56)
        .y_label_area_size(70)
        // A segmented range a..b has a segment for each of a..=b.
        .build_cartesian_2d((0..cols - 1).into_segmented(), (0..rows - 1).into_segmented())?;
    // A tick at the centre of each labelled cell; row 0 at the top.
    let label = |labels: &[String], v: &SegmentValue<usize>, flip: bool| match *v {
        SegmentValue::CenterOf(i) => {
            let i = if flip { rows.wrapping_sub(i + 1) } else { i };
            labels.get(i).cloned().unwrap_or_default()
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(cols)
        .y_labels(rows)
        .x_label_formatter(&|v| label(map.col_labels, v, false))
        .y_label_formatter(&|v| label(map.row_labels, v, true))
        .x_desc(map.axes.0)
        .y_desc(map.axes.1)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 15))
        .draw()?;
    if cells {
        chart.draw_series(map.values.indexed_iter().map(|((i, j), &v)| {
            let t = ((v as f64 - lo) / span).clamp(0.0, 1.0);
            let y = rows - 1 - i;
            Rectangle::new(
                [
                    (SegmentValue::Exact(j), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(j + 1), SegmentValue::Exact(y + 1)),
                ],
                colour_map(t).filled(),
            )
        }))?;
    }
    let corners = (
        chart.backend_coord(&(SegmentValue::Exact(0), SegmentValue::Exact(rows))),
        chart.backend_coord(&(SegmentValue::Exact(cols), SegmentValue::Exact(0))),
    );
    // The colour bar, smallest value at the bottom.
    let mut bar = ChartBuilder::on(&bar)
        .margin_top(40)
        .margin_bottom(66)
        .margin_right(8)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..1.0, lo..lo + span)?;
    bar.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(5)
        .y_label_formatter(&|v| fmt_tick(*v))
        .label_style((FONT, 12))
        .draw()?;
    let steps = if cells { 100 } else { SVG_LEVELS };
    bar.draw_series((0..steps).map(|k| {
        let (a, b) = (k as f64 / steps as f64, (k + 1) as f64 / steps as f64);
        let t = if cells { a } else { k as f64 / (steps - 1) as f64 };
        Rectangle::new(
            [(0.0, lo + a * span), (1.0, lo + b * span)],
            colour_map(t).filled(),
        )
    }))?;
    root.present()?;
    Ok(corners)
}

/// The colours of an SVG heat map: values are rounded to this many evenly spaced steps.
pub const SVG_LEVELS: usize = 32;

/// The cells of `map` as SVG, in the pixel rectangle `corners`: one path per colour, each
/// cell a stroke one cell wide down the middle of its column, each vertical run of equal
/// colours one stroke, in a group scaled so that a cell is 1 × 1.
fn svg_cells(map: &HeatMap, ((x0, y0), (x1, y1)): Corners) -> String {
    use std::fmt::Write;
    let (rows, cols) = map.values.dim();
    let (lo, span) = map.range();
    let level = |v: f32| {
        let t = ((v as f64 - lo) / span).clamp(0.0, 1.0);
        (t * (SVG_LEVELS - 1) as f64).round() as usize
    };
    // The strokes of each level: "M{column}.5 {first row}v{rows}".
    let mut strokes = vec![String::new(); SVG_LEVELS];
    for (j, column) in map.values.columns().into_iter().enumerate() {
        let mut i = 0;
        while i < rows {
            let k = level(column[i]);
            let run = (i..rows).take_while(|&r| level(column[r]) == k).count();
            write!(strokes[k], "M{j}.5 {i}v{run}").unwrap();
            i += run;
        }
    }
    let (sx, sy) = ((x1 - x0) as f64 / cols as f64, (y1 - y0) as f64 / rows as f64);
    let mut out = format!(
        "<g transform=\"translate({x0} {y0}) scale({sx} {sy})\" fill=\"none\" stroke-width=\"1\" shape-rendering=\"crispEdges\">\n"
    );
    for (k, d) in strokes.iter().enumerate().filter(|(_, d)| !d.is_empty()) {
        let RGBColor(r, g, b) = colour_map(k as f64 / (SVG_LEVELS - 1) as f64);
        writeln!(out, "<path stroke=\"#{r:02X}{g:02X}{b:02X}\" d=\"{d}\"/>").unwrap();
    }
    out + "</g>\n"
}

/// Whether `path` names an SVG file, by its extension.
fn is_svg(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"))
}

/// Writes the SVG that plotters drew, with `extra` drawn last and `title` as its title, in a
/// form that renders inline in rustdoc's HTML and on docs.rs (the guide embeds these files,
/// `docs/guide/img/`): no blank line (a blank line would end the Markdown HTML block), no
/// `style` attribute and no `data:` URI (docs.rs's Content-Security-Policy blocks both). To
/// keep the file small, labels with no text and attributes that only repeat SVG's defaults
/// are left out, and font sizes are rounded to 0.1 pixel.
pub fn write_svg(path: &Path, title: &str, svg: &str, extra: &str) -> Result<(), Box<dyn Error>> {
    const DEFAULTS: [&str; 4] = [
        " opacity=\"1\"",
        " stroke=\"none\"",
        " stroke-width=\"1\"",
        " fill=\"#000000\"",
    ];
    let escape = |text: &str| {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut out = String::with_capacity(svg.len() + extra.len());
    let mut lines = svg.lines().filter(|l| !l.trim().is_empty()).peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("<text ") && lines.peek() == Some(&"</text>") {
            lines.next(); // a label with no text
            continue;
        }
        if line == "</svg>" {
            out += extra;
        }
        let mut line = line.to_string();
        for default in DEFAULTS {
            line = line.replace(default, "");
        }
        if let Some(at) = line.find(" font-size=\"") {
            let from = at + " font-size=\"".len();
            let to = from + line[from..].find('"').unwrap_or(0);
            if let Ok(size) = line[from..to].parse::<f64>() {
                line.replace_range(from..to, &format!("{}", (size * 10.0).round() / 10.0));
            }
        }
        out += &line;
        out.push('\n');
        if line.starts_with("<svg ") {
            out += &format!("<title>{}</title>\n", escape(title));
        }
    }
    if out.contains("style=") || out.contains("data:") || !out.trim_end().ends_with("</svg>") {
        return Err(format!(
            "write_svg({}): the SVG would not render on docs.rs",
            path.display()
        )
        .into());
    }
    std::fs::write(path, out).map_err(|e| format!("writing {}: {e}", path.display()).into())
}

/// A perceptually ordered colour for `t` in [0, 1]: viridis, from dark blue to yellow.
fn colour_map(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: f64, q: f64| (p + f * (q - p)).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// `n` random sequences of `symbols` symbols (ids from 3, after PAD = 0, BOS = 1, EOS = 2),
/// `min_len` to `max_len` long, and their reversals, padded into a batch: a task a model can
/// only solve by attending to the right source position.
pub fn reversal_batch(
    rng: &mut vaswani::rand::rngs::StdRng,
    symbols: usize,
    (min_len, max_len): (usize, usize),
    n: usize,
) -> vaswani::Result<vaswani::models::Seq2SeqBatch> {
    use vaswani::rand::Rng;
    let pairs: Vec<(Vec<usize>, Vec<usize>)> = (0..n)
        .map(|_| {
            let len = rng.random_range(min_len..=max_len);
            let src: Vec<usize> = (0..len).map(|_| 3 + rng.random_range(0..symbols)).collect();
            let tgt = src.iter().rev().copied().collect();
            (src, tgt)
        })
        .collect();
    vaswani::models::Seq2SeqBatch::from_pairs(&pairs, 1, 2, 0)
}

/// The fraction of `batch`'s targets that greedy decoding (BOS = 1, EOS = 2) gives exactly.
pub fn exact_match(
    model: &vaswani::models::EncoderDecoder,
    batch: &vaswani::models::Seq2SeqBatch,
    max_len: usize,
) -> vaswani::Result<f64> {
    let state = model.begin_decode(&batch.src, max_len)?;
    let out = vaswani::infer::greedy(state, 1, Some(2), max_len)?;
    let right = (0..out.len())
        .filter(|&i| {
            let len = batch.tgt_out.lengths()[i] - 1; // without EOS
            out[i].iter().eq(batch.tgt_out.ids().row(i).iter().take(len))
        })
        .count();
    Ok(right as f64 / out.len().max(1) as f64)
}

/// The font family that plots use; [`register_font`] gives it DejaVu Sans.
const FONT: &str = "sans-serif";

/// Registers DejaVu Sans (from the `dejavu` crate, so no system font is needed) as
/// [`FONT`] with plotters' ab_glyph renderer, once per process.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use plotters::style::{FontStyle, register_font};
        for (style, bytes) in [
            (FontStyle::Normal, dejavu::sans::regular()),
            (FontStyle::Bold, dejavu::sans::bold()),
        ] {
            register_font(FONT, style, bytes)
                .unwrap_or_else(|_| panic!("the DejaVu Sans font shipped by the dejavu crate is invalid"));
        }
    });
}

/// Smallest and largest of some finite values.
fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// `lo - margin .. hi + margin`, widened to a non-empty range when `lo == hi`.
fn pad(lo: f64, hi: f64, margin: f64) -> Range<f64> {
    if hi - lo + 2.0 * margin > 0.0 {
        lo - margin..hi + margin
    } else {
        let half = 0.5 * lo.abs().max(1.0);
        lo - half..hi + half
    }
}

/// Ticks for a log axis from `lo` to `hi` (both > 0): 1, 2, …, 9 times the powers of ten on
/// a short axis, 1, 2 and 5 times them on a middling one, the powers of ten alone on a long one.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().floor() as i32);
    let mantissas: &[f64] = match last - first {
        ..=1 => &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        2..=3 => &[1.0, 2.0, 5.0],
        _ => &[1.0],
    };
    (first..=last)
        .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
        .filter(|v| (lo..=hi).contains(v))
        .collect()
}

/// An axis tick: at most 3 significant digits, no trailing zeros, `1.5e-4` for tiny values.
fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    // A tick at zero computed as a sum of steps can land a rounding error away from it.
    if a < 1e-12 {
        return "0".to_string();
    }
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.truncate(s.trim_end_matches('0').trim_end_matches('.').len());
    }
    s
}
