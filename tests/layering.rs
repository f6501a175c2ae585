//! The crate's dependency rules, checked by reading the source: every `crate::`, `super::` and
//! child-module path in `src/` (outside `#[cfg(test)]` modules) is resolved to the file it names.
//!
//! 1. A top-level module imports only modules of a strictly lower layer ([`LAYERS`]): shared
//!    values and plumbing below the pipeline stages, the stages beside each other (never
//!    importing one another), the front-ends that wire them above.
//! 2. There are no import cycles between files, inside a module or across modules.
//!
//! It is a text scanner, not a compiler: it errs on the side of seeing an edge (a path in a
//! doc comment is stripped, one in a string is not a path).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layer of every top-level module: a module may import only modules of a lower layer.
const LAYERS: &[(&str, u32)] = &[
    // Plumbing with no knowledge of the product.
    ("util", 0),
    ("clock", 0),
    ("backoff", 0),
    ("validate", 0),
    ("puback", 0),
    // Shared values and cross-cutting services.
    ("model", 1),
    ("tls", 1),
    ("broker", 1),
    ("telemetry", 1),
    // Shared formats and stores: the wire protocol, the disk store, the live event bus.
    ("protocol", 2),
    ("store", 2),
    ("live", 2),
    // The pipeline stages: peers that talk only through the shared values below them.
    ("ingest", 3),
    ("process", 3),
    ("forward", 3),
    ("collect", 3),
    // Front-ends over the stages.
    ("admin", 4),
    ("check", 4),
    ("config", 5),
    ("daemon", 6),
    ("demo", 7),
    // The command-line front-ends: what each command prints and its exit code.
    ("cli", 8),
];

fn src_dir() -> PathBuf {
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

/// The module path of a file: `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`, `lib.rs` is `[]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src_dir()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] {
        parts.clear();
    }
    parts
}

/// The file that defines module `path`, if it is a file of its own.
fn file_of(path: &[String]) -> Option<PathBuf> {
    let mut base = src_dir();
    if path.is_empty() {
        return Some(base.join("lib.rs"));
    }
    for p in &path[..path.len() - 1] {
        base.push(p);
    }
    let last = path.last().unwrap();
    let flat = base.join(format!("{last}.rs"));
    let nested = base.join(last).join("mod.rs");
    [flat, nested].into_iter().find(|f| f.exists())
}

/// The deepest file a path names: `crate::a::b::Item` is `src/a/b.rs` when it exists, else
/// `src/a.rs` (or the `mod.rs` of the folder).
fn resolve(path: &[String]) -> Option<(Vec<String>, PathBuf)> {
    (1..=path.len())
        .rev()
        .find_map(|n| file_of(&path[..n]).map(|f| (path[..n].to_vec(), f)))
}

