//! The library's modules import each other without cycles: a module never uses, directly or
//! through others, a module that uses it. The graph is read from the sources (`crate::` and
//! `super::` paths, `use` groups included) with one node per file; a cycle fails this test and
//! is printed. Unit-test modules at the end of a file (`#[cfg(test)]`) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A crate's module files: module path (`["hypervisor", "libvirt"]`) -> file.
fn modules(src: &Path, skip: &BTreeSet<String>) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap();
            let mut parts: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                parts.pop();
            }
            if parts.len() == 1 && skip.contains(&parts[0]) {
                continue;
            }
            out.insert(parts, p);
        }
    }
    out
}

/// The paths a source names after `crate::` or `super::`, as segment lists relative to the
/// crate root, with `use` groups expanded.
fn paths_in(text: &str, here: &[String]) -> Vec<Vec<String>> {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !text.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &text[i..];
        let start = if rest.starts_with("crate::") {
            Some(Vec::new())
        } else if rest.starts_with("super::") {
            let mut base = here.to_vec();
            base.pop();
            Some(base)
        } else {
            None
        };
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        match start {
            Some(base) if boundary => {
                let (paths, used) = parse_path(rest, base);
                out.extend(paths);
                i += used.max(1);
            }
            _ => i += 1,
        }
    }
    out
}

/// Parses `crate::a::b`, `super::super::a`, `crate::a::{b, c::d}` at the start of `s`.
fn parse_path(s: &str, mut base: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let mut i = 0;
    let b = s.as_bytes();
    let mut first = true;
    loop {
        let ident_start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        let ident = &s[ident_start..i];
        match ident {
            "crate" if first => {}
            "super" => {
                base.pop();
            }
            "self" | "" => {}
            _ => base.push(ident.to_string()),
        }
        first = false;
        if s[i..].starts_with("::{") {
            i += 3;
            let mut out = Vec::new();
            let mut depth = 1;
            let mut item_start = i;
            while i < b.len() && depth > 0 {
                match b[i] {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    _ => {}
                }
                if (b[i] == b',' && depth == 1) || depth == 0 {
                    let item = s[item_start..i].trim();
                    if !item.is_empty() {
                        let (sub, _) = parse_path(item, base.clone());
                        out.extend(sub);
                    }
                    item_start = i + 1;
                }
                i += 1;
            }
            return (out, i);
        }
        if s[i..].starts_with("::")
            && s[i + 2..].starts_with(|c: char| c.is_alphabetic() || c == '_')
        {
            i += 2;
            continue;
        }
        return (vec![base], i);
    }
}

/// The module file a path ends in: the longest prefix of it that is a module.
fn resolve<'a>(
    path: &[String],
    mods: &'a BTreeMap<Vec<String>, PathBuf>,
) -> Option<&'a Vec<String>> {
    (1..=path.len())
        .rev()
        .find_map(|n| mods.get_key_value(&path[..n]).map(|(k, _)| k))
}

fn graph(src: &Path, skip: &[&str]) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let skip: BTreeSet<String> = skip.iter().map(|s| s.to_string()).collect();
    let mods = modules(src, &skip);
    let mut g = BTreeMap::new();
    for (m, file) in &mods {
        let text = std::fs::read_to_string(file).unwrap();
        let mut deps = BTreeSet::new();
        for p in paths_in(&text, m) {
            // The crate root re-exports (`crate::Error`): the module they come from.
            let p = match p.first().map(String::as_str) {
                Some("Error") | Some("Result") if p.len() == 1 => vec!["error".to_string()],
                _ => p,
            };
            if let Some(target) = resolve(&p, &mods) {
                if target != m {
                    deps.insert(target.clone());
                }
            }
        }
        g.insert(m.clone(), deps);
    }
    g
}

/// A cycle of `g`, if it has one.
fn find_cycle(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: &Vec<String>,
        g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        marks: &mut BTreeMap<Vec<String>, Mark>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        marks.insert(n.clone(), Mark::Open);
        stack.push(n.clone());
        for d in g.get(n).into_iter().flatten() {
            match marks.get(d).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let at = stack.iter().position(|s| s == d).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(d, g, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(n.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in g.keys() {
        if marks.get(n).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(n, g, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn show(cycle: &[Vec<String>]) -> String {
    cycle
        .iter()
        .map(|m| {
            if m.is_empty() {
                "lib".to_string()
            } else {
                m.join("::")
            }
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// The binary's own modules (declared in `main.rs`), which are another crate.
fn binary_modules(src: &Path) -> Vec<String> {
    let main = std::fs::read_to_string(src.join("main.rs")).unwrap();
    let mut out = vec!["main".to_string()];
    for line in main.lines() {
        if let Some(m) = line.trim().strip_prefix("mod ") {
            out.push(m.trim_end_matches(';').trim().to_string());
        }
    }
    out
}

#[test]
fn the_library_has_no_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let bin = binary_modules(&src);
    let skip: Vec<&str> = bin.iter().map(String::as_str).collect();
    let g = graph(&src, &skip);
    assert!(g.len() > 20, "too few modules found: {:?}", g.keys());
    assert!(
        g[&vec!["backup".to_string()]].contains(&vec!["hypervisor".to_string()]),
        "the graph misses an import it should see"
    );
    if let Some(c) = find_cycle(&g) {
        panic!("import cycle: {}", show(&c));
    }
    let repo = graph(&root.join("crates/repo/src"), &[]);
    assert!(
        repo.len() > 5,
        "too few repository modules: {:?}",
        repo.keys()
    );
    if let Some(c) = find_cycle(&repo) {
        panic!("import cycle in the repository crate: {}", show(&c));
    }
}

#[test]
fn the_cycle_finder_sees_a_cycle_through_a_use_group() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("h")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a; pub mod h;").unwrap();
    std::fs::write(src.join("a.rs"), "// é → ü\nuse crate::h::{x::Y, z};").unwrap();
    std::fs::write(src.join("h/mod.rs"), "pub mod x;").unwrap();
    std::fs::write(src.join("h/x.rs"), "fn f() { super::super::a::g() }").unwrap();
    let c = find_cycle(&graph(src, &[])).expect("a -> h::x -> a");
    assert_eq!(show(&c), "a -> h::x -> a");
    std::fs::write(src.join("h/x.rs"), "#[cfg(test)] mod t { use crate::a; }").unwrap();
    assert!(find_cycle(&graph(src, &[])).is_none());
}
