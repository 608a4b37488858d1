#![doc = include_str!("../docs/guide/README.md")]

/// A picture of the guide: the SVG file `docs/guide/img/<file>`, inline. Rustdoc passes the
/// SVG through as HTML, so the picture shows on docs.rs with no file beside the page (docs.rs
/// serves only what rustdoc writes, and its Content-Security-Policy blocks `data:` images and
/// inline styles, which these files do not use). The examples write the files; each picture's
/// caption, the doc lines after it, gives the command. `tests/suite/docs.rs` checks that every file
/// of `docs/guide/img` is embedded here, small, and captioned with its command.
macro_rules! figure {
    ($file:literal) => {
        concat!("\n\n", include_str!(concat!("../docs/guide/img/", $file)), "\n\n")
    };
}

#[doc = include_str!("../docs/guide/architecture.md")]
pub mod architecture {}

#[doc = include_str!("../docs/guide/attention.md")]
#[doc = figure!("heads_concat_vs_average_loss.svg")]
/// *The training loss of the two models of `heads_concat_vs_average`, heads concatenated
/// (§3.2.2) and averaged, on a log scale: the same start, then the averaged model stalls. Drawn
/// by `cargo run --release --example heads_concat_vs_average -- --plot
/// docs/guide/img/heads_concat_vs_average_loss.svg`.*
#[doc = figure!("attention_cross_h0.svg")]
#[doc = figure!("attention_cross_h1.svg")]
#[doc = figure!("attention_cross_h2.svg")]
#[doc = figure!("attention_cross_h3.svg")]
/// *The four cross-attention heads of decoder layer 1 of the dates model, reading
/// "Sat, 28 Nov 2026" (the keys, across) while it writes `2026-11-28` (one row per character
/// written; each row sums to 1). Head 1 is the map the README prints as text. Drawn by
/// `cargo run --release --example attention_maps -- --svg --out docs/guide/img/attention`.*
#[doc = figure!("attention_encoder.svg")]
/// *Encoder self-attention of the same model (layer 1, head 0): each character of the input
/// over the input. Drawn by the same command,
/// `cargo run --release --example attention_maps -- --svg --out docs/guide/img/attention`.*
pub mod attention {}

#[doc = include_str!("../docs/guide/normalisation.md")]
#[doc = figure!("norm_placement_loss.svg")]
/// *The training loss of the four runs of `norm_placement` (6 + 6 layers, the same weights
/// and batches), on a log scale: post-norm without warm-up falls behind from the first steps
/// and stays there. Drawn by `cargo run --release --example norm_placement -- --plot
/// docs/guide/img/norm_placement_loss.svg` (28 s).*
pub mod normalisation {}

#[doc = include_str!("../docs/guide/backward.md")]
pub mod backward {}

#[doc = include_str!("../docs/guide/your-data.md")]
pub mod your_data {}

#[doc = include_str!("../docs/positional-encoding.md")]
///
/// ## The pictures
///
/// The example `positional_encoding` draws the table and prints the check that `PE(pos + k)`
/// is the same rotation of `PE(pos)` at every position (largest difference about 1e-14).
#[doc = figure!("positional_encoding_table.svg")]
/// *The table `PE(pos, i)` for 100 positions at `d_model = 64`, one row per position: the
/// first columns turn fast (wavelength 2π), the last ones hardly move in 100 positions, and
/// sin and cos columns alternate. Drawn by `cargo run --release --example positional_encoding
/// -- --svg --out docs/guide/img/positional_encoding`.*
#[doc = figure!("positional_encoding_curves.svg")]
/// *Four of its sin columns over position, wavelengths 11, 20, 63 and 628: each a sine at its
/// own frequency. Drawn by the same command, `cargo run --release --example
/// positional_encoding -- --svg --out docs/guide/img/positional_encoding`.*
pub mod positional_encoding {}

#[doc = include_str!("../docs/guide/performance.md")]
pub mod performance {}
