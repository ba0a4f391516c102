//! Child processes of a run: a suite service (started on port 0, found by its `listening`
//! log line) or a helper such as nginx or the echo upstream; reading their CPU time and
//! memory, stopping them, and killing a service with SIGKILL and starting it again.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A child process of the run. Dropped while it runs (an early return), it gets SIGTERM, so
/// that nginx's master stops its workers too.
pub struct Process {
    child: Child,
    pid: u32,
}

impl Process {
    /// Takes charge of a child that has just been spawned.
    pub fn new(child: Child) -> anyhow::Result<Self> {
        let pid = child.id().context("the process has already exited")?;
        Ok(Self { child, pid })
    }

    /// Whether it has exited, and how.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Resident memory now and at its peak (VmRSS, VmHWM), in bytes.
    pub fn memory(&self) -> anyhow::Result<(u64, u64)> {
        memory_of(&format!("/proc/{}/status", self.pid))
    }

    /// CPU time of the process alone so far, user and system apart.
    pub fn own_cpu_time(&self) -> anyhow::Result<CpuTime> {
        cpu_time_of(&format!("/proc/{}/stat", self.pid))
    }

    /// CPU time of the process and its children (nginx's workers), user and system apart.
    pub fn cpu_time(&self) -> CpuTime {
        let mut total = self.own_cpu_time().unwrap_or_default();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return total;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let stat_path = format!("/proc/{pid}/stat");
            let Ok(stat) = std::fs::read_to_string(&stat_path) else {
                continue;
            };
            // After `(comm)`: state, then the parent's pid.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if parent == Some(self.pid) {
                total = total + cpu_time_of(&stat_path).unwrap_or_default();
            }
        }
        total
    }

    /// SIGKILL, and waits for the exit: no shutdown, nothing flushed.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("failed to kill process {}", self.pid))
    }

    /// Sends SIGTERM and waits up to `limit` for the exit (then SIGKILL); returns how long it
    /// took and whether it exited on its own with success.
    pub async fn terminate(mut self, limit: Duration) -> anyhow::Result<(Duration, bool)> {
        let started = Instant::now();
        sigterm(self.pid);
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => Ok((started.elapsed(), status?.success())),
            Err(_) => {
                self.child.kill().await.ok();
                Ok((started.elapsed(), false))
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // On an early return: SIGKILL on nginx's master would leave its workers running.
        if matches!(self.child.try_wait(), Ok(None)) {
            sigterm(self.pid);
        }
    }
}

