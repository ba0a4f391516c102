//! What a run needs, checked before any load: the service binaries, PostgreSQL and Redis
//! (a local one that is installed but stopped is started), enough open files, a loopback
//! port, a writable report folder, and the comparison peers. A missing requirement stops
//! the run at once with how to get it; a missing peer only leaves its comparison
//! unmeasured, so minutes of figures are never lost to something checkable up front.

use std::{fmt::Write as _, path::Path};

use anyhow::bail;

use crate::{backends::Backend, gateway, service::binary};

/// A scenario's needs.
pub struct Needs {
    /// The scenario's name, for messages.
    pub scenario: &'static str,
    /// Service binaries, looked up next to the loadtest binary.
    pub binaries: &'static [&'static str],
    /// Backends it runs services against.
    pub backends: &'static [Backend],
    /// Open files the loadtest process holds at once (client connections, mostly).
    pub open_files: u64,
    /// Whether it compares with nginx when nginx is installed.
    pub nginx_peer: bool,
}

/// Checks everything `needs` asks for and prints one line per check. Fails with every
/// missing requirement named, and how to get it, before any load is sent.
pub async fn check(needs: &[Needs], out_dir: &Path) -> anyhow::Result<()> {
    println!("preflight:");
    let mut missing = Vec::new();

    let mut absent_binaries: Vec<&str> = Vec::new();
    for name in needs.iter().flat_map(|n| n.binaries.iter().copied()) {
        if !absent_binaries.contains(&name) && binary(name).is_err() {
            absent_binaries.push(name);
        }
    }
    if absent_binaries.is_empty() {
        println!("  service binaries: ok");
    } else {
        let line = format!(
            "service binaries missing next to the loadtest binary: {}; build them with \
             `cargo build --release --bins`",
            absent_binaries.join(", ")
        );
        println!("  {line}");
        missing.push(line);
    }

    for backend in [Backend::Postgres, Backend::Redis] {
        let users: Vec<&str> = needs
            .iter()
            .filter(|n| n.backends.contains(&backend))
            .map(|n| n.scenario)
            .collect();
        if users.is_empty() {
            continue;
        }
        match backend.ensure().await {
            Ok(()) => println!("  {backend:?} at {}: ok", backend.url()),
            Err(error) => {
                let line = format!(
                    "{backend:?} (needed by {}) does not answer: {error:#}",
                    users.join(", ")
                );
                println!("  {line}");
                missing.push(line);
            }
        }
    }

    let wanted = needs.iter().map(|n| n.open_files).max().unwrap_or(0);
    match open_files_limit() {
        Some(limit) if limit < wanted => {
            let line = format!(
                "open files: the limit is {limit}, the run holds up to {wanted} at once; raise it \
                 (ulimit -n {wanted}) or run the quick form"
            );
            println!("  {line}");
            missing.push(line);
        }
        Some(limit) => println!("  open files: limit {limit}, up to {wanted} needed: ok"),
        None => println!("  open files: limit unknown (no /proc/self/limits); going on"),
    }

    match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(_) => println!("  loopback: a port is free on 127.0.0.1: ok"),
        Err(error) => {
            let line = format!("loopback: cannot bind 127.0.0.1:0 ({error})");
            println!("  {line}");
            missing.push(line);
        }
    }

    match writable(out_dir) {
        Ok(()) => println!("  reports go to {}: ok", out_dir.display()),
        Err(error) => {
            let line = format!("reports: {} is not writable ({error:#})", out_dir.display());
            println!("  {line}");
            missing.push(line);
        }
    }

    if needs.iter().any(|n| n.nginx_peer) {
        match gateway::nginx_binary() {
            Some(path) => println!("  nginx (comparison peer) at {}: ok", path.display()),
            None => println!("  {}", gateway::NGINX_MISSING),
        }
    }

    if missing.is_empty() {
        return Ok(());
    }
    let mut message = String::from("the run cannot start; nothing was measured:");
    for line in &missing {
        let _ = write!(message, "\n  - {line}");
    }
    bail!(message)
}

/// The soft limit on open files of this process.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// Creates `dir` and writes and removes a file in it.
fn writable(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".preflight-{}", std::process::id()));
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(&probe)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_an_open_files_limit() {
        assert!(open_files_limit().is_some_and(|limit| limit > 0));
    }

    #[test]
    fn an_unwritable_report_folder_is_found_before_the_run() {
        let file = std::env::temp_dir().join(format!("loadtest-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        assert!(writable(&file.join("reports")).is_err());
        std::fs::remove_file(&file).unwrap();
        let dir = std::env::temp_dir().join(format!("loadtest-reports-{}", std::process::id()));
        writable(&dir).unwrap();
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the probe is removed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_missing_binary_stops_the_run_and_says_how_to_build_it() {
        let needs = [Needs {
            scenario: "imaginary",
            binaries: &["no-such-service"],
            backends: &[],
            open_files: 0,
            nginx_peer: false,
        }];
        let error = check(&needs, &std::env::temp_dir().join("loadtest-preflight"))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("no-such-service"), "{error}");
        assert!(error.contains("cargo build --release --bins"), "{error}");
        assert!(error.contains("nothing was measured"), "{error}");
    }
}
