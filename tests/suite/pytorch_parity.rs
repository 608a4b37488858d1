//! The crate against PyTorch: every fixture of `tests/fixtures/` (written by
//! `scripts/pytorch_fixtures.py` with torch 2.15, its float64 reference stored as f32) run
//! through `vaswani::io::parity`, the code of `examples/pytorch_parity.rs`.
//!
//! Bounds (the issue's): forward max |ours − PyTorch| ≤ 2e-5 · max |PyTorch|, every gradient
//! ≤ 2e-4 · max |PyTorch| of that gradient.

use std::path::PathBuf;

use vaswani::io::{TensorFile, TorchTransformer, TorchTransformerConfig, parity};

fn fixtures() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && !p.to_string_lossy().ends_with(".expected.safetensors")
        })
        .collect();
    out.sort();
    out
}

fn rel_err(got: &ndarray::ArrayD<f32>, want: &ndarray::ArrayD<f32>) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let scale = want.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    if scale == 0.0 { err } else { err / scale }
}

#[test]
fn every_fixture_matches_pytorch() {
    let fixtures = fixtures();
    assert!(fixtures.len() >= 10, "fixtures missing: {fixtures:?}");
    let out_dir = std::env::temp_dir().join(format!("vaswani-parity-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let (mut worst_fwd, mut worst_grad) = ((0.0f64, String::new()), (0.0f64, String::new()));
    for input in &fixtures {
        let stem = input.file_stem().unwrap().to_string_lossy().to_string();
        let out_path = out_dir.join(format!("{stem}.out.safetensors"));
        parity(input, &out_path).unwrap_or_else(|e| panic!("{stem}: {e}"));
        let out = TensorFile::read(&out_path).unwrap();
        let expected =
            TensorFile::read(input.with_file_name(format!("{stem}.expected.safetensors"))).unwrap();
        let fwd = rel_err(&out.float("output").unwrap(), &expected.float("output").unwrap());
        assert!(fwd <= 2e-5, "{stem}: forward error {fwd:.2e}");
        if fwd > worst_fwd.0 {
            worst_fwd = (fwd, stem.clone());
        }
        let names: Vec<String> = expected
            .tensors()
            .into_iter()
            .map(|t| t.name)
            .filter(|n| n.starts_with("grad."))
            .collect();
        assert!(names.len() > 3, "{stem}: no gradients in the expected file");
        for name in names {
            let err = rel_err(&out.float(&name).unwrap(), &expected.float(&name).unwrap());
            assert!(err <= 2e-4, "{stem}: {name} error {err:.2e}");
            if err > worst_grad.0 {
                worst_grad = (err, format!("{stem}: {name}"));
            }
        }
        // The re-exported weights are the loaded ones, bit for bit.
        let input_file = TensorFile::read(input).unwrap();
        for t in out
            .tensors()
            .into_iter()
            .filter(|t| t.name.starts_with("weights."))
        {
            let name = t.name.trim_start_matches("weights.");
            assert_eq!(
                out.float::<f32>(&t.name).unwrap(),
                input_file.float::<f32>(name).unwrap(),
                "{stem}: {name}"
            );
        }
    }
    eprintln!(
        "{} fixtures: worst forward error {:.2e} ({}), worst gradient error {:.2e} ({})",
        fixtures.len(),
        worst_fwd.0,
        worst_fwd.1,
        worst_grad.0,
        worst_grad.1
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn a_state_dict_for_another_config_lists_every_difference() {
    let input = fixtures()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("post_relu_d16h4_2x2"))
        .unwrap();
    let file = TensorFile::read(&input).unwrap();
    let others = [
        "src",
        "tgt",
        "grad_output",
        "src_key_padding_mask",
        "tgt_key_padding_mask",
    ];
    let cfg = TorchTransformerConfig {
        d_model: 16,
        nhead: 4,
        num_encoder_layers: 3,
        num_decoder_layers: 2,
        dim_feedforward: 32,
        activation: vaswani::kernels::Activation::Relu,
        norm_first: false,
        layer_norm_eps: 1e-5,
    };
    let err = TorchTransformer::<f32>::from_file(&file, &cfg, &others)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing keys") && err.contains("encoder.layers.2.self_attn.in_proj_weight"),
        "{err}"
    );
    assert!(
        err.contains("size mismatch for encoder.layers.0.linear1.weight"),
        "{err}"
    );
    // Without listing the inputs, they are unexpected keys.
    let right = TorchTransformerConfig {
        num_encoder_layers: 2,
        dim_feedforward: 24,
        ..cfg
    };
    let err = TorchTransformer::<f32>::from_file(&file, &right, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected keys") && err.contains("\"src\""),
        "{err}"
    );
    assert!(TorchTransformer::<f32>::from_file(&file, &right, &others).is_ok());
}
