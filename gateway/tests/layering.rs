//! The gateway's modules form layers: none reaches, through any chain of `crate::` references,
//! back to itself. A cycle is how helpers end up living above their users (the reason
//! `parse_endpoint` is in config.rs and the coalescer takes a `Target`); this keeps it so.

use std::collections::{BTreeMap, BTreeSet};

/// Module name -> the modules its source names as `crate::<module>`.
fn references() -> BTreeMap<String, BTreeSet<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Only the module's own code: its tests may use anything.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let mut uses = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let module: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !module.is_empty() && module != name {
                uses.insert(module);
            }
        }
        // `use crate::{a, b::C}` groups.
        for (i, _) in code.match_indices("crate::{") {
            let group = &code[i + "crate::{".len()..];
            let group = &group[..group.find('}').unwrap_or(0)];
            for part in group.split(',') {
                let module: String = part.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !module.is_empty() && module != name {
                    uses.insert(module);
                }
            }
        }
        graph.insert(name, uses);
    }
    graph
}

/// A chain of references from `start` back to it, if there is one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[test]
fn no_gateway_module_reaches_back_to_itself() {
    let graph = references();
    assert!(graph.len() >= 10, "read the gateway's modules: {:?}", graph.keys());
    assert!(graph["service"].contains("topology"), "the reference scan sees `crate::` uses: {graph:?}");
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            panic!("gateway modules import each other in a circle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_scan_finds_a_cycle_when_there_is_one() {
    let mut graph = references();
    graph.get_mut("config").unwrap().insert("topology".into());
    assert!(cycle_from(&graph, "config").is_some());
}
