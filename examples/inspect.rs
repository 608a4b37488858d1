//! Prints what a checkpoint holds: its kind, config, step, parameter count and tensors. Any
//! other safetensors file, such as a PyTorch state_dict saved with
//! `safetensors.torch.save_file(model.state_dict(), path)`, is listed tensor by tensor, with
//! the sizes of a `torch.nn.Transformer` read off its shapes when its names are PyTorch's.
//!
//!     cargo run --release --example inspect -- model.safetensors
//!
//! A file it cannot load gets the error on standard error and exit status 1, never a panic.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use vaswani::io::{CheckpointInfo, TensorFile, TensorInfo, inspect, load_model};
use vaswani::models::{DecoderOnly, EncoderDecoder, EncoderOnly};

/// Prints what a safetensors file holds: a vaswani checkpoint's kind, config, training state
/// and tensors, or any other file's tensors (a PyTorch state_dict with its nn.Transformer
/// sizes).
#[derive(Parser, Debug)]
struct Args {
    /// The file to read.
    file: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args.file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &str) -> vaswani::Result<()> {
    let info: CheckpointInfo = match inspect(path) {
        Ok(info) => info,
        // Not the crate's checkpoint, but a valid safetensors file: list what it holds.
        Err(vaswani::Error::Checkpoint { why, .. }) if why.starts_with("not a vaswani checkpoint") => {
            let file = TensorFile::read(path)?;
            let _ = print_foreign(path, &file, &mut std::io::stdout().lock());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // Where the crate knows the kind, load the whole model too, so that a file whose tensors
    // do not fit its config is reported here as well.
    match (info.kind.as_str(), info.dtype.as_str()) {
        ("encoder_decoder", "f64") => drop(load_model::<EncoderDecoder<f64>>(path)?),
        ("encoder_decoder", _) => drop(load_model::<EncoderDecoder>(path)?),
        ("encoder_only", "f64") => drop(load_model::<EncoderOnly<f64>>(path)?),
        ("encoder_only", _) => drop(load_model::<EncoderOnly>(path)?),
        ("decoder_only", "f64") => drop(load_model::<DecoderOnly<f64>>(path)?),
        ("decoder_only", _) => drop(load_model::<DecoderOnly>(path)?),
        _ => {}
    }
    // Written with `writeln!` so that a closed pipe (`| head`) ends the listing quietly
    // instead of panicking as `println!` would.
    let _ = print_info(path, &info, &mut std::io::stdout().lock());
    Ok(())
}

fn print_info(path: &str, info: &CheckpointInfo, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{path}")?;
    writeln!(
        out,
        "  kind       {} ({}), format version {}",
        info.kind, info.dtype, info.version
    )?;
    writeln!(out, "  parameters {}", info.params)?;
    if let Some(step) = info.step {
        writeln!(out, "  training   step {step}, optimizer state saved")?;
    }
    writeln!(out, "  config     {}", info.config)?;
    if let Some(trainer) = &info.trainer {
        writeln!(out, "  trainer    {trainer}")?;
    }
    writeln!(out, "  tensors    {}", info.tensors.len())?;
    for t in &info.tensors {
        writeln!(out, "    {:<48} {:<5} {:?}", t.name, t.dtype, t.shape)?;
    }
    Ok(())
}

/// A safetensors file that is not a vaswani checkpoint: its metadata keys and tensors, and
/// what a `torch.nn.Transformer` state_dict says about the model's sizes.
fn print_foreign(path: &str, file: &TensorFile, out: &mut impl Write) -> std::io::Result<()> {
    let tensors = file.tensors();
    let params: u64 = tensors
        .iter()
        .map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum();
    writeln!(out, "{path}")?;
    writeln!(out, "  kind       not a vaswani checkpoint: a safetensors file")?;
    if let Some(sizes) = torch_transformer_sizes(&tensors) {
        writeln!(out, "  pytorch    a torch.nn.Transformer state_dict: {sizes}")?;
        writeln!(
            out,
            "             (nhead, activation, norm_first and layer_norm_eps are not in a state_dict;"
        )?;
        writeln!(
            out,
            "             load it with vaswani::io::TorchTransformer::load and a TorchTransformerConfig)"
        )?;
    }
    let mut keys: Vec<&String> = file.metadata().keys().collect();
    keys.sort();
    if !keys.is_empty() {
        writeln!(out, "  metadata   {keys:?}")?;
    }
    writeln!(out, "  elements   {params}")?;
    writeln!(out, "  tensors    {}", tensors.len())?;
    for t in &tensors {
        writeln!(out, "    {:<48} {:<5} {:?}", t.name, t.dtype, t.shape)?;
    }
    Ok(())
}

/// `d_model`, the layer counts and `dim_feedforward` of an `nn.Transformer` state_dict, from
/// the shapes under PyTorch's names; `None` if the names are not PyTorch's.
fn torch_transformer_sizes(tensors: &[TensorInfo]) -> Option<String> {
    let shape = |name: &str| tensors.iter().find(|t| t.name == name).map(|t| t.shape.clone());
    let d_model = shape("encoder.layers.0.self_attn.out_proj.weight")?[0];
    let d_ff = shape("encoder.layers.0.linear1.weight")?[0];
    let layers = |stack: &str| {
        tensors
            .iter()
            .filter_map(|t| t.name.strip_prefix(&format!("{stack}.layers.")))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .collect::<BTreeSet<usize>>()
            .len()
    };
    Some(format!(
        "d_model {d_model}, num_encoder_layers {}, num_decoder_layers {}, dim_feedforward {d_ff}",
        layers("encoder"),
        layers("decoder")
    ))
}
