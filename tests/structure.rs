//! The structure ARCHITECTURE.md promises, checked: no import circle between files, no
//! module importing from a layer above its own, and the sizes (a file at most 500 lines before
//! its tests, a function at most 120 lines and 5 blocks deep). Reads `src/` as text (comments
//! and test modules left out); the layer table below is the specification.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Layers, bottom first: a module may use its own layer and those below. The longest matching
/// prefix decides a module's layer.
const LAYERS: &[(&str, u32)] = &[
    // Leaves: no crate imports at all.
    ("error", 0),
    ("text", 0),
    ("clock", 0),
    ("shutdown", 0),
    ("kinds", 0),
    ("testutil", 0),
    // System helpers: files, descriptors, signals, logging, the on-disk layout.
    ("ops", 1),
    // The configuration, and the policy it implies for privileges.
    ("config", 2),
    ("ops::privilege", 3),
    // Job running, counters, live state, file watching.
    ("jobs", 4),
    ("metrics", 4),
    ("status", 5),
    ("watch", 4),
    // Crossing exec, and the job sources.
    ("restart", 6),
    ("source", 6),
    // The worker.
    ("worker", 7),
    // Process managers: the daemon and its supervisor.
    ("daemon", 8),
    // Entry points.
    ("cli", 9),
    ("client", 9),
    ("lib", 10),
    ("main", 10),
];

fn layer(module: &str) -> u32 {
    LAYERS
        .iter()
        .filter(|(p, _)| module == *p || module.starts_with(&format!("{p}::")))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module {module} is in no layer: add it to LAYERS"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` -> `a::b`; `src/a/mod.rs` -> `a`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") && parts.len() > 1 {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without comments and without its `#[cfg(test)]` tail.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string literal is rare in our code; good enough for paths.
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path the code names: `crate::a::b::Item` and `super::x`.
fn imports(
    module: &str,
    is_mod_rs: bool,
    code: &str,
    modules: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let resolve = |path: Vec<&str>, found: &mut BTreeSet<String>| {
        for k in (1..=path.len()).rev() {
            let cand = path[..k].join("::");
            if modules.contains(&cand) {
                if cand != module && !module.starts_with(&format!("{cand}::")) {
                    found.insert(cand);
                }
                return;
            }
        }
    };
    for (i, _) in code.match_indices("crate::") {
        if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &code[i + 7..];
        let path: Vec<&str> = rest
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .next()
            .unwrap_or("")
            .split("::")
            .filter(|s| !s.is_empty())
            .collect();
        resolve(path, &mut found);
    }
    // `super::` from `a::b` (a file) is `a`; from `a::b` (a mod.rs) it is `a` too.
    let parent: Vec<&str> = {
        let mut p: Vec<&str> = module.split("::").collect();
        p.pop();
        let _ = is_mod_rs;
        p
    };
    for (i, _) in code.match_indices("super::") {
        if i > 0 && code[..i].ends_with("super::") {
            continue;
        }
        let rest = &code[i + 7..];
        let name = rest
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        let mut path = parent.clone();
        if !name.is_empty() && name != "super" {
            path.push(name);
        }
        resolve(path, &mut found);
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    files
        .iter()
        .map(|f| {
            let m = module_of(&src, f);
            let is_mod = f.file_name().is_some_and(|n| n == "mod.rs");
            let deps = imports(&m, is_mod, &code(&fs::read_to_string(f).unwrap()), &modules);
            (m, deps)
        })
        .collect()
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let g = graph();
    let mut up = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            if layer(d) > layer(m) {
                up.push(format!(
                    "{m} (layer {}) uses {d} (layer {})",
                    layer(m),
                    layer(d)
                ));
            }
        }
    }
    assert!(up.is_empty(), "upward imports:\n  {}", up.join("\n  "));
}

