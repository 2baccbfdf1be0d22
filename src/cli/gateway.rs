//! `tandem gateway`: serves the tandem API in front of the clusters until SIGTERM or SIGINT,
//! then drains. Configuration: built-in defaults, then the TOML file (docs/gateway.example.toml),
//! then `TANDEM_GATEWAY__SECTION__KEY` environment variables, then flags; every problem is
//! reported at once and the process exits with 64.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use tandem_gateway::GatewayConfig;
use tandem_gateway::config::StaticCluster;

use futures::StreamExt;

use super::cluster::shutdown_signal;
use super::{LogFormat, MetricsEndpoint};
use crate::config::InvalidConfig;

/// Environment variables overriding gateway settings (`TANDEM_GATEWAY__ROUTING__POLICY=round_robin`).
pub const GATEWAY_ENV_PREFIX: &str = "TANDEM_GATEWAY__";

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// TOML configuration file (see docs/gateway.example.toml).
    #[arg(long, short, value_name = "FILE", env = "TANDEM_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address, overriding the configuration (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// A cluster, `ID=URL` or `ID=URL@DATACENTER` (repeatable); replaces the file's list.
    #[arg(long = "cluster", value_name = "ID=URL[@DC]")]
    pub clusters: Vec<String>,
    /// This gateway's datacenter (for routing.policy = "prefer_local").
    #[arg(long, value_name = "DC")]
    pub datacenter: Option<String>,
    /// Log line format (logs go to stderr; RUST_LOG sets the filter, default info).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// On shutdown, how long to wait for requests in flight before exiting anyway.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub drain_timeout: u64,
}

/// Parses `ID=URL[@DC]`.
pub fn parse_cluster_flag(s: &str) -> Result<StaticCluster, String> {
    let (id, rest) =
        s.split_once('=').ok_or_else(|| format!("--cluster {s:?}: expected ID=URL[@DC], e.g. paris=http://10.0.0.7:19530@eu"))?;
    let (endpoint, datacenter) = match rest.rsplit_once('@') {
        Some((url, dc)) if !dc.is_empty() && !dc.contains(['/', ':']) => (url, dc),
        _ => (rest, ""),
    };
    Ok(StaticCluster { id: id.trim().to_string(), endpoint: endpoint.trim().to_string(), datacenter: datacenter.to_string() })
}

