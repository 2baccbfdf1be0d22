//! Loading a cluster node's configuration: built-in defaults (`ClusterConfig::default()`), then
//! a TOML file, then `TANDEM__`-prefixed environment variables (`TANDEM__WAL__SYNC=never` sets
//! `wal.sync`), then command-line flags, and finally `ClusterConfig::validate()`.
//!
//! Every problem found is reported at once, each naming the setting and where its value came
//! from, in an [`InvalidConfig`] error; `main` prints them and exits with code 64 (EX_USAGE).
//! `docs/tandem.example.toml` is the commented reference of every setting; a test below loads it
//! so it cannot drift from the code.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use tandem_cluster::ClusterConfig;

/// The prefix of environment variables that override settings; `__` separates nested keys.
pub const ENV_PREFIX: &str = "TANDEM__";

/// The configuration is unusable; `problems` holds one message per bad setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidConfig {
    pub problems: Vec<String>,
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration:")?;
        for p in &self.problems {
            // Multi-line problems (TOML syntax errors quote the line) stay inside their item.
            write!(f, "\n  - {}", p.trim_end().replace('\n', "\n    "))?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidConfig {}

/// A member that would not start, as the CLI reports it: a configuration mistake becomes an
/// [`InvalidConfig`] (exit 64), anything else an error with its cause.
pub fn member_error(e: tandem_node::NodeError) -> anyhow::Error {
    if e.is_config() { InvalidConfig { problems: vec![e.to_string()] }.into() } else { e.into() }
}

/// How long an in-process member (demo, benches) may take to stop.
pub const MEMBER_DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Settings given as command-line flags; they win over the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct ConfigOverrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub cluster_id: Option<String>,
    pub role: Option<tandem_cluster::Role>,
    /// `--follow URL`: role alternative, following the leader at URL.
    pub follow: Option<String>,
}

/// Defaults -> `path` (if given; it must exist) -> `TANDEM__*` environment variables, validated.
pub fn load_cluster_config(path: Option<&Path>) -> anyhow::Result<ClusterConfig> {
    load_cluster_config_with(path, std::env::vars(), &ConfigOverrides::default())
}

/// [`load_cluster_config`] with the environment passed in (so tests need not touch the process
/// environment) and flag overrides applied last.
pub fn load_cluster_config_with(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &ConfigOverrides,
) -> anyhow::Result<ClusterConfig> {
    let mut figment = Figment::from(Serialized::defaults(ClusterConfig::default()));
    if let Some(path) = path {
        // figment silently skips a missing file; a file named on the command line that is not
        // there is a mistake worth stopping for.
        if !path.is_file() {
            return Err(InvalidConfig { problems: vec![format!("config file {} does not exist or is not a file", path.display())] }.into());
        }
        // `file_exact`: a relative path means relative to the working directory, not "search
        // every parent directory" as `Toml::file` would.
        figment = figment.merge(Toml::file_exact(path));
    }
    let (figment, mut problems) = merge_env(figment, env, ENV_PREFIX, "WAL__SYNC");
    let mut cfg = match figment.extract::<ClusterConfig>() {
        Ok(cfg) => cfg,
        Err(e) => {
            problems.extend(e.into_iter().map(|e| describe(&e)));
            return Err(InvalidConfig { problems }.into());
        }
    };
    if let Some(listen) = &overrides.listen {
        cfg.listen = listen.clone();
    }
    if let Some(dir) = &overrides.data_dir {
        cfg.data_dir = dir.clone();
    }
    if let Some(id) = &overrides.cluster_id {
        cfg.cluster_id = id.clone();
    }
    if let Some(leader) = &overrides.follow {
        cfg.role = tandem_cluster::Role::Alternative;
        cfg.replication.leader = leader.clone();
    }
    if let Some(role) = overrides.role {
        cfg.role = role;
    }
    if let Err(errs) = cfg.validate() {
        problems.extend(errs);
    }
    if problems.is_empty() { Ok(cfg) } else { Err(InvalidConfig { problems }.into()) }
}

