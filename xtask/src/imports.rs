//! The agent's top-level modules import one another one way only: `cargo xtask test` fails on
//! an import cycle between them, naming the imports that make it.
//!
//! Every path that starts at the crate root (`crate::x`, or `super::x` out of a top-level file)
//! counts, in `use` items and in expressions alike; test-only code (`#[cfg(test)]`) does not.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use syn::visit::Visit;

/// Where one module imports another: `file:line`.
type Edges = BTreeMap<(String, String), Vec<String>>;

/// Checks the crate whose sources are in `src` (`egress-user/src`).
pub fn check(src: &Path) -> Result<()> {
    let mut files = Vec::new();
    collect(src, &mut files)?;
    let mut sources = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let relative = file.strip_prefix(src).unwrap_or(&file).to_path_buf();
        sources.push((relative, text));
    }
    let edges = edges(&sources)?;
    let cycles = cycles(&edges);
    if cycles.is_empty() {
        return Ok(());
    }
    let mut report = String::new();
    for cycle in cycles {
        report.push_str(&format!("import cycle between {}:\n", cycle.join(", ")));
        for ((from, to), places) in &edges {
            if cycle.contains(from) && cycle.contains(to) {
                report.push_str(&format!("  {from} -> {to}: {}\n", places.join(", ")));
            }
        }
    }
    bail!("{report}make the imports go one way (see egress-user/src/lib.rs for the order)")
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// The imports between top-level modules of the files (paths relative to `src`, and texts).
fn edges(sources: &[(PathBuf, String)]) -> Result<Edges> {
    let mut edges = Edges::new();
    for (path, text) in sources {
        let Some(module) = top_module(path) else { continue };
        let file = syn::parse_file(text).with_context(|| format!("parsing {}", path.display()))?;
        let mut visitor = Imports {
            depth: module_depth(path),
            found: Vec::new(),
        };
        visitor.visit_file(&file);
        for (target, line) in visitor.found {
            if target != module {
                edges
                    .entry((module.clone(), target))
                    .or_default()
                    .push(format!("{}:{line}", path.display()));
            }
        }
    }
    Ok(edges)
}

/// The top-level module a file belongs to (none for the crate root and main).
fn top_module(path: &Path) -> Option<String> {
    let first = path
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(stem) => Some(stem.to_owned()),
        None => Some(first),
    }
}

/// How deep below the crate root the file's module is: `agent.rs` 1, `proxy/mod.rs` 1,
/// `proxy/accept.rs` 2.
fn module_depth(path: &Path) -> usize {
    let parts = path.components().count();
    if path.file_name().is_some_and(|n| n == "mod.rs") {
        parts - 1
    } else {
        parts
    }
}

struct Imports {
    depth: usize,
    /// (top-level module named, line)
    found: Vec<(String, usize)>,
}

impl Imports {
    /// The top-level module a path from this file starts in, if it leaves the file's own.
    fn note(&mut self, segments: &[String], line: usize) {
        let mut depth = self.depth;
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                depth = 0;
                rest = &rest[1..];
            }
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    depth = depth.saturating_sub(1);
                    rest = &rest[1..];
                }
            }
            _ => return,
        }
        if depth == 0
            && let Some(first) = rest.first()
        {
            self.found.push((first.clone(), line));
        }
    }
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg")
            && attr
                .parse_args::<syn::Meta>()
                .is_ok_and(|meta| meta.path().is_ident("test"))
    })
}

/// The paths a `use` tree names, each as its segments.
fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => out.push([prefix.clone(), vec![n.ident.to_string()]].concat()),
        syn::UseTree::Rename(r) => out.push([prefix.clone(), vec![r.ident.to_string()]].concat()),
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => g.items.iter().for_each(|item| use_paths(item, prefix, out)),
    }
}

impl<'ast> Visit<'ast> for Imports {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            syn::Item::Trait(t) => &t.attrs,
            syn::Item::Type(t) => &t.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_test_only(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        let line = item.use_token.span.start().line;
        let mut paths = Vec::new();
        use_paths(&item.tree, &mut Vec::new(), &mut paths);
        for path in paths {
            self.note(&path, line);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        let line = path.segments.first().map_or(0, |s| s.ident.span().start().line);
        self.note(&segments, line);
        syn::visit::visit_path(self, path);
    }
}

/// The strongly connected components of more than one module (Tarjan), each sorted.
fn cycles(edges: &Edges) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        graph.entry(from).or_default().insert(to);
        graph.entry(to).or_default();
    }
    struct Tarjan<'a> {
        graph: &'a BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for &w in &self.graph[v] {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for &v in graph.keys() {
        if !tarjan.index.contains_key(v) {
            tarjan.visit(v);
        }
    }
    tarjan.found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        files
            .iter()
            .map(|(path, text)| (PathBuf::from(path), text.to_string()))
            .collect()
    }

    #[test]
    fn a_cycle_is_found_with_the_imports_that_make_it() {
        let files = sources(&[
            ("config/mod.rs", "use crate::dns::server::system_resolver;\n"),
            (
                "dns/server.rs",
                "fn f() { let _ = super::super::proxy::Shared::new(); }\n",
            ),
            ("proxy/mod.rs", "use crate::{config::Config, route::plan};\n"),
            (
                "route/plan.rs",
                "#[cfg(test)]\nmod tests { use crate::config::Config; }\n",
            ),
        ]);
        let edges = edges(&files).unwrap();
        assert_eq!(
            cycles(&edges),
            vec![vec!["config".to_owned(), "dns".to_owned(), "proxy".to_owned()]]
        );
        assert_eq!(
            edges[&("dns".to_owned(), "proxy".to_owned())],
            vec!["dns/server.rs:1"]
        );
        // Test-only imports do not count.
        assert!(!edges.contains_key(&("route".to_owned(), "config".to_owned())));
    }

    #[test]
    fn imports_inside_a_module_and_one_way_imports_are_fine() {
        let files = sources(&[
            (
                "agent.rs",
                "use super::config::Settings;\nuse crate::kernel::Kernel;\n",
            ),
            (
                "proxy/accept.rs",
                "use super::{decision::Decision, relay};\nuse crate::agent::Agent;\n",
            ),
            ("kernel/mod.rs", "use crate::route::policy::Policy;\n"),
            ("lib.rs", "mod agent; mod proxy; pub use cli::main;\n"),
        ]);
        let edges = edges(&files).unwrap();
        assert!(cycles(&edges).is_empty());
        assert!(edges.contains_key(&("agent".to_owned(), "config".to_owned())));
        assert!(!edges.contains_key(&("proxy".to_owned(), "decision".to_owned())));
    }

    /// The agent as it is: no cycle.
    #[test]
    fn the_agent_has_no_import_cycle() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../egress-user/src");
        check(&src).unwrap();
    }
}
