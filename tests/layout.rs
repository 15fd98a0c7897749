//! The source tree is a one-way stack (`src/lib.rs` states it): no module imports one on a
//! higher layer, and no two modules import each other, however indirectly.
//!
//! The check reads `src/` itself: every `use` tree and every `crate::`, `super::`, `self::`
//! or child-module path in code (comments and string literals stripped), resolved to the
//! file module it names. Inline modules (`mod tests { .. }`) count as part of their file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's layers, bottom first. A module may import modules of its own layer or
/// lower ones; the binary (`main.rs`, `cli/`) sits above them all.
const LAYERS: &[&[&str]] = &[
    &["types", "error", "config", "protocol", "stale"],
    &["telemetry"],
    &["kv", "model", "tokenizer", "sampler", "grammar", "registry"],
    &["engine"],
    &["gateway"],
    &["bench"],
];

/// Which crate a file belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Crate {
    Lib,
    Bin,
}

/// A module, named by its crate and path (`[]` is the crate root).
type Module = (Crate, Vec<String>);

struct SourceFile {
    module: Module,
    path: PathBuf,
    code: String,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file defines: `a/b.rs` and `a/b/mod.rs` are `a::b`.
fn module_of(rel: &Path) -> Module {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs").to_owned();
    if !matches!(stem.as_str(), "mod" | "lib" | "main") {
        parts.push(stem.clone());
    }
    let krate = if stem == "main" || parts.first().is_some_and(|p| p == "cli") { Crate::Bin } else { Crate::Lib };
    (krate, parts)
}

/// The code with comments, string and char literals blanked out (lengths kept).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                    i += 1;
                }
            }
        } else if c == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) && !ident_byte(b, i) {
            let mut j = i + 1;
            while b.get(j) == Some(&b'#') {
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            let mut k = j + 1;
            while k < b.len()
                && !(b[k] == b'"' && b[k + 1..].iter().take(hashes).filter(|&&h| h == b'#').count() == hashes)
            {
                k += 1;
            }
            let end = (k + 1 + hashes).min(b.len());
            out.extend(b[i..end].iter().map(|&x| if x == b'\n' { b'\n' } else { b' ' }));
            i = end;
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                let n = if b[i] == b'\\' { 2 } else { 1 };
                for _ in 0..n.min(b.len() - i) {
                    out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            let close = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..].iter().position(|&x| x == b'\'').map(|p| i + 2 + p)
            } else {
                let ch_len =
                    std::str::from_utf8(&b[i + 1..]).ok().and_then(|s| s.chars().next()).map_or(1, char::len_utf8);
                (b.get(i + 1 + ch_len) == Some(&b'\'')).then_some(i + 1 + ch_len)
            };
            match close {
                Some(end) => {
                    out.extend(std::iter::repeat_n(b' ', end + 1 - i));
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ident_byte(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Expands a `use` tree (`a::{b, c::d}`) into its paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn parse(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let s = s.trim();
        if s.is_empty() {
            return;
        }
        if let Some(open) = s.find('{') {
            let head: Vec<String> =
                s[..open].split("::").map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect();
            let mut pre = prefix.to_vec();
            pre.extend(head);
            let inner = &s[open + 1..s.rfind('}').unwrap()];
            let (mut depth, mut start) = (0, 0);
            for (i, ch) in inner.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        parse(&inner[start..i], &pre, out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            parse(&inner[start..], &pre, out);
        } else {
            let s = s.split(" as ").next().unwrap();
            let mut path = prefix.to_vec();
            path.extend(s.split("::").map(str::trim).filter(|p| !p.is_empty()).map(String::from));
            out.push(path);
        }
    }
    let mut out = vec![];
    parse(tree, &[], &mut out);
    out
}

/// The inline modules of a file: name, and the byte range of its body.
fn inline_modules(code: &str) -> Vec<(String, std::ops::Range<usize>)> {
    let b = code.as_bytes();
    let mut found = vec![];
    let mut search = 0;
    while let Some(pos) = code[search..].find("mod ") {
        let at = search + pos;
        search = at + 4;
        if ident_byte(b, at) {
            continue;
        }
        let rest = &code[at + 4..];
        let name: String = rest.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let after = rest.trim_start()[name.len()..].trim_start();
        if name.is_empty() || !after.starts_with('{') {
            continue;
        }
        let open = code.len() - after.len();
        let mut depth = 0;
        let mut end = code.len();
        for (i, &c) in b.iter().enumerate().skip(open) {
            match c {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        found.push((name, open..end));
    }
    found
}

/// Child modules a file declares (`mod x;` or `mod x { .. }`).
fn declared_children(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let t = line.trim_start().trim_start_matches("pub(crate) ").trim_start_matches("pub ");
        if let Some(rest) = t.strip_prefix("mod ") {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// Every module path a file refers to, resolved to absolute paths in a crate.
fn references(file: &SourceFile) -> Vec<Module> {
    let code = &file.code;
    let inlines = inline_modules(code);
    let children = declared_children(code);
    // The module (with inline nesting) a byte offset lies in.
    let scope_at = |offset: usize| -> Vec<String> {
        let mut m = file.module.1.clone();
        for (name, range) in &inlines {
            if range.contains(&offset) {
                m.push(name.clone());
            }
        }
        m
    };
    let resolve = |scope: &[String], path: &[String]| -> Option<Module> {
        let first = path.first()?.as_str();
        let (krate, mut abs) = match first {
            "crate" => (file.module.0, vec![]),
            "starling" if file.module.0 == Crate::Bin => (Crate::Lib, vec![]),
            "super" | "self" => (file.module.0, scope.to_vec()),
            name if children.contains(name) => (file.module.0, scope.to_vec()),
            _ => return None,
        };
        let mut rest = path;
        if matches!(first, "crate" | "starling") {
            rest = &path[1..];
        }
        for seg in rest {
            match seg.as_str() {
                "super" => {
                    abs.pop();
                }
                "self" => {}
                s => abs.push(s.to_owned()),
            }
        }
        Some((krate, abs))
    };
    let mut refs = vec![];
    let mut masked = code.clone();
    let mut search = 0;
    while let Some(pos) = code[search..].find("use ") {
        let at = search + pos;
        search = at + 4;
        if ident_byte(code.as_bytes(), at) {
            continue;
        }
        let Some(end) = code[at..].find(';') else { break };
        let tree = &code[at + 4..at + end];
        let scope = scope_at(at);
        for path in expand(tree) {
            refs.extend(resolve(&scope, &path));
        }
        masked.replace_range(at..at + end, &" ".repeat(end));
    }
    let b = masked.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if (b[i].is_ascii_alphabetic() || b[i] == b'_') && !ident_byte(b, i) {
            let mut j = i;
            let mut path = vec![];
            loop {
                let start = j;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                path.push(masked[start..j].to_owned());
                if masked[j..].starts_with("::")
                    && masked[j + 2..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                {
                    j += 2;
                } else {
                    break;
                }
            }
            if path.len() > 1 {
                refs.extend(resolve(&scope_at(i), &path));
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    refs
}

fn sources() -> Vec<SourceFile> {
    let root = src();
    let mut paths = vec![];
    rust_files(&root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(&root).unwrap().to_path_buf();
            let code = strip(&std::fs::read_to_string(&path).unwrap());
            SourceFile { module: module_of(&rel), path: rel, code }
        })
        .collect()
}

/// The file module that `m` lies in (the longest known prefix).
fn owner(m: &Module, known: &BTreeSet<Module>) -> Option<Module> {
    (0..=m.1.len()).rev().map(|n| (m.0, m.1[..n].to_vec())).find(|p| known.contains(p))
}

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&top))
}

fn name(m: &Module) -> String {
    let krate = if m.0 == Crate::Lib { "crate" } else { "bin" };
    if m.1.is_empty() { krate.to_owned() } else { format!("{krate}::{}", m.1.join("::")) }
}

/// Edges between distinct file modules: (from, to) -> the first file line seen.
fn graph() -> BTreeMap<(Module, Module), PathBuf> {
    let files = sources();
    let known: BTreeSet<Module> = files.iter().map(|f| f.module.clone()).collect();
    let mut edges = BTreeMap::new();
    for f in &files {
        for r in references(f) {
            let Some(to) = owner(&r, &known) else { continue };
            if to != f.module && !to.1.is_empty() {
                edges.entry((f.module.clone(), to)).or_insert_with(|| f.path.clone());
            }
        }
    }
    edges
}

#[test]
fn every_library_module_has_a_layer() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared = declared_children(&strip(&lib));
    let stacked: BTreeSet<String> = LAYERS.iter().flat_map(|l| l.iter().map(|s| s.to_string())).collect();
    assert_eq!(declared, stacked, "src/lib.rs and the stack in tests/layout.rs must name the same modules");
}

#[test]
fn no_module_imports_one_on_a_higher_layer() {
    let mut upward = vec![];
    for ((from, to), file) in graph() {
        if from.0 != Crate::Lib || to.0 != Crate::Lib || from.1.is_empty() {
            continue;
        }
        let (a, b) = (layer_of(&from.1[0]), layer_of(&to.1[0]));
        match (a, b) {
            (Some(a), Some(b)) if b > a => {
                upward.push(format!("{} imports {} ({})", name(&from), name(&to), file.display()))
            }
            (None, _) | (_, None) => upward.push(format!("{} or {} has no layer", name(&from), name(&to))),
            _ => {}
        }
    }
    assert!(upward.is_empty(), "imports that go up the stack:\n{}", upward.join("\n"));
}

#[test]
fn no_two_modules_import_each_other() {
    let edges = graph();
    let mut next: BTreeMap<Module, Vec<Module>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from.clone()).or_default().push(to.clone());
    }
    // A cycle through `start` is a path from one of its successors back to it.
    let mut cycles = BTreeSet::new();
    for start in next.keys() {
        let mut stack: Vec<(Module, Vec<Module>)> = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for succ in next.get(&node).into_iter().flatten() {
                if succ == start {
                    let mut ring: Vec<String> = path.iter().map(name).collect();
                    let min = ring.iter().enumerate().min_by_key(|(_, s)| *s).map(|(i, _)| i).unwrap();
                    ring.rotate_left(min);
                    cycles.insert(ring.join(" -> "));
                } else if seen.insert(succ.clone()) {
                    let mut p = path.clone();
                    p.push(succ.clone());
                    stack.push((succ.clone(), p));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other:\n{}",
        cycles.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_checker_sees_uses_paths_and_nested_trees() {
    let file = SourceFile {
        module: (Crate::Lib, vec!["gateway".into(), "routes".into(), "native".into()]),
        path: PathBuf::from("gateway/routes/native.rs"),
        code: strip(
            "use crate::engine::{load::LoadedModel, runner::{self, EngineHandle}};\n\
             use super::super::state::AppState;\n\
             // use crate::bench::nope;\n\
             fn f() { let s = \"crate::bench::nope\"; crate::kv::arena::KvArena::new(); }\n\
             mod tests { use super::*; use crate::model::gguf; }\n",
        ),
    };
    let refs: BTreeSet<String> = references(&file).iter().map(name).collect();
    for want in [
        "crate::engine::load::LoadedModel",
        "crate::engine::runner",
        "crate::engine::runner::EngineHandle",
        "crate::gateway::state::AppState",
        "crate::kv::arena::KvArena::new",
        "crate::gateway::routes::native::*",
        "crate::model::gguf",
    ] {
        assert!(refs.contains(want), "{want} missing from {refs:?}");
    }
    assert!(!refs.iter().any(|r| r.contains("bench")), "comments and strings are not code: {refs:?}");
}