fn sigterm(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// A suite service started by the load test.
pub struct Service {
    process: Process,
    /// `host:port` it listens on.
    pub address: String,
    /// `host:port` of its admin listener (Prometheus metrics), when it has one.
    pub admin: Option<String>,
    /// How it was started, to start it again.
    launch: Launch,
}

/// A service's command line: the binary, the arguments before `--listen` (a subcommand), the
/// rest, and extra environment variables.
#[derive(Debug, Clone)]
struct Launch {
    name: String,
    leading: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Finds `name` next to the loadtest binary (both live in `target/<profile>/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("failed to locate the loadtest binary")?;
    let path = me
        .parent()
        .context("the loadtest binary has no folder")?
        .join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first with `cargo build --release --bins`",
            path.display()
        );
    }
    Ok(path)
}

impl Service {
    /// Starts `name` on `127.0.0.1:0` with `args`, and waits for its `listening` log line.
    pub async fn start(name: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(name, args, &[]).await
    }

    /// Like [`Service::start`], with extra environment variables.
    pub async fn start_with_env(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_command(name, &[], args, env).await
    }

    /// Starts `name <leading...> --listen 127.0.0.1:0 <args...>` (`leading` is a subcommand,
    /// such as `order-saga orders`) with extra environment variables, and waits for its
    /// `listening` log line.
    pub async fn start_command(
        name: &str,
        leading: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let owned = |list: &[&str]| list.iter().map(|&a| a.to_owned()).collect::<Vec<_>>();
        let launch = Launch {
            name: name.to_owned(),
            leading: owned(leading),
            args: owned(args),
            env: env
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        };
        Self::launch(launch, "127.0.0.1:0").await
    }

    /// SIGKILL (no shutdown, nothing flushed), then the same command line again on the same
    /// address, so that whoever calls it finds it where it was; waits until it listens.
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.process.kill().await?;
        let listen = self.address.clone();
        let restarted = Self::launch(self.launch.clone(), &listen)
            .await
            .with_context(|| format!("{} did not come back on {listen}", self.launch.name))?;
        *self = restarted;
        Ok(())
    }

    async fn launch(launch: Launch, listen: &str) -> anyhow::Result<Self> {
        let name = launch.name.as_str();
        let mut child = Command::new(binary(name)?)
            .args(&launch.leading)
            .args(["--listen", listen])
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", format!("warn,{}=info", name.replace('-', "_")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (address, admin) = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await? {
                let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                let fields = &log["fields"];
                if fields["message"] == "listening" {
                    let address = fields["addr"].as_str().unwrap_or_default().to_owned();
                    return Ok((address, fields["admin"].as_str().map(str::to_owned)));
                }
            }
            bail!("{name} exited before listening")
        })
        .await
        .with_context(|| format!("{name} did not start listening within 10 s"))??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            process: Process::new(child)?,
            address,
            admin,
            launch,
        })
    }

    /// Resident memory now and at its peak (VmRSS, VmHWM), in bytes.
    pub fn memory(&self) -> anyhow::Result<(u64, u64)> {
        self.process.memory()
    }

    /// CPU time the service has used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.cpu_time().map(CpuTime::total)
    }

    /// The service's CPU time so far, user and system apart.
    pub fn cpu_time(&self) -> anyhow::Result<CpuTime> {
        self.process.own_cpu_time()
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took and whether it was clean.
    pub async fn terminate(self, limit: Duration) -> anyhow::Result<(Duration, bool)> {
        self.process.terminate(limit).await
    }
}

/// User + system CPU seconds from a `/proc/<pid>/stat` file (clock ticks of 1/100 s).
pub fn cpu_seconds_of(stat_path: &str) -> anyhow::Result<f64> {
    cpu_time_of(stat_path).map(|time| time.user + time.system)
}

/// CPU seconds a process spent in its own code and in the kernel on its behalf.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Add for CpuTime {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

impl std::ops::Sub for CpuTime {
    type Output = Self;
    fn sub(self, other: Self) -> Self {
        Self {
            user: self.user - other.user,
            system: self.system - other.system,
        }
    }
}

/// User and system CPU seconds from a `/proc/<pid>/stat` file (clock ticks of 1/100 s).
pub fn cpu_time_of(stat_path: &str) -> anyhow::Result<CpuTime> {
    let stat = std::fs::read_to_string(stat_path)
        .with_context(|| format!("failed to read {stat_path}"))?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let seconds = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0) as f64
            / 100.0
    };
    Ok(CpuTime {
        user: seconds(11),
        system: seconds(12),
    })
}

/// Reads VmRSS and VmHWM from a `/proc/<pid>/status` file.
pub fn memory_of(status_path: &str) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(status_path)
        .with_context(|| format!("failed to read {status_path}"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_reads_user_and_system_ticks_past_a_command_name_with_spaces() {
        let dir = std::env::temp_dir().join(format!("loadtest-stat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stat");
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime ...
        std::fs::write(
            &path,
            "42 (nginx: worker (x)) S 1 42 42 0 -1 4194560 10 0 0 0 250 75 0 0 20 0 1 0",
        )
        .unwrap();
        let time = cpu_time_of(path.to_str().unwrap()).unwrap();
        assert_eq!((time.user, time.system), (2.5, 0.75));
        assert_eq!(cpu_seconds_of(path.to_str().unwrap()).unwrap(), 3.25);
        let since = time
            - CpuTime {
                user: 0.5,
                system: 0.25,
            };
        assert_eq!((since.user, since.system), (2.0, 0.5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpu_time_of_this_process_is_counted() {
        let time = cpu_time_of("/proc/self/stat").unwrap();
        assert!(time.user >= 0.0 && time.system >= 0.0);
        assert!(cpu_time_of("/proc/self/no-such-file").is_err());
    }
}
