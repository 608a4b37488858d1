//! Runs a `torch.nn.Transformer` state_dict through the crate and writes what PyTorch would
//! compute: the contract that `scripts/pytorch_fixtures.py` and `tests/suite/pytorch_parity.rs`
//! rely on.
//!
//!     cargo run --release --example pytorch_parity -- IN.safetensors OUT.safetensors
//!
//! IN holds the state_dict of `torch.nn.Transformer(batch_first=True, dropout=0.0)` under
//! PyTorch's names, the inputs `src`, `tgt`, `grad_output`, optional U8 padding masks and a
//! `config` in its metadata; OUT gets `output`, `grad.src`, `grad.tgt`, `grad.<name>` for
//! every parameter and `weights.<name>`, the crate's re-export of the weights. See
//! `vaswani::io::pytorch::parity` for the details.

use std::process::ExitCode;

use clap::Parser;

/// Runs a torch.nn.Transformer state_dict and its inputs (IN) through the crate and writes
/// the output, every gradient and the re-exported weights (OUT), for comparison with
/// PyTorch (scripts/pytorch_fixtures.py).
#[derive(Parser, Debug)]
struct Args {
    /// The state_dict, inputs and config, as scripts/pytorch_fixtures.py writes them.
    input: String,
    /// Where to write the output, the gradients and the weights.
    output: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (input, output) = (&args.input, &args.output);
    let run = || -> vaswani::Result<usize> {
        vaswani::io::parity(input, output)?;
        Ok(vaswani::io::TensorFile::read(output)?.tensors().len())
    };
    match run() {
        Ok(n) => {
            println!(
                "ran {input} through the crate: wrote {n} tensors (output, gradients, weights) to {output}"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