/// Defaults -> file -> environment -> flags, validated; errors are an [`InvalidConfig`].
pub fn load_gateway_config(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    a: &GatewayArgs,
) -> anyhow::Result<GatewayConfig> {
    let mut figment = Figment::from(Serialized::defaults(GatewayConfig::default()));
    if let Some(path) = path {
        if !path.is_file() {
            return Err(InvalidConfig { problems: vec![format!("config file {} does not exist or is not a file", path.display())] }.into());
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let (figment, mut problems) = crate::config::merge_env(figment, env, GATEWAY_ENV_PREFIX, "ROUTING__POLICY");
    let mut cfg = match figment.extract::<GatewayConfig>() {
        Ok(c) => c,
        Err(e) => {
            problems.extend(e.into_iter().map(|e| e.to_string()));
            return Err(InvalidConfig { problems }.into());
        }
    };
    if let Some(l) = &a.listen {
        cfg.listen = l.clone();
    }
    if let Some(dc) = &a.datacenter {
        cfg.datacenter = dc.clone();
    }
    if !a.clusters.is_empty() {
        cfg.clusters.clear();
        for c in &a.clusters {
            match parse_cluster_flag(c) {
                Ok(c) => cfg.clusters.push(c),
                Err(p) => problems.push(p),
            }
        }
    }
    problems.extend(cfg.validate().into_iter().filter(|p| !p.starts_with("clusters = []") || cfg.discovery.etcd.is_empty()));
    if problems.is_empty() { Ok(cfg) } else { Err(InvalidConfig { problems }.into()) }
}

pub async fn run(a: GatewayArgs) -> anyhow::Result<()> {
    let cfg = load_gateway_config(a.config.as_deref(), std::env::vars(), &a)?;
    // Held until the end of `run`: dropping it flushes the spans still buffered.
    let _traces = tandem_telemetry::tracing::init("info", a.log_format.into(), &cfg.telemetry.otlp_endpoint, "tandem-gateway")?;
    let membership = if cfg.discovery.etcd.is_empty() {
        tandem_discovery::static_list(cfg.registrations())
    } else {
        // The static list (if any) and etcd registrations together.
        let watch = tandem_discovery::etcd::watch(cfg.discovery.etcd.clone(), cfg.discovery.prefix.clone())
            .await
            .map_err(|e| if e.is_transient() { anyhow::Error::from(e) } else { InvalidConfig { problems: vec![e.to_string()] }.into() })?;
        futures::stream::select(tandem_discovery::static_list(cfg.registrations()), watch).boxed()
    };
    let metrics_listen = cfg.telemetry.metrics_listen.clone();
    let running = tandem_gateway::start(cfg, membership).await?;
    let metrics = MetricsEndpoint::start(&metrics_listen, "gateway").await?;
    // Scripts and tests wait for this exact line to learn the address (port 0 picks one).
    println!("tandem gateway listening on {}", running.addr);

    let signal = shutdown_signal().await?;
    tracing::info!(signal, "shutting down: draining requests in flight");
    super::drain(running.stop(), a.drain_timeout).await?;
    metrics.stop().await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(clusters: &[&str]) -> GatewayArgs {
        GatewayArgs {
            config: None,
            listen: Some("127.0.0.1:0".into()),
            clusters: clusters.iter().map(|s| s.to_string()).collect(),
            datacenter: None,
            log_format: LogFormat::Text,
            drain_timeout: 1,
        }
    }

    fn problems(r: anyhow::Result<GatewayConfig>) -> Vec<String> {
        r.unwrap_err().downcast::<InvalidConfig>().expect("InvalidConfig").problems
    }

    #[test]
    fn cluster_flags_parse() {
        assert_eq!(
            parse_cluster_flag("p=http://10.0.0.7:19530@eu").unwrap(),
            StaticCluster { id: "p".into(), endpoint: "http://10.0.0.7:19530".into(), datacenter: "eu".into() }
        );
        assert_eq!(parse_cluster_flag("p=http://h:1").unwrap().datacenter, "");
        assert!(parse_cluster_flag("http://h:1").unwrap_err().contains("expected ID=URL"));
    }

    #[test]
    fn file_env_and_flags_layer_and_bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "datacenter = \"eu\"\n[routing]\npolicy = \"round_robin\"\n[[clusters]]\nid = \"a\"\nendpoint = \"http://127.0.0.1:1\"\n",
        )
        .unwrap();
        let env = vec![("TANDEM_GATEWAY__HEALTH__INTERVAL_MS".to_string(), "50".to_string())];
        let cfg = load_gateway_config(Some(&path), env, &args(&[])).unwrap();
        assert_eq!(cfg.datacenter, "eu");
        assert_eq!(cfg.routing.policy, tandem_gateway::config::Policy::RoundRobin);
        assert_eq!(cfg.health.interval_ms, 50);
        assert_eq!(cfg.clusters.len(), 1);
        let cfg = load_gateway_config(Some(&path), vec![], &args(&["b=http://127.0.0.1:2@us", "c=http://127.0.0.1:3"])).unwrap();
        assert_eq!(cfg.clusters.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);

        std::fs::write(&path, "[routing]\npolicy = \"random\"\n").unwrap();
        let p = problems(load_gateway_config(Some(&path), vec![], &args(&[])));
        assert!(p[0].contains("random"), "{p:?}");
        let p = problems(load_gateway_config(None, vec![], &args(&["nope", "x=10.0.0.1:5"])));
        assert!(p.iter().any(|m| m.contains("--cluster \"nope\"")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("clusters[0].endpoint = \"10.0.0.1:5\"")), "{p:?}");
        let p = problems(load_gateway_config(Some(&dir.path().join("missing.toml")), vec![], &args(&[])));
        assert!(p[0].contains("does not exist"), "{p:?}");
    }

    /// The same environment rules as `tandem cluster` (one loader: `config::merge_env`): the
    /// prefix in any case, and a malformed name or value named in the error.
    #[test]
    fn environment_variables_follow_the_cluster_rules() {
        let env = vec![("tandem_gateway__health__interval_ms".to_string(), "75".to_string())];
        assert_eq!(load_gateway_config(None, env, &args(&["a=http://127.0.0.1:1"])).unwrap().health.interval_ms, 75);
        let env = vec![("TANDEM_GATEWAY__HEALTH____X".to_string(), "1".to_string())];
        let p = problems(load_gateway_config(None, env, &args(&[])));
        assert!(p.iter().any(|m| m.contains("TANDEM_GATEWAY__HEALTH____X") && m.contains("TANDEM_GATEWAY__ROUTING__POLICY")), "{p:?}");
        let env = vec![("TANDEM_GATEWAY__ROUTING__POLICY".to_string(), "random".to_string())];
        let p = problems(load_gateway_config(None, env, &args(&[])));
        assert!(p.iter().any(|m| m.contains("random") && m.contains("environment variable TANDEM_GATEWAY__ROUTING__POLICY")), "{p:?}");
    }
}
