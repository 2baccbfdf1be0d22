//! The docker deployment's files agree with the code (the deployment itself runs behind its own
//! command, docker/campaign, since it builds images and takes minutes): every metric the
//! Grafana dashboard queries is one a tandem process records, and every service the fault
//! campaign reaches is in the compose file, in the datacenter the campaign thinks it is in.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Rust sources of the workspace (not tests: a metric only a test names is not recorded).
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if !["target", "tests", ".git", "docker", "docs"].contains(&name.as_str()) {
                sources(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
}

/// The `tandem_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tandem_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_dashboard_query_names_metrics_tandem_records() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("docker/grafana/tandem.json")).unwrap()).unwrap();
    let mut code = String::new();
    sources(&root(), &mut code);
    let mut queried = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "the dashboard lost panels: {}", panels.len());
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert!(!expr.trim().is_empty(), "panel {} has an empty query", panel["title"]);
            queried.extend(metric_names(expr));
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        // Histograms are recorded under their base name; Prometheus adds these suffixes.
        let base = ["_bucket", "_count", "_sum"].iter().fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(code.contains(&format!("\"{base}\"")), "the dashboard queries {name}, which no tandem process records");
    }
}

#[test]
fn the_compose_file_has_every_service_the_campaign_faults_in_its_datacenter() {
    let compose = std::fs::read_to_string(root().join("docker/compose.yml")).unwrap();
    for (dc, service) in tandem::bench::campaign::services() {
        // A service's block runs from its name to the next blank line.
        let at = compose.find(&format!("\n  {service}:\n")).unwrap_or_else(|| panic!("compose.yml has no service {service}"));
        let rest = &compose[at + 1..];
        let block = &rest[..rest.find("\n\n").unwrap_or(rest.len())];
        assert!(block.contains(&format!("container_name: tandem-{service}\n")), "{service}: container_name is not tandem-{service}");
        assert!(block.contains(&format!("      {dc}:\n")), "{service} is not on network {dc} in compose.yml");
        assert!(block.contains("      wan:\n"), "{service} is not on the wan network in compose.yml");
    }
    // docker/smoke reads DC2's cluster at its fixed address.
    let smoke = std::fs::read_to_string(root().join("docker/smoke")).unwrap();
    assert!(
        smoke.contains("http://172.28.2.22:19530") && compose.contains("ipv4_address: 172.28.2.22"),
        "c2's address differs between smoke and compose"
    );
}
