//! What `deploy/` ships for monitoring holds together: the Prometheus alert
//! rules pass `promtool check rules`, and every pilotlight metric the rules
//! and the Grafana dashboard use is one the binaries export.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `pilotlight_...` name in `text`, without the histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("pilotlight_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        out.insert(base.to_owned());
    }
    out
}

/// The source of every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
}

#[test]
fn dashboards_and_alerts_use_metrics_the_binaries_export() {
    let mut code = String::new();
    sources(&root().join("agent/src"), &mut code);
    sources(&root().join("receiver/src"), &mut code);
    for file in ["deploy/alerts.yml", "deploy/grafana-dashboard.json"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} uses no pilotlight metric");
        for name in names {
            assert!(
                code.contains(&format!("\"{name}\"")),
                "{file} uses {name}, which no binary exports"
            );
        }
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 5));
}

#[test]
#[ignore = "needs promtool (Debian package prometheus)"]
fn alert_rules_pass_promtool() {
    pilotlight::require_tools(&["promtool"]);
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(root().join("deploy/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
