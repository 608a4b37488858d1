//! Imports point only downward: kernels → layers → blocks → models, with `train/`, `infer/`
//! and `io/` beside and above the models. A model does not know how it is trained or decoded
//! (`models/` imports nothing from `train/` or `infer/`; the training contract, `Trainable`,
//! lives with the models), and decoding and files do not reach into training for the models.

use std::fs;
use std::path::Path;

/// The floors, lowest first, with what each may not import.
const FORBIDDEN: [(&str, &[&str]); 6] = [
    ("kernels", &["layers", "blocks", "models", "train", "infer", "io"]),
    ("layers", &["blocks", "models", "train", "infer", "io"]),
    ("blocks", &["models", "train", "infer", "io"]),
    ("models", &["train", "infer", "io"]),
    ("infer", &["train", "io"]),
    ("io", &["infer"]),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = Vec::new();
    for (floor, above) in FORBIDDEN {
        let dir = src.join(floor);
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        assert!(!files.is_empty(), "no files under {}", dir.display());
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for up in above {
                    let path = format!("crate::{up}");
                    let grouped = code.contains("use crate::{") && code.contains(&format!("{up}::"));
                    if code.contains(&path) || grouped {
                        bad.push(format!(
                            "{}:{}: {floor} imports {up}: {}",
                            file.display(),
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "imports that point up:\n{}", bad.join("\n"));
}
