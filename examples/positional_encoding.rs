//! The sinusoidal positional encoding of §3.5, drawn and checked:
//!
//!     cargo run --release --example positional_encoding
//!     cargo run --release --example positional_encoding -- --positions 200 --d-model 128 --out pe
//!     cargo run --release --example positional_encoding -- --svg --out docs/guide/img/positional_encoding
//!
//! Writes two pictures: `<out>_table.png`, the table PE `[position, dimension]` as a heat
//! map (fast sines in the first dimensions, slow ones in the last), and `<out>_curves.png`, a
//! few of its dimensions over position. With `--svg` they are SVG files instead; the last
//! command above writes the two that the guide shows (`vaswani::guide::positional_encoding`). Then prints the check behind the paper's reason for
//! choosing it: "for any fixed offset k, PE(pos + k) can be represented as a linear function
//! of PE(pos)". Each pair of dimensions (2i, 2i + 1) is a point on a circle turning at the
//! rate ω_i = 1 / 10000^(2i / d_model); moving k positions turns it by k·ω_i, the same
//! rotation at every position:
//!
//! ```text
//! [PE(pos+k, 2i)  ]   [ cos kω_i   sin kω_i ] [PE(pos, 2i)  ]
//! [PE(pos+k, 2i+1)] = [-sin kω_i   cos kω_i ] [PE(pos, 2i+1)]
//! ```

mod common;

use std::path::PathBuf;

use clap::Parser;
use vaswani::layers::sinusoidal_table;
use vaswani::ndarray::Array2;

/// Draw the sinusoidal positional encoding and check that an offset is a rotation.
#[derive(Parser, Debug)]
struct Args {
    /// Positions to draw.
    #[arg(long, default_value_t = 100)]
    positions: usize,
    /// Dimensions (d_model), even.
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Prefix of the files written.
    #[arg(long, default_value = "positional_encoding")]
    out: PathBuf,
    /// Write SVG instead of PNG (the guide's pictures in docs/guide/img are SVG).
    #[arg(long)]
    svg: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (len, d) = (args.positions, args.d_model);
    if len < 2 || d < 2 || d % 2 != 0 {
        return Err(format!("need at least 2 positions and an even d_model ≥ 2, got {len} and {d}").into());
    }
    let pe: Array2<f64> = sinusoidal_table(len, d);

    let every = |n: usize, step: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                if i % step == 0 {
                    i.to_string()
                } else {
                    String::new()
                }
            })
            .collect()
    };
    let ext = if args.svg { "svg" } else { "png" };
    let table = args
        .out
        .with_file_name(format!("{}_table.{ext}", file_stem(&args.out)));
    common::heat_map(
        &table,
        &format!("sinusoidal positional encoding, d_model = {d}"),
        pe.mapv(|v| v as f32).view(),
        &every(len, (len / 10).max(1)),
        &every(d, (d / 8).max(1)),
        ("dimension", "position"),
    )?;

    // Sines at a sixteenth, an eighth, a quarter and half of the way: wavelengths from
    // about 11 to 628 positions at d_model = 64.
    let dims = [d / 16, d / 8, d / 4, d / 2].map(|i| i & !1);
    let series: Vec<(String, Vec<(f64, f64)>)> = (dims.iter().copied())
        .map(|i| {
            let kind = if i % 2 == 0 { "sin" } else { "cos" };
            let name = format!("dimension {i} ({kind}, wavelength {:.0})", wavelength(i, d));
            (name, (0..len).map(|p| (p as f64, pe[[p, i]])).collect())
        })
        .collect();
    let series: Vec<(&str, Vec<(f64, f64)>)> = series.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
    let curves = args
        .out
        .with_file_name(format!("{}_curves.{ext}", file_stem(&args.out)));
    common::plot_lines(
        &curves,
        "PE(pos, i) for a few dimensions i",
        "position",
        "value",
        &series,
        false,
    )?;
    println!("wrote {} and {}", table.display(), curves.display());

    // The rotation check, in f64, against a table that reaches pos + k.
    println!("PE(pos + k) against the rotation of PE(pos) by k·ω_i, every pos < {len}, every pair i:");
    for k in [1, 5, 50] {
        let far: Array2<f64> = sinusoidal_table(len + k, d);
        let mut worst: f64 = 0.0;
        for pos in 0..len {
            for i in 0..d / 2 {
                let omega = 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64);
                let (c, s) = ((k as f64 * omega).cos(), (k as f64 * omega).sin());
                let (sin, cos) = (far[[pos, 2 * i]], far[[pos, 2 * i + 1]]);
                let rotated = (c * sin + s * cos, -s * sin + c * cos);
                worst = worst
                    .max((rotated.0 - far[[pos + k, 2 * i]]).abs())
                    .max((rotated.1 - far[[pos + k, 2 * i + 1]]).abs());
            }
        }
        println!("  k = {k:>2}: largest difference {worst:.1e} (the same rotation at every position)");
        if worst > 1e-9 {
            return Err(format!("PE(pos + {k}) is not the rotation of PE(pos): {worst:e}").into());
        }
    }
    Ok(())
}

/// The wavelength of dimension `i`, in positions: 2π · 10000^(2⌊i/2⌋ / d).
fn wavelength(i: usize, d: usize) -> f64 {
    std::f64::consts::TAU * 10000f64.powf((2 * (i / 2)) as f64 / d as f64)
}

fn file_stem(p: &std::path::Path) -> String {
    p.file_name().map_or_else(
        || "positional_encoding".into(),
        |s| s.to_string_lossy().into_owned(),
    )
}
