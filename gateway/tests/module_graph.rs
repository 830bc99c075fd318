//! The gateway's top-level modules form no import cycle: a module that depends on another never
//! hears back from it (the pipeline knows neither the Kubernetes watchers nor the runtime nor the
//! fronts that call it). The graph is read from the sources: every `crate::<module>` path
//! outside a `#[cfg(test)] mod tests`, grouped imports (`crate::{a, b::c}`) included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules a source text names through `crate::`.
fn named_modules(text: &str) -> BTreeSet<String> {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top level of the group only: `a::{x, y}` names `a`, and so does `a`.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

fn gateway_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g = Graph::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let deps = g.entry(top.clone()).or_default();
        deps.extend(named_modules(&text).into_iter().filter(|m| *m != top));
    }
    g
}

/// Every cycle's modules (strongly connected components of more than one module), by Tarjan.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.stack.contains(&w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let at = t.stack.iter().rposition(|x| *x == v).unwrap();
            let scc: Vec<String> = t.stack.drain(at..).map(str::to_string).collect();
            if scc.len() > 1 {
                t.out.push(scc);
            }
        }
    }
    let mut t = T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), out: Vec::new() };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn the_gateway_modules_form_no_import_cycle() {
    let g = gateway_graph();
    // The graph is really read: the pipeline's known dependencies are in it.
    assert!(g["pipeline"].contains("audit") && g["pipeline"].contains("inputs"), "{g:#?}");
    assert!(g["front"].contains("pipeline") && g["server"].contains("k8s"), "{g:#?}");
    let found = cycles(&g);
    assert!(found.is_empty(), "import cycles between gateway modules: {found:?}\n{g:#?}");
}

#[test]
fn cycles_and_grouped_imports_are_found() {
    let named = named_modules(
        "use crate::{audit::{Event, End}, k8s, pipeline::Pipeline};\nfn f() { crate::target::x() }\n#[cfg(test)]\nmod tests { use crate::server; }",
    );
    assert_eq!(named, ["audit", "k8s", "pipeline", "target"].map(String::from).into());
    let mut g = Graph::new();
    for (a, b) in [("pipeline", "k8s"), ("k8s", "identity"), ("identity", "pipeline"), ("front", "pipeline")] {
        g.entry(a.into()).or_default().insert(b.into());
    }
    let found = cycles(&g);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].iter().cloned().collect::<BTreeSet<_>>(),
        ["identity", "k8s", "pipeline"].map(String::from).into()
    );
}
