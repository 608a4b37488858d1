//! Checks on the documentation a user reads and copies: the code in rustdoc examples, the
//! README and the example programs uses the crate's re-exports (`vaswani::rand`,
//! `vaswani::ndarray`), so that it compiles next to whatever `cargo add rand` picks.

use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir), &mut out);
    out.sort();
    out
}

fn read(path: impl AsRef<Path>) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The lines of Rust code in the doc comments of a source file (inside fences that are not
/// `text`), with their line numbers.
fn doc_code(source: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut lang: Option<String> = None;
    for (i, line) in source.lines().enumerate() {
        let t = line.trim_start();
        let Some(body) = t.strip_prefix("//!").or_else(|| t.strip_prefix("///")) else {
            lang = None;
            continue;
        };
        let body = body.strip_prefix(' ').unwrap_or(body);
        if let Some(fence) = body.trim().strip_prefix("```") {
            lang = match lang {
                None => Some(fence.trim().to_string()),
                Some(_) => None,
            };
        } else if lang
            .as_deref()
            .is_some_and(|l| l.is_empty() || l.starts_with("rust"))
        {
            out.push((i + 1, body.to_string()));
        }
    }
    out
}

/// The lines of Rust code blocks in a markdown file.
fn markdown_code(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut lang: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(fence) = line.trim().strip_prefix("```") {
            lang = match lang {
                None => Some(fence.trim().to_string()),
                Some(_) => None,
            };
        } else if lang.as_deref().is_some_and(|l| l.starts_with("rust")) {
            out.push((i + 1, line.to_string()));
        }
    }
    out
}

/// Paths through `rand::` or `ndarray::` that do not go through `vaswani::`.
fn unqualified(line: &str) -> Option<&'static str> {
    for krate in ["rand::", "ndarray::", "ndarray_rand::"] {
        let mut from = 0;
        while let Some(at) = line[from..].find(krate) {
            let at = from + at;
            let before = line[..at].chars().next_back();
            if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                return Some(krate);
            }
            from = at + krate.len();
        }
    }
    None
}

