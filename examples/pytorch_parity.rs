//! Runs a `torch.nn.Transformer` state_dict through the crate and writes what PyTorch would
//! compute: the contract that `scripts/pytorch_fixtures.py` and `tests/pytorch_parity.rs`
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: pytorch_parity IN.safetensors OUT.safetensors");
        return ExitCode::from(2);
    };
    match vaswani::io::parity(input, output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
