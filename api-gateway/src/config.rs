//! The gateway's route file (TOML): default quotas, upstreams and the RBAC table.
//!
//! `gateway.toml` at the crate root is the documented default and is compiled in; a deployment
//! points `GATEWAY_CONFIG` at its own copy. Everything is checked at start, and a mistake
//! stops the gateway with a message rather than leaving a route open.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::{
    limiter::Quota,
    routes::{Mount, RouteTable, RuleSpec},
};

/// The file compiled in as the default.
pub const DEFAULT: &str = include_str!("../gateway.toml");

/// Default quotas.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Per user (access token `sub`), on every proxied route without a quota of its own.
    pub user: Quota,
    /// Per API key, unless the key has its own.
    pub api_key: Quota,
    /// Per client IP on `/auth/*`: brute-force protection for login and refresh.
    pub auth_ip: Quota,
}

/// One upstream as the file states it: its mount and its proxy settings.
#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamSpec {
    /// The upstream's name (metrics label, logs).
    pub name: String,
    /// The public prefix it is mounted at.
    pub prefix: String,
    /// The rest: targets, timeouts, breaker, health checks (see `proxy::UpstreamSettings`).
    #[serde(flatten)]
    pub proxy: toml::Table,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Default quotas.
    pub limits: Limits,
    /// Upstream services.
    #[serde(default, rename = "upstreams")]
    pub upstreams: Vec<UpstreamSpec>,
    /// RBAC rules.
    #[serde(default)]
    pub routes: Vec<RuleSpec>,
}

impl GatewayConfig {
    /// Reads `path`, or the compiled-in default when `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
            None => DEFAULT.to_owned(),
        };
        let source = path.map_or("the default gateway.toml".into(), |p| {
            p.display().to_string()
        });
        Self::parse(&text).with_context(|| format!("in {source}"))
    }

    /// Parses and checks a TOML document.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.table()?;
        Ok(config)
    }

    /// The route table the file describes.
    pub fn table(&self) -> anyhow::Result<RouteTable> {
        let mounts = self
            .upstreams
            .iter()
            .map(|u| Mount {
                name: u.name.clone(),
                prefix: u.prefix.clone(),
            })
            .collect();
        Ok(RouteTable::new(self.routes.clone(), mounts)?)
    }

    /// Points the upstream `name` at `targets` (tests, the load test, compose).
    pub fn set_targets(&mut self, name: &str, targets: &[String]) -> anyhow::Result<()> {
        let upstream = self
            .upstreams
            .iter_mut()
            .find(|u| u.name == name)
            .with_context(|| format!("no upstream named {name}"))?;
        upstream.proxy.insert(
            "targets".into(),
            toml::Value::Array(targets.iter().cloned().map(toml::Value::String).collect()),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_parses_and_mounts_every_service() {
        let config = GatewayConfig::parse(DEFAULT).unwrap();
        assert_eq!(config.limits.user.limit, 1000);
        assert_eq!(config.limits.api_key.limit, 10_000);
        let table = config.table().unwrap();
        for prefix in [
            "/api/metrics",
            "/api/notifications",
            "/api/orders",
            "/api/analytics",
        ] {
            assert!(
                table.target(&format!("{prefix}/x")).is_some(),
                "{prefix} is not mounted"
            );
        }
    }

    #[test]
    fn the_compose_file_parses_and_differs_only_in_targets() {
        let compose = GatewayConfig::parse(include_str!("../../deploy/gateway.toml")).unwrap();
        let default = GatewayConfig::parse(DEFAULT).unwrap();
        assert_eq!(compose.routes.len(), default.routes.len());
        let prefixes = |c: &GatewayConfig| {
            c.upstreams
                .iter()
                .map(|u| u.prefix.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(prefixes(&compose), prefixes(&default));
    }

    #[test]
    fn mistakes_stop_the_gateway() {
        let base = "[limits]\nuser = { limit = 1, window = \"1m\" }\n\
                    api_key = { limit = 1, window = \"1m\" }\n\
                    auth_ip = { limit = 1, window = \"1m\" }\n";
        assert!(GatewayConfig::parse(base).is_ok());
        for bad in [
            "[[routes]]\nprefix = \"/api\"\nroles = []\n",
            "[[routes]]\nprefix = \"/api/../x\"\nroles = [\"a\"]\n",
            "[[routes]]\nprefix = \"/api\"\nroles = [\"a\"]\nlimit = { limit = 0, window = \"1m\" }\n",
            "[[routes]]\nprefix = \"/api\"\nrole = \"a\"\n",
            "[limits2]\n",
        ] {
            assert!(
                GatewayConfig::parse(&format!("{base}{bad}")).is_err(),
                "{bad}"
            );
        }
    }
}