#[test]
fn no_import_circles_between_files() {
    let g = graph();
    // A circle is a strongly connected component of more than one file (Tarjan's algorithm,
    // iterative enough for a few hundred files).
    let names: Vec<&String> = g.keys().collect();
    let index_of: BTreeMap<&String, usize> =
        names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let adj: Vec<Vec<usize>> = names
        .iter()
        .map(|n| {
            g[*n]
                .iter()
                .filter_map(|d| index_of.get(d).copied())
                .collect()
        })
        .collect();
    let n = names.len();
    let (mut index, mut low, mut on, mut stack, mut next) = (
        vec![usize::MAX; n],
        vec![0; n],
        vec![false; n],
        Vec::new(),
        0,
    );
    let mut circles = Vec::new();
    fn visit(
        v: usize,
        adj: &[Vec<usize>],
        st: &mut (Vec<usize>, Vec<usize>, Vec<bool>, Vec<usize>, usize),
        circles: &mut Vec<Vec<usize>>,
    ) {
        st.0[v] = st.4;
        st.1[v] = st.4;
        st.4 += 1;
        st.3.push(v);
        st.2[v] = true;
        for &w in &adj[v] {
            if st.0[w] == usize::MAX {
                visit(w, adj, st, circles);
                st.1[v] = st.1[v].min(st.1[w]);
            } else if st.2[w] {
                st.1[v] = st.1[v].min(st.0[w]);
            }
        }
        if st.1[v] == st.0[v] {
            let mut comp = Vec::new();
            while let Some(w) = st.3.pop() {
                st.2[w] = false;
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                circles.push(comp);
            }
        }
    }
    let mut st = (index.clone(), low.clone(), on.clone(), stack.clone(), next);
    for v in 0..n {
        if st.0[v] == usize::MAX {
            visit(v, &adj, &mut st, &mut circles);
        }
    }
    (index, low, on, stack, next) = st;
    let _ = (index, low, on, stack, next);
    let shown: Vec<String> = circles
        .iter()
        .map(|c| {
            c.iter()
                .map(|i| names[*i].as_str())
                .collect::<Vec<_>>()
                .join(" <-> ")
        })
        .collect();
    assert!(
        shown.is_empty(),
        "import circles:\n  {}",
        shown.join("\n  ")
    );
}

/// Strips string and char literals (their braces are not blocks).
fn without_literals(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        match (in_str, c) {
            (true, '\\') => {
                chars.next();
            }
            (true, '"') => in_str = false,
            (true, _) => {}
            (false, '"') => in_str = true,
            (false, '\'') => {
                // A char literal such as '{' (a lifetime has no closing quote two chars on).
                let mut ahead = chars.clone();
                let first = ahead.next();
                let skip = if first == Some('\\') { 3 } else { 2 };
                let mut probe = chars.clone();
                if probe.nth(skip - 1) == Some('\'') {
                    for _ in 0..skip {
                        chars.next();
                    }
                } else {
                    out.push(c);
                }
            }
            (false, _) => out.push(c),
        }
    }
    out
}

#[test]
fn files_functions_and_nesting_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut over = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).unwrap();
        let code = code(&text);
        let name = file.strip_prefix(&src).unwrap().display().to_string();
        let lines = code.lines().count();
        if lines > 500 {
            over.push(format!(
                "{name}: {lines} lines before its tests (at most 500)"
            ));
        }
        // (function name, its depth, its first line, the deepest block in it)
        let mut depth = 0usize;
        let mut functions: Vec<(String, usize, usize, usize)> = Vec::new();
        for (n, line) in code.lines().enumerate() {
            let line = without_literals(line);
            if let Some(at) = line.find("fn ") {
                let starts = at == 0 || !line.as_bytes()[at - 1].is_ascii_alphanumeric();
                let name: String = line[at + 3..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if starts && !name.is_empty() && line.contains('{') {
                    functions.push((name, depth, n, 0));
                }
            }
            for c in line.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        if let Some(f) = functions.last_mut() {
                            f.3 = f.3.max(depth - f.1 - 1);
                        }
                    }
                    '}' => {
                        depth = depth.saturating_sub(1);
                        while functions.last().is_some_and(|f| depth <= f.1) {
                            let (fname, _, first, deepest) = functions.pop().unwrap();
                            let len = n + 1 - first;
                            if len > 120 {
                                over.push(format!(
                                    "{name}: fn {fname} is {len} lines (at most 120)"
                                ));
                            }
                            if deepest > 5 {
                                over.push(format!(
                                    "{name}: fn {fname} nests {deepest} blocks deep (at most 5)"
                                ));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(over.is_empty(), "{}", over.join("\n"));
}
