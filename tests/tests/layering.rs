//! The code's structure, checked: no import cycle between the modules of any
//! crate, and no non-test function in the product crates over 120 lines.
//!
//! Modules are files (`a.rs` and `a/mod.rs` are module `a`). An edge A -> B
//! is any path in A that names B: `use crate::b::..`, `use super::..`, or a
//! `crate::b::X` written inline. A module naming its own descendant is not an
//! edge (a parent owns its children); a child naming an ancestor is. So
//! `node/mod.rs` using `node/control.rs`, which uses a type from
//! `node/mod.rs`, is a cycle: shared types belong in a leaf both import.
//!
//! The product crates are `bgp`, `agent` and `cni` (with their sub-crates);
//! `tests/` itself is test code, so only the cycle rule applies to it.
//! Parsing is `syn`'s, so strings, comments and macros cannot fool it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use syn::spanned::Spanned;
use syn::visit::Visit;

/// Longest non-test function allowed in the product crates.
const MAX_FN_LINES: usize = 120;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every `src/` directory of a crate under `dir` (the crate itself and any
/// crate nested in it), skipping build output.
fn crate_sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.join("Cargo.toml").is_file() && d.join("src").is_dir() {
            out.push(d.join("src"));
        }
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name();
            if p.is_dir()
                && name != "target"
                && name != "src"
                && !name.to_string_lossy().starts_with('.')
            {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn rust_files(src: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module path of a file: `src/lib.rs` -> [], `src/a/mod.rs` -> [a],
/// `src/a/b.rs` -> [a, b]. Binary roots (`main.rs`, `bin/*.rs`) are roots of
/// their own crates and get `None`.
fn module_of(src: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src).unwrap();
    let parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    if parts.first().is_some_and(|p| p == "bin") || parts == ["main.rs"] {
        return None;
    }
    let mut m: Vec<String> = parts
        .iter()
        .map(|p| p.trim_end_matches(".rs").to_string())
        .collect();
    if m.last().is_some_and(|l| l == "mod" || l == "lib") {
        m.pop();
    }
    Some(m)
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string() == "test")
    })
}

/// Collects the `crate::`/`super::`/`self::` paths of one file (outside
/// test modules) and its functions' lengths.
struct FileScan {
    /// Paths as segments, relative to the file's module: `crate::a::b` is
    /// ["crate", "a", "b"], `super::x` is ["super", "x"].
    paths: Vec<Vec<String>>,
    /// (function name, first line, line count).
    fns: Vec<(String, usize, usize)>,
}

impl FileScan {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.path(prefix, Some(n.ident.to_string())),
            syn::UseTree::Rename(r) => self.path(prefix, Some(r.ident.to_string())),
            syn::UseTree::Glob(_) => self.path(prefix, None),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    fn path(&mut self, prefix: &[String], last: Option<String>) {
        let mut p = prefix.to_vec();
        if let Some(l) = last.filter(|l| l != "self") {
            p.push(l);
        }
        if p.first()
            .is_some_and(|f| f == "crate" || f == "super" || f == "self")
        {
            self.paths.push(p);
        }
    }

    fn function(&mut self, name: String, span: proc_macro2::Span) {
        let (start, end) = (span.start().line, span.end().line);
        self.fns.push((name, start, end + 1 - start));
    }
}

impl<'ast> Visit<'ast> for FileScan {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // Inline test modules are test code; an inline non-test module is
        // scanned as part of its file (its `super::` is then approximate,
        // which only matters for inline modules, and the crates have none
        // besides tests).
        if !is_cfg_test(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_cfg_test(&f.attrs) {
            self.function(f.sig.ident.to_string(), f.span());
            syn::visit::visit_item_fn(self, f);
        }
    }
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_cfg_test(&f.attrs) {
            self.function(f.sig.ident.to_string(), f.span());
            syn::visit::visit_impl_item_fn(self, f);
        }
    }
    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if f.default.is_some() {
            self.function(f.sig.ident.to_string(), f.span());
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }
    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.path(&segs, None);
        syn::visit::visit_path(self, p);
    }
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // Paths inside macro arguments (`matches!(x, crate::a::B)`) are
        // tokens, not syntax: pick out `crate :: a :: b` runs by hand.
        let toks: Vec<String> = m
            .tokens
            .clone()
            .into_iter()
            .map(|t| t.to_string())
            .collect();
        let mut i = 0;
        while i < toks.len() {
            if toks[i] == "crate" || toks[i] == "super" {
                let mut p = vec![toks[i].clone()];
                let mut j = i + 1;
                while j + 2 < toks.len() + 1
                    && toks.get(j).is_some_and(|t| t == ":")
                    && toks.get(j + 1).is_some_and(|t| t == ":")
                {
                    match toks.get(j + 2) {
                        Some(id) if id.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                            p.push(id.clone());
                            j += 3;
                        }
                        _ => break,
                    }
                }
                if p.len() > 1 {
                    self.paths.push(p);
                }
                i = j;
            } else {
                i += 1;
            }
        }
        syn::visit::visit_macro(self, m);
    }
}

