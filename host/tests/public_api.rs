//! The library's public API is plain Rust: no abi_stable type (`RString`, `RVec`, `ROption`,
//! the `*_TO` trait objects, ...) and nothing of `llama-plugin-api` appears in it. Those stay
//! at the plugin boundary (`boundary.rs`, `plugin.rs`, `select.rs`'s private fields).
//!
//! A source check: every declaration marked plain `pub` (not `pub(crate)`), with its whole
//! signature, in every file of the crate, is searched for the boundary's type names. A
//! `pub` item in a private module counts too, so the rule does not depend on re-exports.

use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "abi_stable", "llama_plugin_api", "api::", "RString", "RVec", "ROption", "RStr", "RSlice", "RBox", "RResult", "RArc", "_TO<",
    "ContextBox", "ModelBox", "BackendBox", "AbortBox", "BackendModRef", "ProbeReport", "ProgressSink", "LogSink",
];

/// The public declarations of one file, each with the line it starts on.
fn public_declarations(src: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = src.lines().collect();
    let mut out = Vec::new();
    let mut in_tests = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        if line.starts_with("#[cfg(test)]") {
            in_tests = true;
        }
        let public = line.starts_with("pub ") && !in_tests;
        if !public {
            i += 1;
            continue;
        }
        // A function's signature runs to its body (`{`, `where`) or `;`; anything else
        // (a field, a `use`, a type) to the end of its line or list.
        let is_fn = line.split_whitespace().take(4).any(|w| w == "fn");
        let mut decl = String::new();
        let start = i;
        loop {
            let l = lines[i];
            let cut = l.find(" {").or_else(|| l.find(" where")).unwrap_or(l.len());
            decl.push_str(&l[..cut]);
            decl.push(' ');
            let end = l.trim_end();
            let done = cut < l.len() || end.ends_with(';') || (!is_fn && (end.ends_with(',') || !end.ends_with('{') && !end.ends_with('(')));
            if done || i + 1 == lines.len() {
                break;
            }
            i += 1;
        }
        out.push((start + 1, decl));
        i += 1;
    }
    out
}

#[test]
fn no_abi_stable_type_in_the_public_api() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for (line, decl) in public_declarations(&src) {
            checked += 1;
            if let Some(word) = FORBIDDEN.iter().find(|w| decl.contains(*w)) {
                offenders.push(format!("{}:{line}: `{word}` in: {}", path.file_name().unwrap().to_string_lossy(), decl.trim()));
            }
        }
    }
    assert!(checked > 100, "the scan found only {checked} public declarations: is it still reading the sources?");
    assert!(offenders.is_empty(), "abi_stable or plugin-ABI types in the public API:\n{}", offenders.join("\n"));
}

#[test]
fn the_check_sees_an_abi_type() {
    let src = "pub struct X {\n    pub name: abi_stable::std_types::RString,\n}\npub fn f(\n    a: u32,\n    b: RVec<u8>,\n) -> u32 {\n";
    let decls = public_declarations(src);
    assert!(decls.iter().any(|(l, d)| *l == 2 && d.contains("RString")), "{decls:?}");
    assert!(decls.iter().any(|(l, d)| *l == 4 && d.contains("RVec")), "{decls:?}");
}
