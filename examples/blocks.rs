//! The building blocks at work: tokens → embedding → positions → one encoder layer → one
//! decoder layer, with the shape at every step and the attention weights printed.
//!
//!     cargo run --release --example blocks

use clap::Parser;
use vaswani::blocks::{BlockConfig, DecoderLayerConfig, EncoderLayerConfig};
use vaswani::layers::{EmbeddingConfig, Mask, SinusoidalConfig, sinusoidal_table};
use vaswani::ndarray::{Array2, Axis, array, s};
use vaswani::rand::{SeedableRng, rngs::StdRng};
use vaswani::{Params, Result};

/// The building blocks at work: tokens through an embedding, positions, one encoder layer and
/// one decoder layer, with the shape at every step and the attention weights printed.
#[derive(Parser, Debug)]
struct Args {}

fn main() -> Result<()> {
    Args::parse();
    let mut rng = StdRng::seed_from_u64(2017);
    let (vocab, d_model, heads, d_ff) = (12, 16, 4, 64);

    // Two source sentences of token ids; the second is padded (id 0) after 3 tokens.
    let src = array![[5_usize, 9, 2, 7, 3], [4, 8, 6, 0, 0]];
    let src_lengths = [5, 3];
    let (b, s) = src.dim();
    println!("source ids                 {:?}", src.shape());

    // Embedding × √d_model (§3.4), plus sinusoidal positions (§3.5).
    let embed = EmbeddingConfig::new(vocab, d_model).init(&mut rng)?;
    let positions = SinusoidalConfig::new(d_model).init()?;
    let x = embed.infer(src.view())?; // [B·S, d_model] rows
    println!("embedded, as rows          {:?}", x.shape());
    let x = positions.forward(x.view(), s, 0);
    let x = x.into_shape_with_order((b, s, d_model)).expect("standard layout");
    println!("with positions, [B, S, d]  {:?}", x.shape());

    // One encoder layer (post-norm, as the paper), the padding masked out of the keys.
    let block = BlockConfig::new(d_model, heads, d_ff);
    let encoder = EncoderLayerConfig::new(block.clone()).init(&mut rng)?;
    let src_mask = Mask::key_lengths(&src_lengths);
    let (memory, weights) = encoder.infer_with_weights(x.view(), &src_mask);
    println!("encoder output (memory)    {:?}", memory.shape());
    println!(
        "attention weights [B,H,S,S] {:?}: {heads} heads of d_k = {}, concatenated back to d_model",
        weights.shape(),
        d_model / heads
    );
    println!("\nsequence 1, head 0 (rows: queries, columns: keys; the 2 padded keys get exactly 0):");
    print_grid(&weights.slice(s![1, 0, .., ..]).to_owned());

    // One decoder layer: masked self-attention over 4 target positions, then cross-attention
    // over the memory.
    let decoder = DecoderLayerConfig::new(block.clone()).init(&mut rng)?;
    let tgt = embed.infer(array![[1_usize, 5, 9, 2], [1, 4, 8, 6]].view())?;
    let tgt = positions
        .forward(tgt.view(), 4, 0)
        .into_shape_with_order((b, 4, d_model))
        .expect("standard layout");
    let (y, w) = decoder.infer_with_weights(tgt.view(), memory.view(), &Mask::causal(), &src_mask);
    println!("\ndecoder output             {:?}", y.shape());
    println!("causal self-attention, sequence 0, head 0 (position i sees only positions ≤ i):");
    print_grid(&w.self_attn.slice(s![0, 0, .., ..]).to_owned());
    println!("cross-attention, sequence 1, head 0 (target positions over the 3 real source tokens):");
    print_grid(&w.cross_attn.slice(s![1, 0, .., ..]).to_owned());

    // Post-norm ends each sub-layer with LayerNorm, so every output row has mean 0 and
    // standard deviation 1 (γ = 1, β = 0 at init). Pre-norm leaves the residual stream free.
    for norm_first in [false, true] {
        let layer = EncoderLayerConfig::new(block.clone().with_norm_first(norm_first)).init(&mut rng)?;
        let out = layer.infer(x.view(), &src_mask);
        let row = out.slice(s![0, 0, ..]);
        let mean = row.mean().unwrap_or(0.0);
        let std = row.mapv(|v| (v - mean).powi(2)).mean().unwrap_or(0.0).sqrt();
        let name = if norm_first { "pre-norm " } else { "post-norm" };
        println!(
            "{name}: output row 0 has mean {mean:+.3} and std {std:.3}; {} parameters",
            layer.num_params()
        );
    }

    println!("\nsinusoidal positional encoding, first 4 positions × first 6 dimensions (sin, cos, sin, …):");
    print_grid(&sinusoidal_table::<f32>(4, d_model).slice(s![.., ..6]).to_owned());
    let mean_weight_row: f32 = weights.index_axis(Axis(0), 0).sum() / (heads * s) as f32;
    println!("every attention row sums to 1: mean row sum over sequence 0 = {mean_weight_row:.4}");
    Ok(())
}

fn print_grid(a: &Array2<f32>) {
    for row in a.rows() {
        let cells: Vec<String> = row
            .iter()
            .map(|&v| {
                if v == 0.0 {
                    "     ·".to_string()
                } else {
                    format!("{v:6.3}")
                }
            })
            .collect();
        println!("    {}", cells.join(" "));
    }
}
