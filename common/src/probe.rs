//! One-shot health probes for the binaries' `health` subcommands (container healthchecks that
//! ask the service itself, so an image needs no curl or grpcurl).
//!
//! A probe answers `Ok(line)` when the service serves and `Err(reason)` otherwise; both are one
//! line, printed by the subcommand, which exits 0 or 1 (what Docker's `HEALTHCHECK` reads).

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Flags of a gRPC service's `health` subcommand, minus the port (each binary reads its own
/// port variable, so the probe follows `LLORCH_*_PORT` inside a container).
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Service to ask (default: `http://127.0.0.1:<port>`, the service on this host).
    #[arg(long)]
    pub url: Option<String>,
    /// Seconds the whole check may take (connecting included).
    #[arg(long, default_value_t = 3.0)]
    pub timeout_secs: f64,
    /// For a service that runs TLS: the PEM certificate authority its certificate chains to.
    /// The default URL then is `https://localhost:<port>` (the certificate must name
    /// `localhost`; else give `--url`).
    #[arg(long, env = "LLORCH_PROBE_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
}

impl ProbeArgs {
    /// `--url`, or the local service on `port` (over TLS with `--ca-cert`).
    pub fn url(&self, port: u16) -> String {
        self.url.clone().unwrap_or_else(|| match self.ca_cert {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        })
    }

    /// The CA of `--ca-cert`, read and checked.
    pub fn ca(&self) -> Result<Option<crate::tls::ClientCa>, String> {
        self.ca_cert
            .as_deref()
            .map(|p| {
                crate::tls::ClientCa::from_file(p)
                    .map_err(|e| format!("{:#}", e).replace("--upstream-ca", "--ca-cert"))
            })
            .transpose()
    }

    /// `--timeout-secs` as a duration (at least 1 ms; a bad value must not mean "forever").
    pub fn timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.timeout_secs)
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(1))
    }
}

/// Asks `grpc.health.v1.Health/Check` at `url` about `service` (its full name: readiness,
/// NOT_SERVING while loading or draining).
/// With `ca`, an `https://` URL is checked against it.
pub async fn grpc_health(
    url: &str,
    service: &str,
    timeout: Duration,
    ca: Option<&crate::tls::ClientCa>,
) -> Result<String, String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("--url {url:?} is not a valid URL: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(ca) = ca {
        endpoint = ca.apply(endpoint, None).map_err(|e| format!("TLS: {}", chain(&e)))?;
    }
    let check = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach {service} at {url}: {}", chain(&e)))?;
        let request = HealthCheckRequest { service: service.to_owned() };
        let status = HealthClient::new(channel).check(request).await.map_err(|s| {
            format!("health check of {service} at {url} failed: {:?}: {}", s.code(), s.message())
        })?;
        match status.into_inner().status() {
            ServingStatus::Serving => Ok(format!("{service} at {url}: SERVING")),
            other => Err(format!(
                "{service} at {url} is {} (loading, draining or stopping)",
                other.as_str_name()
            )),
        }
    };
    tokio::time::timeout(timeout, check).await.unwrap_or_else(|_| {
        Err(format!("no health answer from {service} at {url} within {timeout:?}"))
    })
}

/// An error and its sources on one line (`a: b: c`), for transport errors whose own message
/// is only "transport error".
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !line.ends_with(&s_text) {
            line.push_str(": ");
            line.push_str(&s_text);
        }
        source = s.source();
    }
    line
}

/// Prints the probe's line (stdout when serving, stderr otherwise) and exits 0 or 1.
pub fn exit_with(result: Result<String, String>) -> ! {
    match result {
        Ok(line) => {
            println!("{line}");
            std::process::exit(0)
        }
        Err(reason) => {
            eprintln!("unhealthy: {reason}");
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_sources_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = anyhow::Error::new(io).context("transport error");
        let e: &(dyn std::error::Error + 'static) = outer.as_ref();
        assert_eq!(chain(e), "transport error: refused");
    }
}