struct Crate {
    src: PathBuf,
    /// Module path -> file.
    modules: BTreeMap<Vec<String>, PathBuf>,
    /// Module -> modules it names (not its descendants), with one example path each.
    edges: BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>>,
    long_fns: Vec<String>,
}

fn scan_crate(src: &Path) -> Crate {
    let files = rust_files(src);
    let mut modules = BTreeMap::new();
    let mut scans = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut scan = FileScan {
            paths: Vec::new(),
            fns: Vec::new(),
        };
        scan.visit_file(&ast);
        let m = module_of(src, f);
        if let Some(m) = &m {
            modules.insert(m.clone(), f.clone());
        }
        scans.push((f.clone(), m, scan));
    }
    let mut edges: BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>> = BTreeMap::new();
    let mut long_fns = Vec::new();
    for (file, m, scan) in &scans {
        for (name, line, len) in &scan.fns {
            if *len > MAX_FN_LINES {
                long_fns.push(format!("{}:{line} fn {name}: {len} lines", file.display()));
            }
        }
        let Some(m) = m else { continue };
        for p in &scan.paths {
            let Some(abs) = resolve(m, p) else { continue };
            // The longest prefix that is a module of this crate.
            let target = (0..=abs.len())
                .rev()
                .map(|n| abs[..n].to_vec())
                .find(|pre| modules.contains_key(pre))
                .unwrap_or_default();
            // The crate root only declares modules and re-exports; a module
            // naming a descendant of its own is ownership, not a dependency.
            if target.is_empty() || target.starts_with(m) {
                continue;
            }
            edges
                .entry(m.clone())
                .or_default()
                .entry(target)
                .or_insert_with(|| p.join("::"));
        }
    }
    Crate {
        src: src.to_path_buf(),
        modules,
        edges,
        long_fns,
    }
}

/// `crate::a::b` and `super::x` written in module `m`, as an absolute path.
fn resolve(m: &[String], p: &[String]) -> Option<Vec<String>> {
    let mut base: Vec<String> = m.to_vec();
    let mut rest = p;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// Cycles at every depth of the module tree: first between whole top-level
/// modules (`model` and `ipam` with everything inside them), then one level
/// deeper, down to single files. A folder that names another folder which
/// names it back is a cycle even when no two files do.
fn cycles(c: &Crate) -> Vec<String> {
    let depth = c.modules.keys().map(Vec::len).max().unwrap_or(0);
    let mut out: Vec<String> = Vec::new();
    for d in 1..=depth {
        let cut = |m: &Vec<String>| m[..m.len().min(d)].to_vec();
        let mut edges: BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>> = BTreeMap::new();
        for (from, tos) in &c.edges {
            for (to, via) in tos {
                let (f, t) = (cut(from), cut(to));
                if !t.starts_with(&f) {
                    edges
                        .entry(f)
                        .or_default()
                        .entry(t)
                        .or_insert_with(|| via.clone());
                }
            }
        }
        let modules: BTreeSet<Vec<String>> = c.modules.keys().map(cut).collect();
        for found in cycles_in(&c.src, &modules, &edges) {
            if !out.contains(&found) {
                out.push(found);
            }
        }
    }
    out
}

/// One cycle per group of modules that reach each other, written as
/// `a -> b -> a` with the path that makes each edge.
fn cycles_in(
    src: &Path,
    modules: &BTreeSet<Vec<String>>,
    edges: &BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>>,
) -> Vec<String> {
    let nodes: Vec<&Vec<String>> = modules.iter().collect();
    let mut out = Vec::new();
    let mut seen_in_cycle: BTreeSet<Vec<String>> = BTreeSet::new();
    for start in nodes {
        if seen_in_cycle.contains(start) {
            continue;
        }
        // Shortest path back to `start` by breadth-first search.
        let mut prev: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start.clone()]);
        let mut found = None;
        'bfs: while let Some(n) = queue.pop_front() {
            for next in edges.get(&n).into_iter().flat_map(|e| e.keys()) {
                if next == start {
                    found = Some(n.clone());
                    break 'bfs;
                }
                if !prev.contains_key(next) {
                    prev.insert(next.clone(), n.clone());
                    queue.push_back(next.clone());
                }
            }
        }
        let Some(mut last) = found else { continue };
        let mut chain = vec![start.clone()];
        let mut back = vec![last.clone()];
        while &last != start {
            last = prev[&last].clone();
            if &last != start {
                back.push(last.clone());
            }
        }
        back.reverse();
        chain.extend(back);
        chain.push(start.clone());
        let name = |m: &Vec<String>| {
            if m.is_empty() {
                "crate".to_string()
            } else {
                m.join("::")
            }
        };
        let mut text = name(&chain[0]);
        for w in chain.windows(2) {
            let via = &edges[&w[0]][&w[1]];
            text += &format!(" -> {} (`{via}`)", name(&w[1]));
        }
        for m in &chain {
            seen_in_cycle.insert(m.clone());
        }
        out.push(format!("{}: {text}", src.display()));
    }
    out
}

