//! Prints what a checkpoint holds: its kind, config, step, parameter count and tensors.
//!
//!     cargo run --release --example inspect -- model.safetensors
//!
//! A file it cannot load gets the error on standard error and exit status 1, never a panic.

use std::io::Write;
use std::process::ExitCode;

use vaswani::io::{CheckpointInfo, inspect, load_model};
use vaswani::models::{DecoderOnly, EncoderDecoder, EncoderOnly};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        eprintln!("usage: inspect FILE.safetensors");
        return ExitCode::from(2);
    };
    match run(path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &str) -> vaswani::Result<()> {
    let info: CheckpointInfo = inspect(path)?;
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
