//! The example programs as a user runs them: every one answers `--help` with its usage and
//! exit status 0, refuses a missing argument with its usage, and says what it did.
//!
//! `cargo test` builds the examples (in the test profile, beside this test's own binary);
//! these tests run those binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built example `name`, next to this test's binary (`target/<profile>/examples/`).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo test` (which builds the examples), or `cargo test --examples --test suite examples::`",
        path.display()
    );
    path
}

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(example(name)).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `.rs` file of `examples/` is an example.
fn names() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension().is_some_and(|x| x == "rs"))
                .then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names
}

#[test]
fn every_example_answers_help() {
    for name in names() {
        let out = run(&name, &["--help"]);
        let t = text(&out);
        assert!(out.status.success(), "{name} --help: {:?}\n{t}", out.status);
        assert!(t.contains("Usage:"), "{name} --help printed no usage:\n{t}");
    }
}

#[test]
fn missing_arguments_give_the_usage_and_a_failure() {
    for (name, args) in [
        ("inspect", &[][..]),
        ("pytorch_parity", &[][..]),
        ("pytorch_parity", &["in.safetensors"][..]),
    ] {
        let out = run(name, args);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}:\n{t}");
        assert!(t.contains("Usage:"), "{name} {args:?}:\n{t}");
    }
    // An unknown flag is an error, not ignored.
    let out = run("blocks", &["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn inspect_lists_a_pytorch_state_dict_and_a_checkpoint() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/post_relu_d16h4_2x2_pad_causal.safetensors");
    let out = run("inspect", &[fixture.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("encoder.layers.0.self_attn.in_proj_weight"), "{t}");
    assert!(
        t.contains(
            "a torch.nn.Transformer state_dict: d_model 16, num_encoder_layers 2, num_decoder_layers 2"
        ),
        "{t}"
    );

    use vaswani::rand::SeedableRng;
    let model = vaswani::models::DecoderOnlyConfig::new(7, vaswani::blocks::BlockConfig::new(8, 2, 12), 1)
        .init(&mut vaswani::rand::rngs::StdRng::seed_from_u64(0))
        .unwrap();
    let path = std::env::temp_dir().join(format!("vaswani-examples-{}.safetensors", std::process::id()));
    vaswani::io::save_model(&path, &model).unwrap();
    let out = run("inspect", &[path.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success() && t.contains("decoder_only (f32)"), "{t}");
    std::fs::remove_file(&path).ok();
    // A file that is not there: an error, not a listing of a file named "--help".
    let out = run("inspect", &["/nonexistent/model.safetensors"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn pytorch_parity_says_what_it_wrote() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/post_relu_d8h1_1x1.safetensors");
    let path = std::env::temp_dir().join(format!("vaswani-parity-{}.safetensors", std::process::id()));
    let out = run(
        "pytorch_parity",
        &[fixture.to_str().unwrap(), path.to_str().unwrap()],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("wrote") && t.contains(path.to_str().unwrap()), "{t}");
    std::fs::remove_file(&path).ok();
}

#[test]
fn blocks_runs_and_prints_its_shapes() {
    let out = run("blocks", &[]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("encoder output (memory)"), "{t}");
}