fn all_crates() -> Vec<(bool, Crate)> {
    let root = repo();
    let mut out = Vec::new();
    for (dir, product) in [
        ("bgp", true),
        ("agent", true),
        ("cni", true),
        ("tests", false),
    ] {
        for src in crate_sources(&root.join(dir)) {
            out.push((product, scan_crate(&src)));
        }
    }
    assert!(
        out.len() >= 4,
        "found only {} crates under {}",
        out.len(),
        root.display()
    );
    out
}

#[test]
fn no_import_cycle_between_modules() {
    let found: Vec<String> = all_crates().iter().flat_map(|(_, c)| cycles(c)).collect();
    assert!(
        found.is_empty(),
        "import cycles (break each by moving the shared items into a leaf module):\n{}",
        found.join("\n")
    );
}

#[test]
fn no_product_function_over_the_limit() {
    let long: Vec<String> = all_crates()
        .into_iter()
        .filter(|(p, _)| *p)
        .flat_map(|(_, c)| c.long_fns)
        .collect();
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them into named steps):\n{}",
        long.join("\n")
    );
}

/// The checker itself: a made-up crate with a known cycle and a long function.
#[test]
fn the_checker_finds_a_planted_cycle_and_a_long_function() {
    let dir = std::env::temp_dir().join(format!("starling-layering-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\n").unwrap();
    std::fs::write(
        src.join("a/mod.rs"),
        "pub mod inner;\nuse crate::b::X;\npub struct Y;\n",
    )
    .unwrap();
    std::fs::write(src.join("a/inner.rs"), "use super::Y;\n").unwrap();
    let long_body = "    let _ = 1;\n".repeat(MAX_FN_LINES);
    std::fs::write(
        src.join("b.rs"),
        format!("pub struct X;\nfn f() {{ let _ = crate::a::Y; }}\nfn g() {{\n{long_body}}}\n"),
    )
    .unwrap();
    std::fs::write(
        src.join("c.rs"),
        "#[cfg(test)]\nmod tests { use crate::a::Y; }\nfn h() { let s = \"crate::b::X {\"; }\n",
    )
    .unwrap();
    let c = scan_crate(&src);
    let found = cycles(&c);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("a -> b (`crate::b::X`) -> a (`crate::a::Y`)")
            || found[0].contains("b -> a"),
        "{found:?}"
    );
    // a::inner -> a is a child naming its parent, but a does not name inner
    // back beyond owning it, so it is no cycle; c's test module and string
    // are not edges.
    assert!(
        !found[0].contains("inner") && !found[0].contains(" c"),
        "{found:?}"
    );
    assert_eq!(c.long_fns.len(), 1, "{:?}", c.long_fns);
    assert!(c.long_fns[0].contains("fn g"), "{:?}", c.long_fns);
}