#[test]
fn user_facing_code_uses_the_crates_reexports() {
    let mut bad = Vec::new();
    for file in rust_files("src") {
        for (n, line) in doc_code(&fs::read_to_string(&file).unwrap()) {
            if let Some(k) = unqualified(&line) {
                bad.push(format!("{}:{n}: {k} in a doc example: {line}", file.display()));
            }
        }
    }
    for md in ["README.md"] {
        for (n, line) in markdown_code(&read(md)) {
            if let Some(k) = unqualified(&line) {
                bad.push(format!("{md}:{n}: {k}: {line}"));
            }
        }
    }
    for file in rust_files("examples") {
        for (n, line) in fs::read_to_string(&file).unwrap().lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if let Some(k) = unqualified(line) {
                bad.push(format!("{}:{}: {k}: {line}", file.display(), n + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "use vaswani::rand / vaswani::ndarray:\n{}",
        bad.join("\n")
    );
}

/// The README is the crate's front page, so its quick start runs as a doctest; it builds the
/// model without naming the float type.
#[test]
fn the_readme_quick_start_is_a_doctest_without_type_annotations() {
    assert!(read("src/lib.rs").contains(r#"#![doc = include_str!("../README.md")]"#));
    let readme = read("README.md");
    assert!(
        readme.contains("let model = cfg.init(&mut rng)?;"),
        "the quick start"
    );
    assert!(
        !readme.contains("let model: EncoderDecoder"),
        "no annotation needed"
    );
}

/// Every public backward function says what it does with its gradient target: *adds* into a
/// gradient container, *overwrites* an output it is handed, or *returns* fresh arrays.
#[test]
fn every_backward_documents_its_gradient_target() {
    let mut bad = Vec::new();
    for file in rust_files("src") {
        let text = fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let Some(rest) = t.strip_prefix("pub fn ") else {
                continue;
            };
            if !rest.split('(').next().unwrap().contains("backward") {
                continue;
            }
            let doc: String = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with("///") || l.trim_start().starts_with("#["))
                .map(|l| l.to_lowercase())
                .collect();
            let signature: String = lines[i..]
                .iter()
                .take_while(|l| !l.contains('{'))
                .chain(lines[i..].iter().find(|l| l.contains('{')))
                .copied()
                .collect();
            let writes_into = signature.contains("&mut") || signature.contains("ViewMut");
            let says = if writes_into {
                doc.contains("adds") || doc.contains("overwrit")
            } else {
                doc.contains("return")
            };
            if !says {
                bad.push(format!("{}:{}: {}", file.display(), i + 1, t));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "backward without its gradient target documented:\n{}",
        bad.join("\n")
    );
}

/// Documentation that points outside the crate or contradicts the code.
#[test]
fn docs_point_inside_the_crate_and_agree_with_the_code() {
    let mut texts: Vec<(String, String)> = rust_files("src")
        .into_iter()
        .map(|f| (f.display().to_string(), fs::read_to_string(&f).unwrap()))
        .collect();
    texts.push(("README.md".into(), read("README.md")));
    let mut bad = Vec::new();
    for (name, text) in &texts {
        for (n, line) in text.lines().enumerate() {
            let doc = name == "README.md" || line.trim_start().starts_with("//");
            if !doc {
                continue;
            }
            // Files that are not in the package, and relative links, dead on docs.rs (the
            // README is the crate's front page there).
            for outside in [
                "../shared",
                "WORKLOADS.md",
                "BAD_INPUTS.md",
                "](docs/",
                "](../",
                "](./",
            ] {
                if line.contains(outside) {
                    bad.push(format!("{name}:{}: {outside}: {line}", n + 1));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "docs pointing outside the crate:\n{}",
        bad.join("\n")
    );

    // The gradient check's numbers, as `GradCheck::default` has them.
    let check = vaswani::gradcheck::GradCheck::default();
    let float = read("src/kernels/float.rs");
    for said in [
        format!("step of {:e}", check.step),
        format!("tolerance of {:e}", check.tolerance),
    ] {
        assert!(float.contains(&said), "src/kernels/float.rs should say {said:?}");
    }
    // Generation uses the key/value cache.
    let lm = read("src/models/decoder_only.rs");
    assert!(!lm.contains("re-runs the model on the growing sequence"));
    // A time in the README comes with the command that measures it.
    let readme = read("README.md");
    for (n, para) in readme.split("\n\n").enumerate() {
        if para.contains(" seconds") {
            assert!(
                para.contains("cargo run --release --example"),
                "paragraph {n} gives a time without its command:\n{para}"
            );
        }
    }
}

/// The speed-ups (`1.62×`, `11–29×`) and fractions of the peak (`85–97%`) in a text: a run
/// of digits, points and en dashes that begins with a digit and ends at `×` or `%`.
fn figures(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, c) in text.char_indices() {
        if c != '×' && c != '%' {
            continue;
        }
        let head = &text[..at];
        let start = head
            .char_indices()
            .rev()
            .take_while(|&(_, d)| d.is_ascii_digit() || d == '.' || d == '–')
            .last()
            .map_or(at, |(i, _)| i);
        let number = head[start..].trim_start_matches(['.', '–']);
        if number.starts_with(|d: char| d.is_ascii_digit()) {
            out.push(format!("{number}{c}"));
        }
    }
    out
}

#[test]
fn figures_are_read_whole() {
    assert_eq!(
        figures("1.62× · 11–29× (85–97% of it), 4% more; x×, –%"),
        ["1.62×", "11–29×", "85–97%", "4%"]
    );
}

/// Every speed-up and fraction of the peak that the README's speed section quotes is on the
/// guide's performance page, which names the machine, the run and the command of each: a
/// table updated in one place and not the other fails here.
#[test]
fn the_readmes_speed_figures_are_on_the_performance_page() {
    let readme = read("README.md");
    let start = readme
        .find("\n## Speed\n")
        .expect("the README has a speed section");
    let speed = &readme[start + 1..];
    let speed = &speed[..speed.find("\n## ").unwrap_or(speed.len())];
    let page = figures(&read("docs/guide/performance.md"));
    let quoted = figures(speed);
    assert!(quoted.len() > 50, "the speed section's tables: {quoted:?}");
    // Whole figures: `2.14×` is not found in `12.14×`.
    let missing: Vec<&String> = quoted.iter().filter(|f| !page.contains(f)).collect();
    assert!(
        missing.is_empty(),
        "figures in the README's speed section that docs/guide/performance.md does not give: {missing:?}"
    );
}

/// The README is also the crate's page on crates.io, where an intra-doc link (`crate::…`) is
/// dead: it links the guide, its chapters and its other pages by absolute docs.rs URLs, which
/// work on crates.io, on GitHub and on docs.rs, each to a module that exists.
#[test]
fn the_readme_links_the_guide_by_urls_that_work_on_crates_io_and_docs_rs() {
    const DOCS: &str = "https://docs.rs/vaswani/latest/vaswani/";
    let readme = read("README.md");
    assert!(
        !readme.contains("](crate::"),
        "an intra-doc link in the README is dead on crates.io: link https://docs.rs/vaswani/latest/vaswani/…"
    );
    assert!(
        readme.contains(&format!("]({DOCS}guide/index.html)")),
        "the README links the guide"
    );
    let mut chapters = Vec::new();
    for (at, _) in readme.match_indices("](https://docs.rs/") {
        let url = &readme[at + 2..];
        let url = &url[..url.find(')').unwrap()];
        let module = url
            .strip_prefix(DOCS)
            .and_then(|p| p.strip_suffix("/index.html"))
            .unwrap_or_else(|| panic!("{url}: link a module as {DOCS}<module>/index.html"));
        let parts: Vec<&str> = module.split('/').collect();
        let file = [format!("src/{}.rs", parts[0]), format!("src/{}/mod.rs", parts[0])]
            .into_iter()
            .find(|f| Path::new(env!("CARGO_MANIFEST_DIR")).join(f).exists())
            .unwrap_or_else(|| panic!("{url}: no module {}", parts[0]));
        match parts[1..] {
            [] => {}
            [sub] => assert!(
                read(&file).contains(&format!("pub mod {sub}")),
                "{url}: {file} declares no `pub mod {sub}`"
            ),
            _ => panic!("{url}: extend this test to modules this deep"),
        }
        chapters.push(module.to_string());
    }
    for page in [
        "guide/normalisation",
        "guide/attention",
        "guide/positional_encoding",
        "guide/your_data",
        "guide/performance",
    ] {
        assert!(chapters.iter().any(|c| c == page), "the README links {page}");
    }
    assert!(
        read("Cargo.toml").contains("documentation = \"https://docs.rs/vaswani\""),
        "Cargo.toml names docs.rs as the documentation"
    );
}

/// The guide's pictures, `docs/guide/img/*.svg`, show on docs.rs: each is embedded inline in
/// `src/guide.rs` by `figure!` (docs.rs serves no file of the crate beside the HTML), is small,
/// is an SVG that a Markdown HTML block passes through whole (no blank line), uses nothing
/// that docs.rs's Content-Security-Policy blocks (inline styles, `data:` URIs) and no script,
/// and its caption gives the command of the example that draws it again.
#[test]
fn the_guides_pictures_are_embedded_small_and_captioned_with_their_command() {
    let guide = read("src/guide.rs");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = fs::read_dir(root.join("docs/guide/img"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 4, "the guide's pictures: {names:?}");
    for name in &names {
        assert!(
            name.ends_with(".svg"),
            "docs/guide/img/{name}: only SVG renders inline"
        );
        let svg = read(format!("docs/guide/img/{name}"));
        assert!(svg.len() <= 48_000, "docs/guide/img/{name}: {} bytes", svg.len());
        assert!(
            svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"),
            "docs/guide/img/{name}: one <svg> element"
        );
        assert!(
            !svg.lines().any(|l| l.trim().is_empty()),
            "docs/guide/img/{name}: a blank line ends the Markdown HTML block"
        );
        for blocked in ["style=", "<style", "data:", "<script", "href="] {
            assert!(!svg.contains(blocked), "docs/guide/img/{name}: {blocked}");
        }
        // Embedded, and captioned (the doc lines after it and after the figures beside it).
        let call = format!("#[doc = figure!(\"{name}\")]");
        let at = guide
            .find(&call)
            .unwrap_or_else(|| panic!("src/guide.rs does not embed docs/guide/img/{name}"));
        let caption: Vec<&str> = guide[at..]
            .lines()
            .skip(1)
            .skip_while(|l| l.trim_start().starts_with("#[doc = figure!("))
            .map_while(|l| l.trim_start().strip_prefix("///"))
            .collect();
        let caption = caption.join(" ");
        let command = caption
            .split("cargo run --release --example ")
            .nth(1)
            .unwrap_or_else(|| panic!("the caption of {name} gives no command: {caption:?}"));
        let example = command.split_whitespace().next().unwrap();
        assert!(
            root.join(format!("examples/{example}.rs")).exists(),
            "the caption of {name} runs example {example}, which is not there"
        );
        let target = command
            .split("docs/guide/img/")
            .nth(1)
            .map(|t| {
                t.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .next()
                    .unwrap()
            })
            .unwrap_or_else(|| {
                panic!("the caption of {name} does not write into docs/guide/img: {caption:?}")
            });
        assert!(
            name.starts_with(target.trim_end_matches('.')),
            "the caption of {name} writes docs/guide/img/{target}"
        );
    }
}