/// Layers the variables of `env` named `<prefix>SECTION__KEY` (the prefix in any case) over
/// `figment`, in a deterministic order; a malformed name is a problem naming it (`example` is a
/// well-formed `SECTION__KEY`). The cluster's and the gateway's loaders both use it.
pub fn merge_env(
    mut figment: Figment,
    env: impl IntoIterator<Item = (String, String)>,
    prefix: &str,
    example: &str,
) -> (Figment, Vec<String>) {
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.len() > prefix.len() && k.get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix)))
        .collect();
    // Deterministic layering if a variable is given twice with different case.
    env.sort();
    let mut problems = Vec::new();
    for (name, value) in env {
        match EnvVar::new(name, &value, prefix, example) {
            Ok(var) => figment = figment.merge(var),
            Err(p) => problems.push(p),
        }
    }
    (figment, problems)
}

/// One `TANDEM__A__B=value` variable as a figment provider of `a.b = value`. One provider per
/// variable (rather than figment's `Env`, which reads the process environment itself) so tests
/// can pass an explicit environment, and so an error names the exact variable.
struct EnvVar {
    name: String,
    key: String,
    value: Value,
}

impl EnvVar {
    fn new(name: String, value: &str, prefix: &str, example: &str) -> Result<EnvVar, String> {
        let rest = &name[prefix.len()..];
        let parts: Vec<String> = rest.split("__").map(|p| p.trim().to_ascii_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty() || p.contains('.')) {
            return Err(format!("environment variable {name}: expected {prefix}SECTION__KEY, e.g. {prefix}{example}"));
        }
        // The same parsing figment's `Env` applies: numbers and booleans become typed values,
        // everything else a string.
        let value = match value.parse::<Value>() {
            Ok(v) => v,
            Err(never) => match never {},
        };
        Ok(EnvVar { name, key: parts.join("."), value })
    }
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict = figment::util::nest(&self.key, self.value.clone())
            .into_dict()
            .ok_or_else(|| figment::Error::from(format!("environment variable {}: empty key", self.name)))?;
        Ok(Profile::Default.collect(dict))
    }
}