/// Source with comments, string and char literals blanked out.
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) {
            let mut j = i + 1;
            let mut hashes = 0;
            while j < b.len() && b[j] == b'#' {
                hashes += 1;
                j += 1;
            }
            if j < b.len() && b[j] == b'"' {
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                j += 1;
                while j < b.len() && !b[j..].starts_with(&close) {
                    j += 1;
                }
                i = j + close.len();
                out.push_str("\"\"");
            } else {
                out.push('r');
                i += 1;
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\''
            && i + 2 < b.len()
            && (b[i + 2] == b'\'' || (b[i + 1] == b'\\' && b[i + 3..].contains(&b'\'')))
        {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime.
            let mut j = i + 1;
            while j < b.len() && b[j] != b'\'' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
            out.push_str("' '");
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Removes `#[cfg(test)] mod name { … }` blocks: tests may import anything.
fn without_test_modules(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let trimmed = after.trim_start();
        if let Some(body) = trimmed.strip_prefix("mod ") {
            match body.find(['{', ';']) {
                Some(open) if body.as_bytes()[open] == b'{' => {
                    let mut depth = 0;
                    let mut end = body.len();
                    for (k, c) in body[open..].char_indices() {
                        match c {
                            '{' => depth += 1,
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    end = open + k + 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    rest = &body[end..];
                }
                _ => rest = after,
            }
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands one `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand_use(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut start = 0;
        let joined = if prefix.is_empty() {
            head.to_string()
        } else if head.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}::{head}")
        };
        for (k, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_use(&inner[start..k], &joined, out);
                    start = k + 1;
                }
                _ => {}
            }
        }
        expand_use(&inner[start..], &joined, out);
    } else if !tree.is_empty() {
        let tree = tree.split(" as ").next().unwrap().trim();
        out.push(if prefix.is_empty() {
            tree.to_string()
        } else {
            format!("{prefix}::{tree}")
        });
    }
}

/// Every path the file's code uses, as written (`crate::…`, `super::…`, `self::…`, `child::…`).
fn paths_in(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    // `use` declarations, braces expanded.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let boundary = at == 0 || !is_ident(rest[..at].chars().last().unwrap());
        let after = &rest[at + 4..];
        if let (true, Some(end)) = (boundary, after.find(';')) {
            expand_use(&after[..end], "", &mut paths);
            rest = &after[end..];
            continue;
        }
        rest = after;
    }
    // Paths written inline.
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        if boundary && is_ident(chars[i]) {
            let mut j = i;
            let mut path = String::new();
            loop {
                let s = j;
                while j < chars.len() && is_ident(chars[j]) {
                    j += 1;
                }
                path.extend(&chars[s..j]);
                if j + 2 < chars.len()
                    && chars[j] == ':'
                    && chars[j + 1] == ':'
                    && is_ident(chars[j + 2])
                {
                    path.push_str("::");
                    j += 2;
                } else {
                    break;
                }
            }
            if path.contains("::") {
                paths.push(path);
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    paths
}

/// The child modules a file declares (`mod x;` / `pub mod x;`).
fn child_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let l = line.trim();
        let l = l
            .strip_prefix("pub(crate) ")
            .or_else(|| l.strip_prefix("pub "))
            .unwrap_or(l);
        if let Some(name) = l.strip_prefix("mod ").and_then(|n| n.strip_suffix(';')) {
            out.insert(name.trim().to_string());
        }
    }
    out
}

struct Graph {
    /// file → files it imports, with one example path per edge.
    edges: BTreeMap<PathBuf, BTreeMap<PathBuf, String>>,
}

fn graph() -> Graph {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    files.retain(|f| f.file_name().unwrap() != "main.rs");
    files.sort();
    let mut edges: BTreeMap<PathBuf, BTreeMap<PathBuf, String>> = BTreeMap::new();
    for file in &files {
        let code = without_test_modules(&strip(&std::fs::read_to_string(file).unwrap()));
        let here = module_of(file);
        let children = child_modules(&code);
        let entry = edges.entry(file.clone()).or_default();
        for written in paths_in(&code) {
            let segs: Vec<String> = written.split("::").map(str::to_string).collect();
            let absolute: Vec<String> = match segs[0].as_str() {
                "crate" => segs[1..].to_vec(),
                "self" => here.iter().chain(&segs[1..]).cloned().collect(),
                "super" => {
                    let mut base = here.clone();
                    let mut k = 0;
                    while segs.get(k).is_some_and(|s| s == "super") {
                        base.pop();
                        k += 1;
                    }
                    base.into_iter().chain(segs[k..].iter().cloned()).collect()
                }
                child if children.contains(child) => here.iter().chain(&segs).cloned().collect(),
                _ => continue,
            };
            if let Some((_, target)) = resolve(&absolute).filter(|(_, t)| t != file) {
                entry.entry(target).or_insert(written);
            }
        }
    }
    Graph { edges }
}

fn rel(p: &Path) -> String {
    p.strip_prefix(src_dir().parent().unwrap())
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn every_top_level_module_has_a_layer() {
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(src_dir()).unwrap() {
        let path = entry.unwrap().path();
        let is_module = path.extension().is_some_and(|e| e == "rs") || path.is_dir();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if !is_module || ["lib", "main"].contains(&name.as_str()) {
            continue;
        }
        if !LAYERS.iter().any(|(m, _)| *m == name) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a layer in tests/layering.rs: {missing:?}"
    );
}

#[test]
fn modules_import_only_lower_layers() {
    let layer = |f: &Path| {
        let m = module_of(f);
        let top = m.first()?.clone();
        LAYERS
            .iter()
            .find(|(n, _)| *n == top)
            .map(|(n, l)| (*n, *l))
    };
    let mut bad = Vec::new();
    for (from, targets) in &graph().edges {
        let Some((fm, fl)) = layer(from) else {
            continue;
        };
        for (to, example) in targets {
            let Some((tm, tl)) = layer(to) else { continue };
            if fm != tm && tl >= fl {
                bad.push(format!(
                    "{} (layer {fl}) uses `{example}` of {tm} (layer {tl})",
                    rel(from)
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layering:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_import_cycles_between_files() {
    let g = graph();
    // Depth-first search with colours; report every back edge's cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum C {
        White,
        Grey,
        Black,
    }
    let mut colour: BTreeMap<&PathBuf, C> = g.edges.keys().map(|k| (k, C::White)).collect();
    let mut cycles = Vec::new();
    fn visit<'a>(
        n: &'a PathBuf,
        g: &'a Graph,
        colour: &mut BTreeMap<&'a PathBuf, C>,
        stack: &mut Vec<&'a PathBuf>,
        cycles: &mut Vec<String>,
    ) {
        colour.insert(n, C::Grey);
        stack.push(n);
        for m in g.edges.get(n).into_iter().flat_map(|t| t.keys()) {
            match colour.get(m).copied().unwrap_or(C::Black) {
                C::White => visit(m, g, colour, stack, cycles),
                C::Grey => {
                    let at = stack.iter().position(|s| *s == m).unwrap();
                    let ring: Vec<&PathBuf> = stack[at..].iter().copied().chain([m]).collect();
                    let mut names: Vec<String> = ring
                        .windows(2)
                        .map(|w| format!("{} (`{}`)", rel(w[0]), g.edges[w[0]][w[1]]))
                        .collect();
                    names.push(rel(m));
                    cycles.push(names.join(" → "));
                }
                C::Black => {}
            }
        }
        stack.pop();
        colour.insert(n, C::Black);
    }
    let keys: Vec<&PathBuf> = g.edges.keys().collect();
    for k in keys {
        if colour[k] == C::White {
            visit(k, &g, &mut colour, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_scanner_sees_grouped_super_and_inline_paths() {
    let code = "use crate::{a::B, c::{d::E, f}};\nuse super::g::H;\nfn x() { crate::i::j(); }";
    let mut p = paths_in(code);
    p.sort();
    for want in [
        "crate::a::B",
        "crate::c::d::E",
        "crate::c::f",
        "super::g::H",
        "crate::i::j",
    ] {
        assert!(p.contains(&want.to_string()), "{want} not in {p:?}");
    }
    let stripped = strip("let s = \"crate::x::y\"; // crate::z\n/* crate::w */ let c = '\"';");
    assert!(!stripped.contains("crate::"), "{stripped}");
    let t = without_test_modules("a\n#[cfg(test)]\nmod tests { use crate::x; { } }\nb");
    assert!(!t.contains("crate::x") && t.contains('b'), "{t}");
}
