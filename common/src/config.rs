//! What every service's clap `Settings` shares: the serving settings, the parsers that make
//! durations, sizes and secrets read the same way everywhere, and URL redaction for logs.

use std::{fmt, marker::PhantomData, net::SocketAddr, time::Duration};

use secrecy::SecretString;

use crate::http::ServeOptions;

/// The serving defaults that differ between services, for [`ServeSettings`]. A service
/// implements it on its own `Settings` type.
pub trait ServeDefaults {
    /// The default of `--listen`: the service's port in the suite's port plan.
    const LISTEN_ADDR: &'static str;
    /// The default of `--shutdown-grace`.
    const SHUTDOWN_GRACE: &'static str = "5s";
}

/// How a service listens, bounds its requests and shuts down. Every service flattens one into
/// its `Settings` (`#[command(flatten)] serve: ServeSettings<Self>`), so these flags, their
/// environment variables, their parsing and their meaning are the same in every service.
///
/// The defaults that differ (the port, the grace period) come from `D`'s
/// [`ServeDefaults`] constants: clap's `default_value` on a flattened struct is one literal for
/// every service that flattens it, and keeping the listen address out of this struct, as a
/// field of each service, would leave the next service to copy it by hand. A constant of the
/// service's own type keeps the default in one place, shown by `--help`, and type-checked.
#[derive(clap::Args)]
pub struct ServeSettings<D: ServeDefaults> {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long = "listen", env = "LISTEN_ADDR", default_value = D::LISTEN_ADDR)]
    pub listen: SocketAddr,
    /// Longest a request may run before it is answered with 503.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long a client may take to send a request's head before its connection is closed;
    /// also how long a keep-alive connection may sit idle between requests.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Once shutdown starts, how long to keep serving with /readyz failing before the
    /// listener closes, so load balancers stop sending first. 0 closes at once; the exit then
    /// takes up to this plus SHUTDOWN_GRACE.
    #[arg(long, env = "SHUTDOWN_READINESS_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_readiness_delay: Duration,
    /// Once the listener closes, how long requests in flight (and the service's other
    /// shutdown work) may take before what is left is dropped.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = D::SHUTDOWN_GRACE, value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    #[arg(skip)]
    defaults: PhantomData<fn() -> D>,
}

impl<D: ServeDefaults> ServeSettings<D> {
    /// What [`crate::http::serve`] needs of these settings. A service with a head limit of its
    /// own, or a grace period shared with other work, adjusts the result.
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            grace: self.shutdown_grace,
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: None,
        }
    }
}

// By hand rather than derived, so `D` need not be `Clone` or `Debug` itself.
impl<D: ServeDefaults> Clone for ServeSettings<D> {
    fn clone(&self) -> Self {
        Self {
            listen: self.listen,
            request_timeout: self.request_timeout,
            header_read_timeout: self.header_read_timeout,
            shutdown_readiness_delay: self.shutdown_readiness_delay,
            shutdown_grace: self.shutdown_grace,
            defaults: PhantomData,
        }
    }
}

impl<D: ServeDefaults> fmt::Debug for ServeSettings<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeSettings")
            .field("listen", &self.listen)
            .field("request_timeout", &self.request_timeout)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("shutdown_readiness_delay", &self.shutdown_readiness_delay)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// Reads a secret (a password, a shared key, a URL that may hold a password) for
/// `#[arg(value_parser = parse_secret, hide_env_values = true)]`: the setting then never
/// shows in `{:?}` of a `Settings`, and is read only through `ExposeSecret` where it is used.
pub fn parse_secret(input: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(input.to_owned()))
}

/// Parses `250ms`, `5s`, `2m`, `1h`, `14d` (a bare number means seconds) for `#[arg(value_parser = parse_duration)]`.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let input = input.trim();
    let split = input
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(input.len());
    let (number, unit) = input.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{input}` is not a duration such as 500ms, 5s, 2m, 1h or 14d"))?;
    let millis = match unit.trim() {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        "d" => number.checked_mul(86_400_000),
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m, h or d)"
            ));
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration `{input}` is too large"))
}

/// Parses `512`, `64KiB`, `16MiB`, `1GiB` (powers of 1024) for `#[arg(value_parser = parse_bytes)]`.
pub fn parse_bytes(input: &str) -> Result<usize, String> {
    let input = input.trim();
    let split = input
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(input.len());
    let (number, unit) = input.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("`{input}` is not a size such as 512, 64KiB or 16MiB"))?;
    let factor: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB or GiB)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("size `{input}` is too large"))
}

/// A connection URL with its password masked (`postgres://app:***@db/x`), for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use secrecy::ExposeSecret;

    use super::*;

    #[derive(Debug, Parser)]
    struct Service {
        #[command(flatten)]
        serve: ServeSettings<Self>,
        #[arg(long, value_parser = parse_secret)]
        password: Option<SecretString>,
    }

    impl ServeDefaults for Service {
        const LISTEN_ADDR: &'static str = "127.0.0.1:8099";
        const SHUTDOWN_GRACE: &'static str = "7s";
    }

    #[test]
    fn serve_settings_take_the_service_defaults() {
        Service::command().debug_assert();
        let settings = Service::try_parse_from(["service"]).unwrap();
        assert_eq!(settings.serve.listen, "127.0.0.1:8099".parse().unwrap());
        assert_eq!(settings.serve.shutdown_grace, Duration::from_secs(7));
        assert_eq!(settings.serve.request_timeout, Duration::from_secs(10));
        assert_eq!(settings.serve.header_read_timeout, Duration::from_secs(10));
        assert_eq!(settings.serve.shutdown_readiness_delay, Duration::ZERO);
    }

    #[test]
    fn serve_settings_keep_their_flag_and_variable_names() {
        let settings = Service::try_parse_from([
            "service",
            "--listen",
            "127.0.0.1:0",
            "--request-timeout",
            "1s",
            "--header-read-timeout",
            "2s",
            "--shutdown-readiness-delay",
            "3s",
            "--shutdown-grace",
            "4s",
        ])
        .unwrap();
        let options = settings.serve.serve_options();
        assert_eq!(settings.serve.listen.port(), 0);
        assert_eq!(settings.serve.request_timeout, Duration::from_secs(1));
        assert_eq!(options.header_read_timeout, Duration::from_secs(2));
        assert_eq!(
            settings.serve.shutdown_readiness_delay,
            Duration::from_secs(3)
        );
        assert_eq!(options.grace, Duration::from_secs(4));
        let help = Service::command().render_long_help().to_string();
        for variable in [
            "LISTEN_ADDR",
            "REQUEST_TIMEOUT",
            "HEADER_READ_TIMEOUT",
            "SHUTDOWN_READINESS_DELAY",
            "SHUTDOWN_GRACE",
        ] {
            assert!(help.contains(variable), "{variable} missing from --help");
        }
        assert!(help.contains("127.0.0.1:8099"), "{help}");
    }

    #[test]
    fn secrets_are_read_whole_and_never_printed() {
        let settings = Service::try_parse_from(["service", "--password", "hunter2"]).unwrap();
        let password = settings.password.as_ref().unwrap();
        assert_eq!(password.expose_secret(), "hunter2");
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn durations_accept_every_documented_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("14d"), Ok(Duration::from_secs(14 * 86_400)));
    }

    #[test]
    fn durations_refuse_garbage_and_overflow() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert!(parse_bytes("16MB").is_err());
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn redact_url_hides_the_password_only() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    }
}