/// One figment error as `setting: problem (where the value came from)`.
fn describe(e: &figment::Error) -> String {
    use figment::error::Kind;
    let source = match &e.metadata {
        Some(md) => match &md.source {
            Some(src) => format!(" (in {src})"),
            None if md.name == "Default" => String::new(),
            None => format!(" (from {})", md.name),
        },
        None => String::new(),
    };
    let key = e.path.join(".");
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment's path usually ends with the unknown field already.
            let full = match e.path.last() {
                Some(last) if last == field => key,
                _ if key.is_empty() => field.clone(),
                _ => format!("{key}.{field}"),
            };
            format!("unknown setting {full:?}{source}: expected one of {}", expected.join(", "))
        }
        Kind::UnknownVariant(v, expected) => {
            format!("{key} = {v:?} is not one of {}{source}", expected.join(", "))
        }
        kind if key.is_empty() => format!("{kind}{source}"),
        kind => format!("{key}: {kind}{source}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tandem_cluster::config::WalSync;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("tandem.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn problems(r: anyhow::Result<ClusterConfig>) -> Vec<String> {
        r.unwrap_err().downcast::<InvalidConfig>().expect("an InvalidConfig error").problems
    }

    #[test]
    fn defaults_without_file_or_env() {
        let cfg = load_cluster_config_with(None, env(&[]), &ConfigOverrides::default()).unwrap();
        assert_eq!(serde_json::to_value(&cfg).unwrap(), serde_json::to_value(ClusterConfig::default()).unwrap());
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "listen = \"127.0.0.1:7000\"\ncluster_id = \"east\"\n[wal]\nsync = \"interval\"\ninterval_ms = 50\n");
        let vars = env(&[
            ("TANDEM__WAL__SYNC", "never"),
            ("TANDEM__LISTEN", "127.0.0.1:0"),
            ("TANDEM__SEGMENT__SEAL_ROWS", "1000"),
            ("UNRELATED", "x"),
        ]);
        let cfg = load_cluster_config_with(Some(&path), vars.clone(), &ConfigOverrides::default()).unwrap();
        assert_eq!(cfg.wal.sync, WalSync::Never);
        assert_eq!(cfg.wal.interval_ms, 50, "file value kept where env says nothing");
        assert_eq!(cfg.listen, "127.0.0.1:0");
        assert_eq!(cfg.cluster_id, "east");
        assert_eq!(cfg.segment.seal_rows, 1000);

        let flags = ConfigOverrides { listen: Some("127.0.0.1:9999".into()), data_dir: Some("/tmp/x".into()), ..Default::default() };
        let cfg = load_cluster_config_with(Some(&path), vars, &flags).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9999");
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn bad_values_name_the_key_and_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[wal]\nsync = \"sometimes\"\n");
        let p = problems(load_cluster_config_with(Some(&path), env(&[]), &ConfigOverrides::default()));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("wal.sync") && p[0].contains("sometimes"), "{p:?}");
        assert!(p[0].contains("tandem.toml"), "{p:?}");

        let p = problems(load_cluster_config_with(None, env(&[("TANDEM__SEGMENT__SEAL_ROWS", "lots")]), &ConfigOverrides::default()));
        assert!(p[0].contains("segment.seal_rows") && p[0].contains("TANDEM__SEGMENT__SEAL_ROWS"), "{p:?}");

        // Typed choices: an unknown one is named with the key, the value and where it came from.
        for (var, key, value) in [
            ("TANDEM__REPLICATION__TRANSPORT", "replication.transport", "carrier_pigeon"),
            ("TANDEM__HA__ARBITER", "ha.arbiter", "coin_toss"),
            ("TANDEM__REPLICATION__ON_POISON", "replication.on_poison", "ignore"),
            ("TANDEM__REPLICATION__ACK", "replication.ack", "whenever"),
        ] {
            let p = problems(load_cluster_config_with(None, env(&[(var, value)]), &ConfigOverrides::default()));
            assert!(p.len() == 1 && p[0].contains(key) && p[0].contains(value) && p[0].contains(var), "{p:?}");
        }

        // validate() problems are all reported, not just the first.
        let p = problems(load_cluster_config_with(
            None,
            env(&[("TANDEM__SEGMENT__SEAL_ROWS", "0"), ("TANDEM__LISTEN", "nowhere")]),
            &ConfigOverrides::default(),
        ));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|m| m.contains("segment.seal_rows = 0")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("\"nowhere\"")), "{p:?}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[wal]\nsink = \"always\"\n");
        let p = problems(load_cluster_config_with(Some(&path), env(&[]), &ConfigOverrides::default()));
        assert!(p[0].contains("\"wal.sink\""), "{p:?}");

        let p = problems(load_cluster_config_with(None, env(&[("TANDEM__WALL__SYNC", "never")]), &ConfigOverrides::default()));
        assert!(p[0].contains("\"wall\"") && p[0].contains("TANDEM__WALL__SYNC"), "{p:?}");

        let p = problems(load_cluster_config_with(None, env(&[("TANDEM__WAL____SYNC", "never")]), &ConfigOverrides::default()));
        assert!(p[0].contains("TANDEM__WAL____SYNC"), "{p:?}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let p = problems(load_cluster_config_with(Some(Path::new("/nonexistent/tandem.toml")), env(&[]), &ConfigOverrides::default()));
        assert!(p[0].contains("/nonexistent/tandem.toml"), "{p:?}");
    }

    fn keys(prefix: &str, dict: &Dict, out: &mut BTreeSet<String>) {
        for (k, v) in dict {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v.as_dict() {
                Some(d) => keys(&key, d, out),
                None => {
                    out.insert(key);
                }
            }
        }
    }

    #[test]
    fn example_config_loads_lists_every_setting_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/tandem.example.toml");
        let cfg = load_cluster_config_with(Some(&path), env(&[]), &ConfigOverrides::default()).unwrap();
        assert_eq!(
            serde_json::to_value(&cfg).unwrap(),
            serde_json::to_value(ClusterConfig::default()).unwrap(),
            "docs/tandem.example.toml must show the defaults"
        );

        let mut documented = BTreeSet::new();
        let file = Figment::from(Toml::file_exact(&path)).data().unwrap();
        keys("", &file[&Profile::Default], &mut documented);
        let mut all = BTreeSet::new();
        let defaults = Figment::from(Serialized::defaults(ClusterConfig::default())).data().unwrap();
        keys("", &defaults[&Profile::Default], &mut all);
        let missing: Vec<_> = all.difference(&documented).collect();
        assert!(missing.is_empty(), "docs/tandem.example.toml does not show {missing:?}");
    }
}
